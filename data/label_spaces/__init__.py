"""Synset lists (data, one WNID per line); a package only so that the .txt files get installed."""

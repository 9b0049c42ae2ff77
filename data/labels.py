"""Label spaces as data.

The synset lists live in ``data/label_spaces/*.txt`` (one WordNet id per line, line number = class
index). They are copies of the lists timm ships in ``timm/data/_info``:

============================  ======  ==============================================================
name                          size    source / order
============================  ======  ==============================================================
``in1k``                      1 000   ``imagenet_synsets.txt`` (standard ILSVRC-2012 order, sorted)
``in21k-fall11``              21 841  ``imagenet22k_synsets.txt`` (fall11 release, sorted WNID order)
``in22k-ms``                  21 842  ``imagenet22k_ms_synsets.txt``: the 1K synsets first (1K order),
                                      then the rest of fall11 sorted -- the order of Swin / ViL style
                                      22K heads (it also carries n04399382, a 1K synset that the
                                      fall11 list lacks, hence 21 842)
``in21k-winter21``            10 450  ``imagenet21k_miil_w21_synsets.txt`` (MIIL's winter21 subset)
============================  ======  ==============================================================

The full winter21 list (19 167 synsets) is not shipped anywhere we can copy it from: pass it as a
file (``--labels path/to/synsets.txt``). Any file with one synset per line is a valid label space.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

LABEL_SPACE_DIR = Path(__file__).resolve().parent / "label_spaces"
BUILTIN = ("in1k", "in21k-fall11", "in22k-ms", "in21k-winter21")
ALIASES = {
    "imagenet": "in1k", "imagenet-1k": "in1k", "in1k": "in1k",
    "in21k": "in21k-fall11", "in22k": "in21k-fall11", "in21k-fall11": "in21k-fall11",
    "imagenet-21k": "in21k-fall11", "in22k-ms": "in22k-ms", "in21k-1kfirst": "in22k-ms",
    "in21k-winter21": "in21k-winter21", "in21k-w21": "in21k-winter21",
}


class UnknownSynsetError(ValueError):
    """Synsets found in the source (or requested) that the label space does not contain."""


class LabelSpaceError(ValueError):
    """A label space that cannot be used (unknown name, missing / empty / unreadable file, duplicates).
    Its message is one line, meant to be shown to the user as is."""


@dataclass
class LabelSpace:
    name: str
    synsets: List[str]
    path: str | None = None
    _index: Dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if len(set(self.synsets)) != len(self.synsets):
            seen, dups = set(), []
            for s in self.synsets:
                if s in seen:
                    dups.append(s)
                seen.add(s)
            raise LabelSpaceError(f"label space {self.name!r} has duplicate entries: {dups[:20]}")
        self._index = {s: i for i, s in enumerate(self.synsets)}

    def __len__(self) -> int:
        return len(self.synsets)

    @property
    def num_classes(self) -> int:
        return len(self.synsets)

    def index(self, synset: str) -> int:
        return self._index[synset]

    def __contains__(self, synset: str) -> bool:
        return synset in self._index

    def check(self, names: Iterable[str]) -> None:
        """Raise UnknownSynsetError listing every name not in this space."""
        missing = sorted({n for n in names if n not in self._index})
        if missing:
            shown = ", ".join(missing[:50]) + (f", ... ({len(missing)} in all)" if len(missing) > 50 else "")
            raise UnknownSynsetError(
                f"{len(missing)} synset(s) not in label space {self.name!r} ({len(self)} classes): {shown}")

    def to_manifest(self) -> dict:
        d = {"name": self.name, "num_classes": len(self)}
        if self.name in BUILTIN:
            d["builtin"] = True
        d["synsets"] = list(self.synsets)
        return d

    @classmethod
    def from_manifest(cls, d: dict) -> "LabelSpace":
        if d.get("synsets"):
            return cls(d["name"], list(d["synsets"]), d.get("path"))
        return load_label_space(d["name"])


def read_synset_file(path: str | os.PathLike) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise LabelSpaceError(f"label space file {str(path)!r} is not a text file ({e.reason} at byte {e.start})") from None
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(line.split()[0].split(",")[0])
    return out


def load_label_space(spec: str) -> LabelSpace:
    """``spec``: a builtin name (see module doc, aliases accepted) or a path to a synset list.
    Anything else is a :class:`LabelSpaceError` that suggests the closest builtin name."""
    key = ALIASES.get(str(spec).lower())
    if key is not None:
        p = LABEL_SPACE_DIR / f"{key}.txt"
        return LabelSpace(key, read_synset_file(p), str(p))
    if os.path.isfile(spec):
        syn = read_synset_file(spec)
        if not syn:
            raise LabelSpaceError(f"label space file {spec!r} holds no synsets (one WordNet id per line expected)")
        return LabelSpace(Path(spec).stem, syn, os.path.abspath(spec))
    if os.sep in str(spec) or str(spec).endswith(".txt"):
        raise LabelSpaceError(f"label space file {spec!r} does not exist")
    close = difflib.get_close_matches(str(spec).lower(), list(ALIASES), n=1, cutoff=0.6)
    hint = f" (did you mean {ALIASES[close[0]]!r}?)" if close else ""
    raise LabelSpaceError(f"unknown label space {spec!r}{hint}: use one of {', '.join(BUILTIN)} or a synset-list file")


def imagefolder_label_space(class_names: Sequence[str], name: str = "imagefolder") -> LabelSpace:
    return LabelSpace(name, sorted(class_names))


def map_21k_to_1k(space_21k: LabelSpace | str, space_1k: LabelSpace | str = "in1k") -> List[int]:
    """Indices (into ``space_21k``) of the 1K synsets, in 1K order: ``logits21k[:, idx]`` gives 1K
    logits. A 1K synset missing from the 21K space is an error naming it."""
    if isinstance(space_21k, str):
        space_21k = load_label_space(space_21k)
    if isinstance(space_1k, str):
        space_1k = load_label_space(space_1k)
    missing = [s for s in space_1k.synsets if s not in space_21k]
    if missing:
        raise UnknownSynsetError(
            f"{len(missing)} synset(s) of {space_1k.name!r} missing from {space_21k.name!r}: {', '.join(missing)}")
    return [space_21k.index(s) for s in space_1k.synsets]


def as_label_space(space) -> Optional[LabelSpace]:
    """A LabelSpace from a LabelSpace, a builtin name or synset file, a list of synsets, or a manifest's
    ``label_space`` record (``{name, synsets}``); None stays None. The one conversion every caller uses."""
    if space is None or isinstance(space, LabelSpace):
        return space
    if isinstance(space, str):
        return load_label_space(space)
    if isinstance(space, dict):
        return LabelSpace.from_manifest({"name": "custom", **space})
    if isinstance(space, (list, tuple)) and all(isinstance(s, str) for s in space):
        return LabelSpace("custom", list(space))
    raise TypeError(f"cannot interpret {type(space).__name__} as a label space")

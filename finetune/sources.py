"""Moved to :mod:`pretrain.weights` (temporary alias while export is reworked)."""
from pretrain.weights import *  # noqa: F401,F403
from pretrain.weights import ResolvedSource, load_with_info, unwrap  # noqa: F401

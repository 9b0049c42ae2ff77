"""Moved to :mod:`pretrain.surgery` (temporary alias while export is reworked)."""
from pretrain.surgery import *  # noqa: F401,F403
from pretrain.surgery import adapt_state_dict, as_label_space, classifier_name  # noqa: F401

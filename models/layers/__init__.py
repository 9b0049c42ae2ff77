"""Building blocks kept out of the family files, one module per concern: released-checkpoint unwrapping
(``checkpoint``, every family), relative-position tables (``rel_pos``: ViL, MSG-Transformer), the PEG
(``peg``: ScalableViT) and ViL's 2-D Longformer attention (``longformer2d``)."""
from .peg import PosConv
from .rel_pos import relative_position_index, resize_rel_pos_table_2d

__all__ = ["relative_position_index", "resize_rel_pos_table_2d", "PosConv"]

"""Building blocks shared by every backbone family (one place per concern, see DESIGN.md)."""
from .peg import PosConv
from .rel_pos import relative_position_index, resize_rel_pos_table, resize_rel_pos_table_2d
from .window import pad_to_multiple, window_partition, window_reverse

__all__ = [
    "relative_position_index", "resize_rel_pos_table", "resize_rel_pos_table_2d",
    "pad_to_multiple", "window_partition", "window_reverse",
    "PosConv",
]

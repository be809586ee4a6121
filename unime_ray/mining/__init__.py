"""Stage S3, hard-negative mining: the false-negative filter and cyclical sampling, and the mining stage."""

from .sampling import cyclic_order, mine_query, sample_hard_negatives
from .stage import MineSettings, run_mining

__all__ = ["MineSettings", "cyclic_order", "mine_query", "run_mining", "sample_hard_negatives"]

"""Stage S3, hard-negative mining: the false-negative filter and cyclical sampling, and the mining stage.

Names are imported lazily, so ``unime_ray.mining.config`` (pydantic only) stays cheap to import from the run
config.
"""

from ..utils.lazy import lazy_exports

_EXPORTS = {"MineConfig": "config", "cyclic_order": "sampling", "mine_query": "sampling",
            "sample_hard_negatives": "sampling", "run_mining": "stage"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

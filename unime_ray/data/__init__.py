"""Canonical multimodal data: schemas, sharded Parquet IO, converters, validation and the demo datasets.

Names are imported lazily, so ``unime_ray.data.config`` (pydantic only) stays cheap to import from the run config.
"""

from ..utils.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["FORMATS", "export_pairs", "import_pairs", "import_table"], "convert"),
    **dict.fromkeys(["from_canonical_text", "to_canonical_text"], "convert.records"),
    "ImageError": "images", "load_image": "images",
    **dict.fromkeys(["ShardWriter", "count_rows", "iter_batches", "iter_rows", "read_table", "write_rows"], "io"),
    **dict.fromkeys(["CANDIDATE_SCHEMA", "IMAGE_MARKER", "PAIR_SCHEMA", "Item", "item_from_row",
                     "negatives_from_row"], "schema"),
    **dict.fromkeys(["DataError", "Quarantine", "RowAccount", "validate_row", "validate_rows"], "validate"),
    "DataConfig": "config",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)

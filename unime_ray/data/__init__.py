"""Canonical multimodal data: schemas, sharded Parquet IO, converters, validation and the demo datasets."""

from .convert import FORMATS, export_pairs, import_pairs, import_table, from_canonical_text, to_canonical_text
from .images import ImageError, load_image
from .io import ShardWriter, count_rows, iter_batches, iter_rows, read_table, write_rows
from .schema import (CANDIDATE_SCHEMA, IMAGE_MARKER, PAIR_SCHEMA, Item, item_from_row, negatives_from_row)
from .validate import DataError, Quarantine, RowAccount, validate_row, validate_rows

__all__ = [
    "CANDIDATE_SCHEMA", "DataError", "FORMATS", "IMAGE_MARKER", "ImageError", "Item", "PAIR_SCHEMA", "Quarantine",
    "RowAccount", "ShardWriter", "count_rows", "export_pairs", "from_canonical_text", "import_pairs", "import_table", "item_from_row",
    "iter_batches", "iter_rows", "load_image", "negatives_from_row", "read_table", "to_canonical_text",
    "validate_row", "validate_rows", "write_rows",
]

"""Files written whole or not at all: a temporary file beside the target, then one rename, so a reader (or a rerun
after a kill) never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _json_default(v: Any) -> Any:
    try:
        import numpy as np

        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, np.ndarray):
            return v.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(v)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json_atomic(data: Any, path: str | os.PathLike, allow_nan: bool = False, **dumps: Any) -> Path:
    """JSON (numpy scalars and arrays as numbers and lists, other objects as their strings), indented."""
    return write_text_atomic(json.dumps(data, indent=1, default=_json_default, allow_nan=allow_nan, **dumps), path)


def write_json_list_atomic(items, path: str | os.PathLike, allow_nan: bool = False, **dumps: Any) -> int:
    """What :func:`write_json_atomic` writes for ``list(items)``, byte for byte, one item in memory at a time
    (a training table's JSON export grows with the job). Returns the number of items."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            text = json.dumps(item, indent=1, default=_json_default, allow_nan=allow_nan, **dumps)
            f.write(("[\n " if n == 0 else ",\n ") + text.replace("\n", "\n "))
            n += 1
        f.write("\n]" if n else "[]")
    os.replace(tmp, path)
    return n

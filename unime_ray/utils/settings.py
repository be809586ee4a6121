"""The base of every settings section: unknown keys are errors (a typo fails with its dotted path instead of
being ignored), and assignments are validated as loading is."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` laid on top, mappings merged key by key (how an override or ``extends:`` applies)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

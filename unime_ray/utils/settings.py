"""The base of every settings section: unknown keys are errors (a typo fails with its dotted path instead of
being ignored), and assignments are validated as loading is."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

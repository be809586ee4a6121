"""Typed settings of hard-negative mining (the run config's ``mine:`` section); pydantic and stdlib only."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..utils.settings import Section


class MineConfig(Section):
    """Hard-negative mining (stage S3): false-negative filter and cyclical sampling."""

    num_negatives: int = Field(default=10, ge=1, description="hard negatives kept per query")
    beta: float = Field(default=0.01, ge=0, description="false-negative margin: a candidate the judge scores above "
                        "the positive's score - beta is dropped")
    interval: int = Field(default=5, ge=1, description="stride of the cyclical sampling over the surviving "
                          "candidates (0, 5, 10, ..., then 1, 6, ...)")
    fallback_score: float = Field(default=1.0, ge=0, le=1, description="judge score given to the random negatives "
                                  "of a query whose candidates were all dropped")
    export_official: bool = Field(default=True, description="also write the official UniME-V2 JSON")
    from_imported: Literal["use", "remine"] = Field(default="use", description="training pairs that already carry "
                                                    "judge-scored negatives (the official score JSON, or a table "
                                                    "with neg_* and neg_score): use trains on them as they are "
                                                    "(retrieve, judge and mine are recorded as imported); remine "
                                                    "runs retrieve -> judge -> mine on their queries and positives "
                                                    "as for any other data")

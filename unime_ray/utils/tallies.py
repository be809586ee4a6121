"""Tallies of visual tokens per image: ``{"images", "min", "median", "max", "histogram": {tokens: images}}``.
Workers and sub-runs each keep a histogram, so their tallies merge exactly (unime_ray.models.budget explains
what is counted)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping


def _histogram(counts: Mapping[Any, int] | Iterable[int] | None) -> Counter:
    if counts is None:
        return Counter()
    if isinstance(counts, Mapping):
        return Counter({int(k): int(v) for k, v in counts.items() if int(v)})
    return Counter(int(x) for x in counts)


def token_tally(counts: Mapping[Any, int] | Iterable[int] | None) -> dict[str, Any] | None:
    """``{"images", "min", "median", "max", "histogram"}`` of visual tokens per image, from a histogram
    ``{tokens: images}`` (JSON string keys accepted) or a list of per-image counts; None without images."""
    hist = _histogram(counts)
    n = sum(hist.values())
    if not n:
        return None
    values = sorted(hist)

    def nth(i: int) -> int:   # the i-th smallest image's tokens (0-based)
        seen = 0
        for v in values:
            seen += hist[v]
            if i < seen:
                return v
        raise IndexError(i)

    median = (nth((n - 1) // 2) + nth(n // 2)) / 2
    return {"images": n, "min": values[0], "median": int(median) if median == int(median) else median,
            "max": values[-1], "histogram": {str(v): hist[v] for v in values}}


def merge_tallies(*tallies: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """One tally of several (None entries skipped), exact through the histograms."""
    total: Counter = Counter()
    for t in tallies:
        if t:
            total.update(_histogram(t.get("histogram") or {}))
    return token_tally(total)


def drain_visual_tokens(owner: Any) -> Counter:
    """The visual-token histogram recorded by the processor behind ``owner`` (a ``VLProcessor``, or an object
    with ``.processor``, ``.judge.processor`` or its own ``visual_tokens``), reset to empty; empty for objects
    that record nothing (e.g. test doubles)."""
    for path in (("visual_tokens",), ("processor", "visual_tokens"), ("judge", "processor", "visual_tokens"),
                 ("embedder", "processor", "visual_tokens")):
        obj = owner
        for name in path:
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, Counter):
            out = Counter(obj)
            obj.clear()
            return out
    return Counter()

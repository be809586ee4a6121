"""A progress line for a training run, fed by the ``metrics.jsonl`` its rank 0 writes (one line per step)."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..utils.console import end_live, log_only
from ..utils.progress import Progress


class MetricsWatcher:
    """Follows a JSON-lines metrics file (one object per optimizer step with ``step``, as rank 0 of a training run
    writes ``metrics.jsonl``) and feeds each new line to a :class:`Progress`: step/total, loss, samples/s, ETA.

    Lines already in the file (a resumed run) set the starting step without counting as progress. A file that
    shrinks (rewritten) is read again from its start; a partly written last line waits for its newline.
    """

    FIELDS = {"loss": "loss", "samples_per_s": "samples/s"}

    def __init__(self, path: str | os.PathLike, progress: Progress, poll: float = 0.5,
                 fields: dict[str, str] | None = None):
        self.path, self.progress, self.poll = Path(path), progress, poll
        self.fields = self.FIELDS if fields is None else fields
        self._offset, self._partial = 0, b""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        earlier = self._read_new()
        if earlier:
            progress.initial = progress.done = int(earlier[-1]["step"])

    def _read_new(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self._offset:
            self._offset, self._partial = 0, b""
        if size == self._offset:
            return []
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        out = []
        for raw in chunks:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
                out.append(rec)
        return out

    def poll_once(self) -> int:
        """Read what was appended; returns the number of new metric lines."""
        recs = self._read_new()
        for rec in recs:
            self.progress.set(int(rec["step"]), **{label: rec[key] for key, label in self.fields.items()
                                                   if isinstance(rec.get(key), (int, float))})
        if not recs:
            self.progress.refresh()
        return len(recs)

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.poll_once()
            except Exception:  # the watcher only shows progress: it never stops a training run
                logging.getLogger(__name__).debug("metrics watcher", exc_info=True)

    def start(self) -> MetricsWatcher:
        self._thread = threading.Thread(target=self._run, name="unime-metrics-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, ok: bool = True) -> None:
        """Stop following; with ``ok`` the line ends with its final state, else it stays where it got to."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.poll_once()
        if ok and self.progress.done > self.progress.initial:
            self.progress.finish()
        elif not self.progress.finished:
            log_only(self.progress.logger, logging.INFO, "%s", self.progress.line())
            end_live()


@contextmanager
def watch_metrics(path: str | os.PathLike, what: str, total: int | None, logger: logging.Logger,
                  poll: float = 0.5) -> Iterator[MetricsWatcher]:
    """A progress line for a training run that writes ``path`` (steps of ``total``) while the block runs."""
    watcher = MetricsWatcher(path, Progress(logger, what, total, unit="steps"), poll=poll).start()
    ok = False
    try:
        yield watcher
        ok = True
    finally:
        watcher.stop(ok)

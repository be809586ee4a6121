"""Logging set-up shared by the CLI and job entrypoints."""

from __future__ import annotations

import logging
import os
import time

_QUIET = ("ray", "filelock", "urllib3", "httpx", "PIL", "matplotlib", "DeepSpeed", "deepspeed", "torch")


def setup_logging(level: str | int = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("unime_ray").setLevel(level)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Progress:
    """Logs done/total and throughput at most every ``every`` seconds (and at the end)."""

    def __init__(self, logger: logging.Logger, what: str, total: int | None = None, every: float = 5.0):
        self.logger, self.what, self.total, self.every = logger, what, total, every
        self.done = 0
        self.start = self._last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.every or (self.total is not None and self.done >= self.total):
            self._last = now
            self.log()

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self) -> None:
        total = f"/{self.total}" if self.total is not None else ""
        self.logger.info("%s: %d%s (%.1f/s)", self.what, self.done, total, self.rate)

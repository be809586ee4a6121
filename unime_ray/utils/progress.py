"""A progress line per running step (done/total, rate, ETA), drawn in place on a terminal and as plain periodic
lines in logs and pipes; it shares the console with :mod:`.console`'s log records."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any, TextIO

from .console import _LOCK, _State, console


def fmt_duration(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def fmt_rate(rate: float, unit: str = "") -> str:
    if rate >= 1 or rate <= 0:
        num = f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}"
        return f"{num} {unit}/s" if unit else f"{num}/s"
    one = unit[:-1] if unit.endswith("s") else (unit or "item")
    return f"{1 / rate:.1f} s/{one}"


def _fmt_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
    """One progress line for a running step: done/total, rate, extra fields (loss, ...), ETA.

    On a terminal (the console stream is a TTY) the line is redrawn in place (``\\r``) at most every ``tty_every``
    seconds, and written to the log file every ``every`` seconds; elsewhere (logs, pipes, CI) it is logged as a plain
    line at most every ``every`` seconds (default 10, or ``UNIME_PROGRESS_EVERY``). The final state is logged once,
    when done reaches total or on :meth:`finish`. The rate shown and the ETA count from the first update (start-up
    time, such as loading models, is not progress); :attr:`rate` is done per second since the start.
    """

    def __init__(self, logger: logging.Logger, what: str, total: int | None = None, every: float | None = None, *,
                 unit: str = "", initial: int = 0, clock: Callable[[], float] | None = None,
                 stream: TextIO | None = None, tty: bool | None = None, tty_every: float = 0.25):
        self.logger, self.what, self.total, self.unit = logger, what, total, unit
        self.every = float(os.environ.get("UNIME_PROGRESS_EVERY", 10)) if every is None else every
        self.tty_every = tty_every
        self.clock = clock or time.perf_counter
        self.initial = self.done = initial
        self.fields: dict[str, Any] = {}
        self.stream, self._tty = stream, tty
        self.start = self._last = self.clock()
        self._last_draw = float("-inf")
        self._first: tuple[float, int] | None = None   # (time, done) at the first update
        self._obs: tuple[float, int] | None = None     # (time, done) at the latest update
        self.finished = False

    # -- state
    def update(self, n: int = 1, **fields: Any) -> None:
        """``n`` more done; ``fields`` (e.g. ``loss=0.3``) are shown beside the count."""
        self.set(self.done + n, **fields)

    def set(self, done: int, **fields: Any) -> None:
        """Done so far (absolute), e.g. the last step of a training run."""
        now = self.clock()
        with _LOCK:   # a watcher thread updates while the main thread may be drawing the line
            if self._first is None or done < self._obs[1]:   # first update, or restarted from an earlier point
                self._first = (now, done)
            self.done = done
            self._obs = (now, done)
            self.fields.update(fields)
        if self.total is not None and self.done >= self.total:
            self.finish()
        else:
            self._emit(now)

    def refresh(self) -> None:
        """Without news: redraw on a terminal (the elapsed time or ETA moves); elsewhere a line at most every
        ``3 * every`` seconds, to show that the step is still alive (e.g. while training workers start)."""
        if self.finished:
            return
        now = self.clock()
        if self.tty:
            if now - self._last_draw >= self.tty_every:
                self._last_draw = now
                with _LOCK:
                    self._show()
        elif now - self._last >= 3 * self.every:
            self._last = now
            self.logger.info("%s", self.line(now=now))

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    @property
    def rate(self) -> float:
        """Done per second since the start (what a stage reports as its throughput)."""
        return (self.done - self.initial) / max(self.elapsed, 1e-9)

    @property
    def speed(self) -> float | None:
        """Done per second since the first update, as of the latest one; None before a second update."""
        if self._first is None or self._obs is None:
            return None
        dt, dn = self._obs[0] - self._first[0], self._obs[1] - self._first[1]
        return dn / dt if dt > 0 and dn > 0 else None

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left: what remains at the speed so far, counted down since the latest update."""
        speed = self.speed
        if self.total is None or speed is None:
            return None
        now = self.clock() if now is None else now
        return max(0.0, (self.total - self.done) / speed - (now - self._obs[0]))

    @property
    def tty(self) -> bool:
        if self._tty is None:
            try:
                self._tty = bool(self._stream().isatty())
            except (AttributeError, ValueError, OSError):
                self._tty = False
        return self._tty

    # -- text
    def line(self, final: bool = False, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        count = f"{self.done}" + (f"/{self.total}" if self.total is not None else "") + (
            f" {self.unit}" if self.unit else "")
        if self.total:
            count += f" ({100 * self.done / self.total:.0f}%)"
        parts = [f"{self.what}: {count}"]
        rate = self.rate if final else self.speed
        if rate:
            parts.append(fmt_rate(rate, self.unit))
        for k, v in self.fields.items():
            parts.append(f"{_fmt_value(v)} {k}" if k.endswith("/s") else f"{k} {_fmt_value(v)}")
        if final:
            parts.append(f"took {fmt_duration(now - self.start)}")
        else:
            eta = self.eta(now)
            parts.append(f"ETA {fmt_duration(eta)}" if eta is not None else f"{fmt_duration(now - self.start)} elapsed")
        return " | ".join(parts)

    def log(self) -> None:
        self.logger.info("%s", self.line())

    def finish(self) -> None:
        """Log the final state once (and end the line drawn in place)."""
        if self.finished:
            return
        self.finished = True
        with _LOCK:
            if _State.live is self:
                self._erase(self._stream())
                _State.live = None
        self.logger.info("%s", self.line(final=True))

    # -- output
    def _stream(self) -> TextIO:
        return self.stream or console()

    def _emit(self, now: float) -> None:
        if self.tty:
            if now - self._last_draw >= self.tty_every:
                self._last_draw = now
                with _LOCK:
                    self._show()
            if now - self._last >= self.every:
                self._last = now
                self.logger.info("%s", self.line(now=now), extra={"console": False})
        elif now - self._last >= self.every:
            self._last = now
            self.logger.info("%s", self.line(now=now))

    def _show(self) -> None:
        stream = self._stream()
        other = _State.live
        if other is not None and other is not self:
            stream.write("\n")   # an earlier line that was never finished stays as it was
        _State.live = self
        self._draw(stream)
        stream.flush()

    def _draw(self, stream: TextIO) -> None:
        width = max(20, shutil.get_terminal_size((120, 20)).columns - 1)
        stream.write("\r" + self.line()[:width] + "\x1b[K")

    @staticmethod
    def _erase(stream: TextIO) -> None:
        stream.write("\r\x1b[K")

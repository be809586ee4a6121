"""Console and logging set-up shared by the CLI and the job entrypoints.

The console is this project's: stage lines, one progress line per running step (redrawn in place on a terminal,
plain periodic lines in logs and pipes), results and errors. Under :func:`start_run_logging` (the pipeline and
stage commands) everything else goes to the run's log file, ``<run_dir>/logs/console.log``, unless verbose:
Ray's and the libraries' log records, Python warnings, C++ log lines written to stderr, the output of Ray workers
and progress bars.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

_QUIET = ("ray", "filelock", "urllib3", "httpx", "PIL", "matplotlib", "DeepSpeed", "deepspeed", "torch")
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_NAME = "console.log"
_LOCK = threading.RLock()


class _State:
    console: TextIO | None = None       # the terminal while stderr is redirected to the run log (None: sys.stderr)
    quiet: bool = False                 # the console shows only this project's records (and errors)
    verbose: bool = False               # --verbose: everything on the console, as the libraries print it
    file_handler: logging.Handler | None = None
    path: Path | None = None
    live: "Progress | None" = None      # the progress line drawn in place right now


def console() -> TextIO:
    """Where this project's lines go: the terminal (stderr), even while stderr itself goes to the run log."""
    return _State.console or sys.stderr


def verbose() -> bool:
    """Whether the run asked for everything on the console (``--verbose``)."""
    return _State.verbose


def log_path() -> Path | None:
    """The run's log file while :func:`start_run_logging` is in force, else None."""
    return _State.path


def _ours(record: logging.LogRecord) -> bool:
    return record.name == "unime_ray" or record.name.startswith(("unime_ray.", "__main__"))


class ConsoleHandler(logging.Handler):
    """Writes to :func:`console` at emit time. Unless verbose, only this project's records and errors pass; a record
    logged with ``extra={"console": False}`` goes to the log file only. A live progress line is cleared before the
    record and redrawn after it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", True) is False:
            return False
        if _State.quiet and not _ours(record) and record.levelno < logging.ERROR:
            return False
        return bool(super().filter(record))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            with _LOCK:
                stream = console()
                live = _State.live
                if live is not None:
                    live._erase(stream)
                stream.write(msg + "\n")
                if live is not None:
                    live._draw(stream)
                stream.flush()
        except Exception:
            self.handleError(record)


class _ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS message``; the level for warnings and errors, the logger's name for other libraries' records."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{self.formatTime(record, '%H:%M:%S')} "
        if record.levelno != logging.INFO:
            text += f"{record.levelname} "
        if not _ours(record):
            text += f"{record.name}: "
        text += record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(level: str | int = "INFO") -> None:
    """This project's console handler on the root logger (replacing an earlier one), at ``level``."""
    level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(level, int):
        level = logging.INFO
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, ConsoleHandler):
            root.removeHandler(h)
    handler = ConsoleHandler(level)
    handler.setFormatter(_ConsoleFormatter())
    root.addHandler(handler)
    # Loggers stay at INFO or below so that the run's log file gets INFO records whatever the console shows.
    root.setLevel(min(level, logging.INFO))
    logging.getLogger("unime_ray").setLevel(min(level, logging.INFO))
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _ToLogFile(logging.Filter):
    """On a library logger with its own console handler (DeepSpeed's prints to stdout): the record goes to the run's
    log file only."""

    def filter(self, record: logging.LogRecord) -> bool:
        fh = _State.file_handler
        if fh is not None and record.levelno >= fh.level:
            fh.handle(record)
        return False


_DIVERTED = ("DeepSpeed",)


class RunLog:
    """What :func:`start_run_logging` changed; :meth:`close` undoes it."""

    def __init__(self, path: Path, verbose: bool):
        self.path, self.verbose = path, verbose
        self._saved_fd: int | None = None
        self._saved_stdout: TextIO | None = None
        self._stdout_file: TextIO | None = None
        self._env_set: list[str] = []
        self._filter: logging.Filter | None = None
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        end_live()
        with _LOCK:
            if self._saved_stdout is not None:
                try:
                    sys.stdout.flush()
                except (OSError, ValueError):
                    pass
                sys.stdout = self._saved_stdout
                self._stdout_file.close()
            if self._saved_fd is not None:
                try:
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
                os.dup2(self._saved_fd, 2)
                console_stream = _State.console
                _State.console = None
                if console_stream is not None:
                    console_stream.close()   # closes the saved descriptor too
            _State.quiet = _State.verbose = False
            fh, _State.file_handler, _State.path = _State.file_handler, None, None
            if fh is not None:
                logging.getLogger().removeHandler(fh)
                fh.close()
            if self._filter is not None:
                for name in _DIVERTED:
                    logging.getLogger(name).removeFilter(self._filter)
            logging.captureWarnings(False)
            for key in self._env_set:
                os.environ.pop(key, None)

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_run_logging(run_dir: str | os.PathLike, verbose: bool = False, level: str | int = "INFO",
                      redirect: bool = True) -> RunLog:
    """Send what is not this project's to ``run_dir/logs/console.log`` (the console keeps our lines and errors).

    Every log record (INFO and up) and Python warning is written to the file. Unless ``verbose``: the console shows
    only this project's records and errors; with ``redirect`` file descriptor 2 (stderr, where Ray's C++ core and
    the libraries write) and ``sys.stdout`` go to the file as well, while this project's lines go to a copy of the
    original stderr (:func:`console`); progress bars are turned off (``TQDM_DISABLE``), and :func:`init_ray
    <unime_ray.utils.ray_utils.init_ray>` sends the workers' forwarded output to the file.
    """
    end_live()
    if _State.path is not None:
        raise RuntimeError(f"run logging is already on ({_State.path})")
    path = Path(run_dir).expanduser().resolve() / "logs" / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    if not any(isinstance(h, ConsoleHandler) for h in logging.getLogger().handlers):
        setup_logging(level)
    run = RunLog(path, verbose)
    fh = logging.FileHandler(path, mode="a", encoding="utf-8")
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    fh.setLevel(min(numeric, logging.INFO) if isinstance(numeric, int) else logging.INFO)
    fh.setFormatter(logging.Formatter(FILE_FORMAT))
    with path.open("a", encoding="utf-8") as f:
        f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {' '.join(sys.argv)}\n")
    with _LOCK:
        _State.file_handler, _State.path, _State.verbose, _State.quiet = fh, path, verbose, not verbose
        logging.getLogger().addHandler(fh)
        logging.captureWarnings(True)
        if verbose:
            return run
        if "TQDM_DISABLE" not in os.environ:
            os.environ["TQDM_DISABLE"] = "1"
            run._env_set.append("TQDM_DISABLE")
        run._filter = _ToLogFile()
        for name in _DIVERTED:
            logging.getLogger(name).addFilter(run._filter)
        if redirect:
            _redirect_streams(run, path)
    return run


def _redirect_streams(run: RunLog, path: Path) -> None:
    try:
        for s in (sys.stdout, sys.stderr):
            s.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        return  # no usable stderr: nothing to redirect
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    _State.console = os.fdopen(saved, "w", buffering=1, encoding=encoding, errors="backslashreplace")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    run._saved_fd = saved
    run._saved_stdout = sys.stdout
    run._stdout_file = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    sys.stdout = run._stdout_file


def log_only(logger: logging.Logger, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
    """A record for the run's log file (and the console only when verbose)."""
    extra = {} if _State.verbose else {"console": False}
    logger.log(level, msg, *args, extra=extra, **kwargs)


_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Failure)\b:?")


def one_line_error(exc: BaseException, limit: int = 400) -> str:
    """An exception as one line: its type and first line, and the root error when the message carries a traceback
    (as Ray's errors re-raised from workers do)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    root = next((ln for ln in reversed(lines[1:]) if _ERROR_LINE.match(ln)), None)
    if root is None and exc.__cause__ is not None and exc.__cause__ is not exc:
        root = one_line_error(exc.__cause__, limit)
    if root and root not in text:
        text += f" ... {root}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def end_live() -> None:
    """End a progress line drawn in place (its last state stays on screen)."""
    with _LOCK:
        live, _State.live = _State.live, None
        if live is not None:
            stream = live._stream()
            stream.write("\n")
            stream.flush()


# ---------------------------------------------------------------------------------------------- progress
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


# ------------------------------------------------------------------------------------- training progress
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

    def start(self) -> "MetricsWatcher":
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

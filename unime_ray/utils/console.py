"""Console and logging set-up shared by the CLI and the job entrypoints.

The console is this project's: stage lines, one progress line per running step (redrawn in place on a terminal,
plain periodic lines in logs and pipes), results and errors. Under :func:`start_run_logging` (the pipeline and
stage commands) everything else goes to the run's log file, ``<run_dir>/logs/console.log``, unless verbose:
Ray's and the libraries' log records, Python warnings, C++ log lines written to stderr, the output of Ray workers
and progress bars.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

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
    live: Any = None                    # the progress line drawn in place right now


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

    def __enter__(self) -> RunLog:
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

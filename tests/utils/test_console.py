"""The console: one progress line per step (ETA, loss, in place on a terminal), library messages routed to the run's
log file unless verbose, training progress from metrics.jsonl, the end-of-run summary."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from unime_ray.utils import console
from unime_ray.train.watch import MetricsWatcher, watch_metrics
from unime_ray.utils.console import one_line_error
from unime_ray.utils.progress import Progress, fmt_duration, fmt_rate

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _logger(name: str) -> tuple[logging.Logger, list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    lg = logging.getLogger(f"unime_ray.test_console.{name}")
    lg.handlers[:] = [Keep()]
    lg.propagate = False
    lg.setLevel(logging.INFO)
    return lg, records


def test_formatting_helpers():
    assert [fmt_duration(s) for s in (0, 4.6, 65, 3725)] == ["0s", "5s", "1m05s", "1h02m"]
    assert fmt_rate(12.34, "rows") == "12.3 rows/s" and fmt_rate(250, "rows") == "250 rows/s"
    assert fmt_rate(0.25, "steps") == "4.0 s/step" and fmt_rate(3, "") == "3.0/s"


def test_progress_counts_rate_eta_and_loss_plain_lines():
    clock, (lg, records) = Clock(), _logger("plain")
    p = Progress(lg, "train demo", total=100, every=10, unit="steps", clock=clock, stream=io.StringIO())
    assert not p.tty
    clock.t += 30                      # start-up: not progress
    p.set(10, loss=0.5)                # first update: 30 s after the start, so a line (every 10 s)
    assert len(records) == 1 and "10/100 steps (10%)" in records[0].getMessage()
    assert "30s elapsed" in records[0].getMessage()   # no speed yet: no rate and no ETA
    clock.t += 5
    p.set(20, loss=0.25, **{"samples/s": 12.5})
    assert len(records) == 1           # 5 s since the last line: nothing
    assert p.speed == pytest.approx(2.0) and p.eta() == pytest.approx(40.0)   # 80 left at 2 steps/s
    clock.t += 6                       # the ETA counts down between updates
    assert p.eta() == pytest.approx(34.0)
    p.set(32, loss=0.125)
    assert p.speed == pytest.approx(2.0)
    msg = records[-1].getMessage()
    assert len(records) == 2 and msg == ("train demo: 32/100 steps (32%) | 2.0 steps/s | loss 0.125 | 12.5 samples/s"
                                         " | ETA 34s")
    assert p.rate == pytest.approx(32 / 41)           # throughput since the start, for the stage's stats
    p.set(100)                         # done: the final line, with the rate since the start and the time taken
    assert p.finished and records[-1].getMessage() == "train demo: 100/100 steps (100%) | 2.4 steps/s | loss 0.125 " \
                                                      "| 12.5 samples/s | took 41s"
    p.finish()
    p.update(1)
    assert sum("took" in r.getMessage() for r in records) == 1   # logged once


def test_progress_in_place_on_a_tty(monkeypatch):
    clock, (lg, records) = Clock(), _logger("tty")
    tty = Tty()
    p = Progress(lg, "embedded", total=10, every=10, unit="rows", clock=clock, stream=tty, tty_every=0.25)
    assert p.tty
    for _ in range(4):
        clock.t += 1
        p.update(2)
    out = tty.getvalue()
    assert out.count("\r") >= 4 and "\n" not in out and "embedded: 8/10 rows (80%)" in out and "\x1b[K" in out
    # periodic copies go to the log file only (not the console), at most every `every` seconds
    assert records == [] or all(getattr(r, "console", True) is False for r in records)
    clock.t += 1
    p.update(2)                        # done: the line is erased and the final state logged as a normal record
    assert p.finished and tty.getvalue().endswith("\r\x1b[K")
    assert records[-1].getMessage().startswith("embedded: 10/10 rows (100%)")
    assert getattr(records[-1], "console", True) is True


def test_console_handler_redraws_the_live_line():
    tty = Tty()
    handler = console.ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    lg = logging.getLogger("unime_ray.test_console.redraw")
    lg.handlers[:] = [handler]
    lg.propagate = False
    lg.setLevel(logging.INFO)
    old = console._State.console
    console._State.console = tty
    try:
        clock = Clock()
        p = Progress(lg, "searched", total=10, clock=clock, stream=tty, tty_every=0)
        p.update(3)
        lg.info("a stage line")
        out = tty.getvalue()
        # erase the live line, write the record, draw the line again below it
        assert "\r\x1b[Ka stage line\n\rsearched: 3/10" in out
        console.end_live()
        assert tty.getvalue().endswith("\n") and console._State.live is None
    finally:
        console._State.console = old
        console._State.live = None


def test_metrics_watcher_turns_appended_lines_into_progress(tmp_path):
    clock, (lg, records) = Clock(), _logger("watch")
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 3, "loss": 9.0}) + "\n")   # a resumed run: steps 1-3 were done before
    p = Progress(lg, "train x", total=10, every=0, unit="steps", clock=clock, stream=io.StringIO())
    w = MetricsWatcher(path, p, poll=0.01)
    assert p.done == p.initial == 3 and w.poll_once() == 0
    with path.open("a") as f:
        for step in (4, 5):
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "samples_per_s": 8.0, "lr": 1e-4,
                                "rows": list(range(8))}) + "\n")     # the trainer's rows: not shown
        f.write('{"step": 6, "lo')    # a line still being written
    clock.t += 2
    assert w.poll_once() == 2 and p.done == 5
    assert p.fields == {"loss": 0.2, "samples/s": 8.0}
    with path.open("a") as f:
        f.write('ss": 0.5}\n')
    clock.t += 1
    assert w.poll_once() == 1 and p.done == 6 and p.fields["loss"] == 0.5
    msg = records[-1].getMessage()
    # speed from the first new line (step 4 at +2 s) to step 6 (+3 s): 2 steps/s, 4 steps left
    assert msg == "train x: 6/10 steps (60%) | 2.0 steps/s | loss 0.5 | 8 samples/s | ETA 2s"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")   # rewritten (a fresh run): read from the start
    assert w.poll_once() == 1 and p.done == 1


def test_metrics_watcher_thread_finishes_the_line(tmp_path):
    lg, records = _logger("thread")
    path = tmp_path / "metrics.jsonl"
    with watch_metrics(path, "train t", 2, lg, poll=0.01):
        with path.open("a") as f:
            f.write(json.dumps({"step": 1, "loss": 1.5}) + "\n")
            f.write(json.dumps({"step": 2, "loss": 1.25}) + "\n")
    assert records and records[-1].getMessage().startswith("train t: 2/2 steps (100%)")
    assert "loss 1.25" in records[-1].getMessage()


def test_one_line_error_of_a_remote_traceback():
    exc = RuntimeError("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call "
                       "last):\n  File \"x.py\", line 1, in f\n    g()\nValueError: rank 0: no full micro-batch\n")
    line = one_line_error(exc)
    assert "\n" not in line and line.startswith("RuntimeError: Training failed due to worker errors:")
    assert line.endswith("ValueError: rank 0: no full micro-batch")
    assert one_line_error(KeyError("k")) == "KeyError: 'k'"


_ROUTING = textwrap.dedent("""
    import logging, os, sys, warnings
    sys.path.insert(0, {repo!r})
    from unime_ray.utils.console import setup_logging, start_run_logging
    setup_logging("INFO")
    verbose = sys.argv[2] == "verbose"
    run = start_run_logging(sys.argv[1], verbose=verbose)
    logging.getLogger("unime_ray.run.runner").info("OUR-LINE")
    warnings.warn("LIB-PYWARNING")
    logging.getLogger("ray").warning("RAY-WARNING")
    logging.getLogger("DeepSpeed").warning("DS-WARNING")
    logging.getLogger("somelib").error("LIB-ERROR")
    os.write(2, b"C-LEVEL-STDERR\\n")
    print("LIB-STDOUT-PRINT")
    run.close()
    print("AFTER-CLOSE")
""")


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_library_messages_go_to_the_run_log_unless_verbose(tmp_path, mode):
    script = tmp_path / "route.py"
    script.write_text(_ROUTING.format(repo=str(REPO)))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), mode], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "run" / "logs" / "console.log").read_text()
    console = proc.stderr + proc.stdout
    assert "OUR-LINE" in proc.stderr and "OUR-LINE" in log
    assert "LIB-ERROR" in proc.stderr and "LIB-ERROR" in log        # errors reach the console either way
    assert "AFTER-CLOSE" in proc.stdout
    for lib in ("LIB-PYWARNING", "RAY-WARNING", "DS-WARNING"):
        assert lib in log, lib
        assert (lib in console) == (mode == "verbose"), (lib, console)
    if mode == "quiet":
        assert "C-LEVEL-STDERR" in log and "LIB-STDOUT-PRINT" in log
        assert "C-LEVEL-STDERR" not in console and "LIB-STDOUT-PRINT" not in console
    else:
        assert "C-LEVEL-STDERR" in console and "LIB-STDOUT-PRINT" in console


def test_run_summary_prints_the_reports_headline_table(tmp_path):
    from unime_ray.run.runner import Manifest, headline_table, run_summary

    (tmp_path / "report.md").write_text(textwrap.dedent("""\
        # unime-ray run report

        | eval set | queries | chance P@1 (%) |
        |---|---|---|
        | shapes | 32 | 12.50 |

        | variant | reranked (top-5, listwise) | seeds | P@1 shapes | P@1 mean |
        |---|---|---|---|---|
        | retriever: in-batch InfoNCE | no | 1 | 40.62 | 40.62 |
        | UniME-V2: mined negatives + judge-score alignment | no | 2 | 50.00 ± 4.42 | 50.00 |

        ## Stages
        """))
    table = headline_table(tmp_path / "report.md")
    assert len(table) == 3 and table[0].startswith("variant") and "P@1 mean" in table[0]
    assert table[2].startswith("UniME-V2") and table[1].index("no") == table[2].index("no")   # aligned columns
    m = Manifest(tmp_path)
    m.update("eval", status="complete", seconds=75.2)
    text = run_summary(tmp_path, m)
    assert f"report: {tmp_path / 'report.md'}" in text and "eval      complete  1m15s" in text
    assert table[2] in text

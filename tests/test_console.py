"""What the console shows: TTY-aware progress, the training display, ``--version``, ``python -m anomaly``.

Torch-free: runs in the venv without torch too.
"""
from __future__ import annotations

import importlib.util
import io
import subprocess
import sys

import pytest

import anomaly
from anomaly.data.progress import Progress, format_seconds, track
from anomaly.training.cli import TrainProgress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal_at_most_one_per_interval_with_rate_and_eta() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = Progress(total=100, desc="audit", unit="img", stream=out, interval=10.0, clock=clock)
    assert bar.mode == "lines"  # StringIO is no terminal: no carriage returns in a log
    for _ in range(10):  # 10 images in 5 s: no line yet
        clock.now += 0.5
        bar.update(1)
    assert out.getvalue() == ""
    for _ in range(20):  # 30 images in 15 s: one line once 10 s have passed
        clock.now += 0.5
        bar.update(1, flagged=3)
    lines = out.getvalue().splitlines()
    assert lines == ["audit 20/100 img (20%) 2 img/s ETA 0:00:40 flagged=3"]
    bar.close()
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("audit 30/100 img (30%) 2 img/s ETA 0:00:35") and last.endswith("done in 0:00:15")
    assert "\r" not in out.getvalue()


def test_a_terminal_gets_a_live_bar() -> None:
    out = FakeTTY()
    if importlib.util.find_spec("tqdm") is None:  # the train extra brings tqdm; without it, the lines
        assert Progress(total=4, stream=out).mode == "lines"
        return
    with Progress(total=4, desc="export", unit="batch", stream=out) as bar:
        assert bar.mode == "bar"
        for _ in range(4):
            bar.update(1, loss=0.5)
        bar.write("a line that stays")
    text = out.getvalue()
    assert "\r" in text and "export" in text and "4/4" in text and "a line that stays\n" in text


def test_track_counts_items_and_unknown_totals_show_elapsed_time() -> None:
    out, clock = io.StringIO(), FakeClock()
    items = []
    for i in track(iter(range(3)), desc="calibrate", unit="img", stream=out, interval=0.0, clock=clock):
        clock.now += 1.0
        items.append(i)
    assert items == [0, 1, 2]
    assert out.getvalue().splitlines()[-1] == "calibrate 3 img 1 img/s elapsed 0:00:03 done in 0:00:03"
    assert format_seconds(3725) == "1:02:05" and format_seconds(None) == "?"
    with pytest.raises(ValueError, match="progress mode must be one of auto, bar, lines, none, got 'fancy'"):
        Progress(mode="fancy")


def test_training_display_writes_one_line_per_epoch_in_logs() -> None:
    out = io.StringIO()
    show = TrainProgress(stream=out, mode="lines", interval=3600)
    for epoch in (1, 2):
        for b in (1, 2):
            show({"event": "batch", "epoch": epoch, "epochs": 2, "batch": b, "batches": 2, "logs": {"recon": 0.1},
                  "elapsed": 1.0})
        show({"event": "epoch", "epoch": epoch, "epochs": 2, "logs": {"recon": 0.1 / epoch}, "val_error": 0.05,
              "improved": epoch == 1, "elapsed": 2.0 * epoch})
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["  epoch 1/2 recon=0.1000 val_error=0.05000 (best) [2s]",
                         "  epoch 2/2 recon=0.0500 val_error=0.05000 [4s]"]
    assert lines[2].startswith("epoch 2/2 4/4 batch (100%)") and lines[2].endswith("recon=0.1 done in 0:00:00")
    silent = io.StringIO()
    TrainProgress(stream=silent, mode="none")({"event": "epoch", "epoch": 1, "epochs": 1, "logs": {},
                                               "val_error": 0.1, "elapsed": 1.0})
    assert silent.getvalue() == ""


def test_version_and_python_m_anomaly(capsys) -> None:
    from anomaly.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"anomaly {anomaly.__version__}\n"
    proc = subprocess.run([sys.executable, "-m", "anomaly", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == f"anomaly {anomaly.__version__}\n"
    proc = subprocess.run([sys.executable, "-m", "anomaly", "train"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage: anomaly train" in proc.stderr  # the same command, its parser

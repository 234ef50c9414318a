"""What the console shows: TTY-aware progress (train, calibrate, evaluate, audit), the training display,
``--version``, ``python -m anomaly``.

Torch-free: runs in the venv without torch too.
"""
from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import anomaly
from anomaly.data.progress import CountProgress, Progress, format_seconds, track
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


def test_count_progress_renders_done_of_total_callbacks_and_closes_at_the_total() -> None:
    out = io.StringIO()
    show = CountProgress(desc="evaluate", unit="img", stream=out, mode="lines", interval=3600)
    show(0, 3)
    show(2, 3, flagged=1)
    assert out.getvalue() == ""  # within the interval: no line yet
    show(3, 3, flagged=2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate 3/3 img (100%)") and "flagged=2 done in" in lines[0]
    show(3, 3)  # a report after the end, and the caller's close, add nothing
    show.close()
    assert out.getvalue().splitlines() == lines
    unopened = io.StringIO()
    CountProgress(desc="audit", stream=unopened, mode="lines").close()  # no work: nothing shown
    silent = io.StringIO()
    with CountProgress(desc="audit", stream=silent, mode="none") as quiet:
        quiet(0, 2)
        quiet(2, 2)
    assert unopened.getvalue() == silent.getvalue() == ""
    with pytest.raises(ValueError, match="progress mode must be one of auto, bar, lines, none, got 'fancy'"):
        CountProgress(mode="fancy")
    # a display opened at the first report, 2 s into the work: rate and ETA count from the work's start
    clock = FakeClock()
    late = Progress(total=10, desc="audit", unit="images", stream=io.StringIO(), mode="lines", elapsed=2.0, clock=clock)
    late.update(1)
    assert late.rate == pytest.approx(0.5) and late.eta == pytest.approx(18.0)


def _progress_lines(text: str, desc: str) -> list[str]:
    """The plain progress lines of ``desc`` (``calibrate 4/4 images (100%) ...``) in ``text``."""
    return [line for line in text.splitlines() if line.startswith(f"{desc} ") and " images" in line]


def test_calibrate_and_evaluate_show_progress_lines_up_to_the_total(trained_bundle: dict, tmp_path: Path,
                                                                    capsys) -> None:
    from anomaly.cli import main

    bundle = tmp_path / "bundle"
    shutil.copytree(trained_bundle["bundle"], bundle)  # calibrate rewrites the sidecar: not the shared bundle's
    good = trained_bundle["data"] / "test" / "good"
    blob = trained_bundle["data"] / "test" / "blob"
    n = len(list(good.glob("*.png"))) + len(list(blob.glob("*.png")))
    assert main(["calibrate", str(bundle), "--normal", str(good), "--defects", str(blob), "--progress", "lines"]) == 0
    err = capsys.readouterr().err
    lines = _progress_lines(err, "calibrate")
    assert len(lines) == 1 and lines[0].startswith(f"calibrate {n}/{n} images (100%)") and " done in " in lines[0]
    assert "\r" not in err
    assert main(["calibrate", str(bundle), "--normal", str(good), "--progress", "none"]) == 0
    assert _progress_lines(capsys.readouterr().err, "calibrate") == []

    # evaluate on the shared bundle (calibrated on none of the test images), results outside it
    args = ["evaluate", str(trained_bundle["bundle"]), "--data", str(trained_bundle["data"])]
    assert main(args + ["--out", str(tmp_path / "ev.json"), "--progress", "lines"]) == 0
    captured = capsys.readouterr()
    lines = _progress_lines(captured.err, "evaluate")
    assert len(lines) == 1 and lines[0].startswith(f"evaluate {n}/{n} images (100%)") and " done in " in lines[0]
    assert "image  AUROC" in captured.out and not _progress_lines(captured.out, "evaluate")  # results stay on stdout
    assert main(args + ["--out", str(tmp_path / "ev2.json"), "--progress", "none"]) == 0
    assert _progress_lines(capsys.readouterr().err, "evaluate") == []


def test_audit_shows_progress_lines_with_skipped_flagged_and_failed(trained_bundle: dict, tmp_path: Path,
                                                                    capsys) -> None:
    from anomaly.cli import main

    good = trained_bundle["data"] / "test" / "good"
    blob = trained_bundle["data"] / "test" / "blob"
    n_good, n_blob = len(list(good.glob("*.png"))), len(list(blob.glob("*.png")))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    base = ["audit", str(trained_bundle["bundle"]), "--out", str(tmp_path / "audit"), "--no-heatmaps",
            "--thumbnail-size", "0"]
    assert main(base[:2] + [str(good), str(bad)] + base[2:] + ["--progress", "lines"]) == 0
    err = capsys.readouterr().err
    lines = _progress_lines(err, "audit")
    assert len(lines) == 1 and "\r" not in err
    assert lines[0].startswith(f"audit {n_good + 1}/{n_good + 1} images (100%)") and " failed=1 done in " in lines[0]
    assert "skipped=" not in lines[0] and " flagged=" in lines[0] and " images/s ETA " in lines[0]
    # resumed with more inputs: the total is what is left to do; those done before are shown
    assert main(base[:2] + [str(good), str(bad), str(blob)] + base[2:] + ["--progress", "lines"]) == 0
    captured = capsys.readouterr()
    lines = _progress_lines(captured.err, "audit")
    assert len(lines) == 1 and lines[0].startswith(f"audit {n_blob}/{n_blob} images (100%)")
    assert f" skipped={n_good + 1} " in lines[0] and " failed=0 done in " in lines[0]
    assert f"{n_good + n_blob + 1} images ({n_good + 1} from an earlier run)" in captured.out
    assert main(base[:2] + [str(good)] + base[2:] + ["--force", "--progress", "none"]) == 0
    assert _progress_lines(capsys.readouterr().err, "audit") == []


def test_export_shows_progress_lines_over_the_validation_inputs(trained_bundle: dict, tmp_path: Path,
                                                                capsys) -> None:
    import json

    from anomaly.cli import main

    n = len(json.loads((trained_bundle["run"] / "split.json").read_text())["val"])
    assert main(["export", str(trained_bundle["run"]), "--out", str(tmp_path / "b"), "--latent", "none",
                 "--progress", "lines"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("export ") and " inputs" in line]
    assert len(lines) == 1 and lines[0].startswith(f"export {n}/{n} inputs (100%)") and "\r" not in err
    assert main(["export", str(trained_bundle["run"]), "--out", str(tmp_path / "c"), "--latent", "none",
                 "--progress", "none"]) == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if " inputs" in line]

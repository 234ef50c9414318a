"""`anomaly audit --engine ray`: the same rows as the single-process audit, bad files as rows, and
nothing lost or duplicated when a Ray worker or the driver is killed mid-run. On a local Ray (2 CPUs),
as a laptop runs it; the same code runs on a cluster with ``--address``.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from anomaly.cli import main
from anomaly.deploy.audit import AuditError, run_audit

N_COPIES = 40  # of the fixture's 8 test images: 320 inputs, enough to kill something mid-run


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the in-process tests (its start-up costs seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(trained_bundle: dict, tmp_path_factory) -> Path:
    """320 copies of the fixture's test images, one broken file, one dangling link."""
    folder = tmp_path_factory.mktemp("ray_inputs")
    src = sorted((trained_bundle["data"] / "test").rglob("*.png"))
    for i in range(N_COPIES):
        for p in src:
            shutil.copy(p, folder / f"{p.parent.name}_{i:03d}_{p.name}")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    return folder


def _journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _worker_pids() -> list[int]:
    """Processes of the audit's Ray actors (Ray titles them ``ray::MapWorker(MapBatches(_Scorer))...``)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ray::MapWorker" in cmd and b"_Scorer" in cmd:
                pids.append(int(d.name))
    return pids


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for _ in fh)
    except FileNotFoundError:
        return 0


def test_ray_rows_equal_the_single_process_audit(local_ray, trained_bundle: dict, inputs: Path, tmp_path: Path) -> None:
    bundle = trained_bundle["bundle"]
    local = run_audit(bundle, [inputs], tmp_path / "local", masks=True)
    ray = run_audit(bundle, [inputs], tmp_path / "ray", masks=True, engine="ray", actors=2, batch_size=8)
    a = {r["path"]: r for r in _journal(tmp_path / "local")}
    b = _journal(tmp_path / "ray")
    assert len(b) == len(a) == 8 * N_COPIES + 2 and len({r["path"] for r in b}) == len(b)
    for r in b:
        ref = a[r["path"]]
        if ref["error"] is not None:  # the broken file and the dangling link: rows with an error
            assert r["error"] is not None and r["score"] is None
            continue
        assert r["error"] is None
        assert r["score"] == pytest.approx(ref["score"], rel=1e-6, abs=1e-7)
        assert (r["label"], r["regions"], r["heatmap"], r["mask"]) == (ref["label"], ref["regions"], ref["heatmap"], ref["mask"])
        assert (tmp_path / "ray" / r["mask"]).is_file()  # written by the actors
    assert sum(r["error"] is not None for r in b) == 2
    for key in ("images", "scored", "flagged", "failed"):
        assert ray[key] == local[key]
    with open(tmp_path / "ray" / "results.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(b)


def test_paths_reach_the_actors_in_order_whatever_their_encoding(local_ray) -> None:
    """The driver hands Ray blocks of bytes (os.fsencode), laid out as ``from_items`` would lay them out;
    the rows of real audits through these blocks are the test above."""
    from anomaly.deploy.ray_engine import _path_blocks

    odd = os.fsdecode(b"/line/caf\xe9.png")  # a Latin-1 file name: not UTF-8, a surrogate escape in Python
    paths = [f"/line/{i:04d}.png" for i in range(450)] + [odd]
    ds = _path_blocks(local_ray, paths)
    assert ds.num_blocks() == 200  # read_op_min_num_blocks (more than 2 per CPU here)
    blocks = local_ray.get(ds.to_arrow_refs())
    assert [os.fsdecode(b) for t in blocks for b in t.column("path").to_pylist()] == paths
    assert _path_blocks(local_ray, paths[:3]).num_blocks() == 3  # never an empty block


def test_manifests_with_a_path_column(trained_bundle: dict, inputs: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = sorted(str(p) for p in inputs.glob("good_00[0-4]_*.png"))
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["camera", "path"])
        w.writerows([["c1", p] for p in paths])
    pq.write_table(pa.table({"path": paths, "camera": ["c1"] * len(paths)}), tmp_path / "m.parquet")
    for name in ("m.csv", "m.parquet"):
        run_audit(trained_bundle["bundle"], [tmp_path / name], tmp_path / f"out_{name}", heatmaps="none")
        assert sorted(r["path"] for r in _journal(tmp_path / f"out_{name}")) == paths
    (tmp_path / "bad.csv").write_text("file,camera\nx.png,c1\n")
    with pytest.raises(AuditError, match="needs a 'path' column; found columns file, camera"):
        run_audit(trained_bundle["bundle"], [tmp_path / "bad.csv"], tmp_path / "out_bad")


def test_a_killed_ray_worker_loses_nothing(local_ray, trained_bundle: dict, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed: list[tuple[int, int]] = []
    stop = threading.Event()

    def killer() -> None:  # SIGKILL one actor process once the first rows are journaled
        while not stop.is_set():
            done = _lines(out / "results.jsonl")
            pids = _worker_pids()
            if done >= 16 and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append((pids[0], done))
                return
            time.sleep(0.005)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        run_audit(trained_bundle["bundle"], [inputs], out, heatmaps="none", engine="ray", actors=2, batch_size=4)
    finally:
        stop.set()
        t.join(5)
    assert killed, "no Ray worker was killed: the audit finished before any row was journaled"
    assert killed[0][1] < 8 * N_COPIES  # mid-run
    rows = [r["path"] for r in _journal(out)]
    assert len(rows) == len(set(rows)) == 8 * N_COPIES + 2


def test_a_killed_driver_resumes_without_loss_or_duplicates(local_ray, trained_bundle: dict, inputs: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    # a second driver on this test's Ray, as `--address HOST:PORT` joins a cluster
    address = local_ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "anomaly", "audit", str(trained_bundle["bundle"]), str(inputs), "--out", str(out),
           "--engine", "ray", "--address", address, "--actors", "2", "--batch-size", "4", "--no-heatmaps"]
    # its own process group, so that whatever it started dies with it (as when its machine dies)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _lines(out / "results.jsonl") < 24 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"the driver ended before it was killed (exit {proc.returncode})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    before = len(_journal(out))
    assert 0 < before < 8 * N_COPIES + 2
    # the same command again (here through this process's Ray): skips what is done, finishes
    assert main(["audit", str(trained_bundle["bundle"]), str(inputs), "--out", str(out), "--engine", "ray",
                 "--actors", "2", "--no-heatmaps"]) == 0
    rows = [r["path"] for r in _journal(out)]
    assert len(rows) == len(set(rows)) == 8 * N_COPIES + 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == before and summary["images"] == len(rows)


def test_ray_options_need_the_ray_engine(trained_bundle: dict, inputs: Path, tmp_path: Path, capsys) -> None:
    assert main(["audit", str(trained_bundle["bundle"]), str(inputs), "--out", str(tmp_path / "o"), "--actors", "2"]) == 2
    assert "--address and --actors are options of --engine ray" in capsys.readouterr().err
    with pytest.raises(AuditError, match="actors must be >= 1"):
        run_audit(trained_bundle["bundle"], [inputs], tmp_path / "o", engine="ray", actors=0)

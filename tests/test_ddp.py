"""Data-parallel training under torchrun: 2 CPU processes on gloo, tiny images, a few steps.

Each run is a real ``python -m torch.distributed.run --nproc-per-node N -m anomaly train ...``
subprocess (bounded by a timeout). A small driver wraps ``Trainer.fit`` so each rank dumps a
digest of its weights and buffers, its step count and why it stopped; it can also freeze one
rank's clock, so only a budget decided by rank 0 and broadcast stops that rank.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import make_mvtec

pytestmark = pytest.mark.torch

TIMEOUT_S = 90

DRIVER = textwrap.dedent('''
    """Run ``anomaly`` with each rank dumping what it holds after ``Trainer.fit``."""
    import hashlib, json, os, sys
    from pathlib import Path

    from anomaly.training import trainer as T

    _fit = T.Trainer.fit
    rank = os.environ.get("RANK", "0")

    def fit(self, *args, **kwargs):
        if os.environ.get("FREEZE_CLOCK_RANK") == rank:
            self.clock = lambda: 0.0  # this rank alone would never see the budget spent
        result = _fit(self, *args, **kwargs)
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        with open(Path(os.environ["DUMP_DIR"], f"rank{rank}.jsonl"), "a") as fh:
            fh.write(json.dumps({"objective": self.objective.name, "digest": h.hexdigest(),
                                 "global_step": self.global_step, "epoch": self.epoch, "stopped": result.stopped,
                                 "world_size": self.dist.world_size}) + "\\n")
        return result

    T.Trainer.fit = fit
    from anomaly.cli import main

    # several trainings one after the other in the same processes (and process group)
    extra = json.loads(os.environ.get("MORE_RUNS", "[]"))
    for argv in [sys.argv[1:], *extra]:
        status = main(argv)
        if status:
            sys.exit(status)
''')


def _torchrun(tmp: Path, nproc: int, args: list[str], dump: Path, more: list[list[str]] = (),
              **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc DRIVER train ARGS`` (then ``train MORE[i]`` in the
    same processes); kills the process group on timeout."""
    driver = tmp / "ddp_driver.py"
    if not driver.exists():
        driver.write_text(DRIVER)
    dump.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(driver), "train", *args, "--progress", "none"]
    full_env = {**os.environ, "DUMP_DIR": str(dump), "OMP_NUM_THREADS": "1",
                "MORE_RUNS": json.dumps([["train", *m, "--progress", "none"] for m in more]), **env}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=tmp)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s (a rank waiting on another?)\n{err[-3000:]}")
    assert proc.returncode == 0, f"torchrun exit {proc.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _dumps(dump: Path, nproc: int) -> list[list[dict]]:
    """Per rank, what each of its trainings held at the end, in order."""
    return [[json.loads(line) for line in (dump / f"rank{r}.jsonl").read_text().splitlines()] for r in range(nproc)]


def _losses(run: Path) -> list[dict]:
    with open(run / "losses.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _step_scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_mvtec(tmp_path_factory.mktemp("ddp") / "tiles", n_train=20, n_good=2, n_bad=2, size=32)


@pytest.fixture(scope="module")
def aae_run(data: Path, tmp_path_factory) -> dict:
    """2-process runs of the adversarial families, one after the other in the same processes: AAE
    (recon, D_latent, G_latent: three optimizers, alternating, batch norm), then DCGAN (D, G, E; E
    with G and D in eval mode) and CycleGAN (G, D over two generator/discriminator pairs)."""
    tmp = tmp_path_factory.mktemp("aae")
    run = tmp / "run"
    more = [["--data", str(data), "--out", str(tmp / m), "--model", m, "--image-size", "32", "--epochs", "1",
             "--batch-size", "8", "--no-tensorboard", "--model-kwargs", '{"base_channels": 8}'] for m in ("dcgan", "cyclegan")]
    proc = _torchrun(tmp, 2, _aae_args(data, run, epochs=2), tmp / "dump", more=more)
    return {"tmp": tmp, "run": run, "dump": _dumps(tmp / "dump", 2), "stdout": proc.stdout}


def _aae_args(data: Path, run: Path, epochs: int) -> list[str]:
    return ["--data", str(data), "--out", str(run), "--model", "aae", "--image-size", "32", "--epochs", str(epochs),
            "--batch-size", "8", "--model-kwargs", '{"latent_dim": 8, "base_channels": 8}']


def test_ranks_hold_identical_weights_and_only_rank0_writes(aae_run: dict) -> None:
    rank0, rank1 = aae_run["dump"]
    assert [r["objective"] for r in rank0] == [r["objective"] for r in rank1] == ["aae", "gan", "cyclegan"]
    # 17 training images (3 held out), global batch 8: 2 steps an epoch
    assert [r["global_step"] for r in rank0] == [r["global_step"] for r in rank1] == [4, 2, 2]
    for r0, r1 in zip(rank0, rank1):
        assert r0["world_size"] == r1["world_size"] == 2
        assert r0["digest"] == r1["digest"], r0["objective"]  # weights and batch-norm buffers, bit for bit
    rows = _losses(aae_run["run"])
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # one writer: no duplicated rows
    assert {"recon", "D_latent", "G_latent", "val_error"} <= set(rows[0])
    events = list((aae_run["run"] / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    assert aae_run["stdout"].count("done: 2 epochs") == 1  # rank 0 alone speaks


def test_resume_under_torchrun_and_rank0_decides_the_budget(aae_run: dict) -> None:
    """Resume the 2-process run with a budget spent after one step; rank 1's clock is frozen, so
    rank 1 stops with rank 0 only because rank 0's decision is broadcast."""
    tmp, run = aae_run["tmp"], aae_run["run"]
    data = Path(json.loads((run / "config.json").read_text())["data"])
    _torchrun(tmp, 2, [*_aae_args(data, run, epochs=6), "--resume", "--max-minutes", "0.00001"], tmp / "dump2",
              FREEZE_CLOCK_RANK="1")
    (r0,), (r1,) = _dumps(tmp / "dump2", 2)
    assert r0["stopped"] == r1["stopped"] == "time"
    assert r0["global_step"] == r1["global_step"] == 5  # 4 resumed + the one step of epoch 3
    assert r0["epoch"] == r1["epoch"] == 3
    assert r0["digest"] == r1["digest"]
    assert [int(r["epoch"]) for r in _losses(run)] == [1, 2, 3]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_follow_the_one_process_loss_curve(data: Path, tmp_path: Path, monkeypatch) -> None:
    """Same global batch (8) and seed: the 2-process run averages two half-batch gradients, which is
    the 1-process full-batch gradient up to float rounding. A deterministic model (AE, no batch
    norm, no augmentation) keeps every step's loss within 1e-4 relative of the 1-process run
    (measured: 1e-7)."""
    from anomaly.cli import main

    def args(run: Path) -> list[str]:
        return ["--data", str(data), "--out", str(run), "--model", "ae", "--image-size", "32", "--epochs", "3",
                "--batch-size", "8", "--augment", "none",
                "--model-kwargs", '{"latent_dim": 8, "base_channels": 8, "norm": "none"}']

    # the 1-process run: torchrun's environment for one process, here in the test's process
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    import torch.distributed

    try:
        assert main(["train", *args(tmp_path / "run1"), "--progress", "none"]) == 0
        assert torch.distributed.get_world_size() == 1
    finally:  # the group lives as long as its process: this one is pytest's
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k)
    _torchrun(tmp_path, 2, args(tmp_path / "run2"), tmp_path / "dump2")
    curves = {n: (_step_scalars(tmp_path / f"run{n}" / "tensorboard", "recon/recon"), _losses(tmp_path / f"run{n}"))
              for n in (1, 2)}
    (steps1, rows1), (steps2, rows2) = curves[1], curves[2]
    assert [s for s, _ in steps1] == [s for s, _ in steps2] == list(range(6))
    for (_, a), (_, b) in zip(steps1, steps2):
        assert b == pytest.approx(a, rel=1e-4)
    # the tolerance tells batches apart: the global batches' losses spread far wider than 1e-4, so
    # a rank reading the wrong images (another global batch) would fail the comparison above
    values = [v for _, v in steps1]
    assert (max(values) - min(values)) / min(values) > 10 * 1e-4
    for a, b in zip(rows1, rows2):
        assert float(b["val_error"]) == pytest.approx(float(a["val_error"]), rel=1e-4)


def test_a_ddp_checkpoint_exports_and_audits_like_any_other(aae_run: dict, data: Path) -> None:
    """The checkpoint is the bare model's (no ``module.`` prefixes): it loads strictly, exports, and
    the audit scores every image as the runtime does."""
    import numpy as np

    from anomaly.cli import main
    from anomaly.deploy.export import export_run
    from anomaly.deploy.runtime import Runtime
    from anomaly.training.run import load_run

    model, ckpt, _ = load_run(aae_run["run"])  # load_state_dict(strict=True) inside
    assert not any(k.startswith("module.") for k in ckpt["model_state"])
    bundle = export_run(aae_run["run"], aae_run["tmp"] / "bundle", latent="none")
    out = aae_run["tmp"] / "audit"
    assert main(["audit", str(bundle), str(data / "test"), "--out", str(out)]) in (0, 1)  # 1: defects found
    with open(out / "results.csv", newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    images = sorted(str(p) for p in (data / "test").rglob("*.png"))
    assert sorted(rows) == images
    expected = {r.path: r.score for r in Runtime(bundle, device="cpu").score_paths(images)}
    for path, row in rows.items():
        assert not row.get("error")
        assert np.isfinite(float(row["score"]))
        assert float(row["score"]) == pytest.approx(expected[path], rel=1e-5)

"""Wall time per training epoch with 1 and N data-parallel processes (torchrun, gloo on CPU / nccl on GPU).

Trains the same model on the same generated images (smooth textures, like the test fixtures)
with each launch below and reads each epoch's seconds from the run's ``losses.csv``. The first
epoch also decodes and caches the images, so the table reports the median of the later epochs,
and the whole command's wall time (process start, imports and process-group set-up included):

- ``plain, T threads``: ``anomaly train`` in one process with T torch threads (the default launch);
- ``torchrun xN``: ``torchrun --standalone --nproc-per-node N -m anomaly train ...``, one torch
  thread a process on CPU (torchrun's own default), ``--batch-size`` the global batch.

On a machine with C cores, N processes of one thread compete with one process of C threads: on
2 cores expect little gain. On a multi-GPU node run it with ``--device cuda --nprocs 1 8``.

Usage::

    python benchmarks/ddp_scaling.py --images 256 --image-size 64 --epochs 4 --nprocs 1 2
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_images(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` grayscale textures (periodic pattern, random phase, noise) as PNGs in ``root/train/good``."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    folder = root / "train" / "good"
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi)
        img = 0.5 + 0.2 * np.sin(2 * np.pi * xx / 16 + phase) * np.cos(2 * np.pi * yy / 16)
        img += rng.normal(0, 0.02, img.shape)
        cv2.imwrite(str(folder / f"{i:05d}.png"), (np.clip(img, 0, 1) * 255).astype(np.uint8))
    return root


def run(cmd: list[str], env: dict[str, str], out: Path) -> dict:
    """Run one training command; returns its wall time and per-epoch seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(out / "losses.csv", newline="") as fh:
        seconds = [float(r["seconds"]) for r in csv.DictReader(fh)]
    return {"wall": wall, "epochs": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256, help="training images to generate")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--model", default="aae")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32, help="the global batch")
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="torchrun process counts")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch threads of the plain one-process runs (default: 1 and the CPU count)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--workdir", default=None, help="where data and runs go (default: a temporary folder)")
    args = ap.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ddp_scaling_"))
    data = make_images(work / "data", args.images, args.image_size)
    common = ["train", "--data", str(data), "--model", args.model, "--image-size", str(args.image_size),
              "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--device", args.device,
              "--val-fraction", "0.1", "--no-tensorboard", "--progress", "none"]
    base_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    threads = args.threads or sorted({1, os.cpu_count() or 1})
    launches: list[tuple[str, list[str], dict[str, str]]] = []
    if args.device == "cpu":
        for t in threads:
            launches.append((f"plain, {t} thread{'s' if t > 1 else ''}", [sys.executable, "-m", "anomaly"],
                             {**base_env, "OMP_NUM_THREADS": str(t)}))
    else:
        launches.append(("plain", [sys.executable, "-m", "anomaly"], base_env))
    for n in args.nprocs:
        env = {**base_env, "OMP_NUM_THREADS": "1"} if args.device == "cpu" else base_env
        launches.append((f"torchrun x{n}", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                            f"--nproc-per-node={n}", "-m", "anomaly"], env))

    print(f"{args.model} at {args.image_size} px, {args.images} images (90% train), global batch {args.batch_size}, "
          f"{args.epochs} epochs, device {args.device}, {os.cpu_count()} CPUs")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    head = f"| launch | s/epoch (median of epochs 2-{args.epochs}) | first epoch s | whole command s | speed-up/epoch |"
    print(head)
    print("|---|---:|---:|---:|---:|")
    reference = None
    for i, (name, prefix, env) in enumerate(launches):
        out = work / f"run{i}"
        r = run([*prefix, *common, "--out", str(out)], env, out)
        later = r["epochs"][1:] or r["epochs"]
        per_epoch = statistics.median(later)
        reference = reference or per_epoch
        print(f"| {name} | {per_epoch:.2f} | {r['epochs'][0]:.2f} | {r['wall']:.1f} | {reference / per_epoch:.2f}x |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

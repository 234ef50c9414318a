"""Peak memory of ``anomaly export`` for a large validation set.

Writes ``--n-val`` + ``--n-train`` generated 64x64 grayscale textures into a plain folder, trains
the default AAE (64², the default widths) for one epoch with that many images held out for
validation, then exports the run in a child process and prints the child's peak RSS
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``) and wall time.

Example::

    .venv/bin/python benchmarks/export_memory.py --work /tmp/export_mem --n-val 2000
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

_CHILD = """
import sys, torch
torch.set_num_threads(2)
from anomaly.deploy.export import export_run
export_run(sys.argv[1], sys.argv[2])
"""


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = 0.5 + 0.2 * np.sin(2 * np.pi * xx / 16 + rng.uniform(0, 6.3)) * np.cos(2 * np.pi * yy / 16)
    img += rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="scratch folder (data, run, bundle)")
    ap.add_argument("--n-val", type=int, default=2000)
    ap.add_argument("--n-train", type=int, default=100)
    ap.add_argument("--size", type=int, default=64, help="side of the generated images and of the model input")
    args = ap.parse_args(argv)

    work = Path(args.work)
    data, run, bundle = work / "data", work / "run", work / "bundle"
    n = args.n_val + args.n_train
    if not (run / "checkpoints" / "best.pt").is_file():
        import torch

        from anomaly.training.config import TrainConfig
        from anomaly.training.run import train

        torch.set_num_threads(2)
        data.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(n):
            cv2.imwrite(str(data / f"{i:05d}.png"), _texture(rng, args.size))
        train(TrainConfig(data=str(data), out=str(run), image_size=args.size, epochs=1, val_fraction=args.n_val / n,
                          device="cpu"))
    n_val = len(json.loads((run / "split.json").read_text())["val"])
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", _CHILD, str(run), str(bundle)], check=True)
    seconds = time.monotonic() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    print(f"export of {n_val} validation images ({args.size}x{args.size}, default aae): peak RSS {peak_mib:.0f} MiB, "
          f"{seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

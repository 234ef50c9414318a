"""A learning-free yardstick for ELPV: how far a hand-made descriptor of dark spots gets.

Every learned score on ELPV poly has stopped at 0.83-0.85 image AUROC (the 2026-11-22 trials
in ``benchmarks/results/``). This measures what no model at all gives on the same split: each cell is
cut into a ``g x g`` grid, each block described by its ``q``-th intensity percentile over the
cell's median (dark spots against the cell's own brightness), and a test cell is scored by the mean
distance of its standardised descriptor to its 5 nearest training cells. With ``--audit`` (the
``results.csv`` of an ``anomaly audit`` of the same ``test/`` folder) it also sums the descriptor's
score, standardised on ``calibrate/good``, with the bundle's scores (already standardised by the
export) at a few weights.

Usage::

    anomaly demo --cell-type poly --out /tmp/poly_demo
    python benchmarks/elpv_descriptor.py /tmp/poly_demo/data/elpv_poly --audit /tmp/poly_demo/audit/results.csv
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _load(folder: Path, size: int | None) -> tuple[list[str], list[np.ndarray]]:
    import cv2

    from anomaly.data.io import list_images

    paths = [str(p) for p in list_images(folder)]
    images = []
    for p in paths:
        im = cv2.imread(p, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
        images.append(cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) if size else im)
    return paths, images


def descriptor(image: np.ndarray, grid: int, q: float) -> np.ndarray:
    """``(grid * grid,)``: each block's ``q``-th percentile over the image's median."""
    h, w = image.shape[0] // grid, image.shape[1] // grid
    blocks = image[:h * grid, :w * grid].reshape(grid, h, grid, w).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    return np.percentile(blocks, q, axis=1) / max(float(np.median(image)), 1e-6)


def main(argv: list[str] | None = None) -> int:
    from sklearn.metrics import roc_auc_score
    from sklearn.neighbors import NearestNeighbors

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="an ELPV category folder (train/good, calibrate/good, test/good, test/defective)")
    p.add_argument("--audit", default=None, help="results.csv of an audit of DATA/test, to sum with")
    p.add_argument("--configs", default="none:4:10,none:6:5,none:8:5,64:4:10,64:8:5",
                   help="size:grid:percentile triples (size none: the original 300 px) (default: %(default)s)")
    args = p.parse_args(argv)
    data = Path(args.data)
    for sub in ("train/good", "test/good", "test/defective"):
        if not (data / sub).is_dir():
            p.error(f"{data / sub}: no such folder")
    bundle_scores = None
    if args.audit:
        with open(args.audit, newline="", encoding="utf-8") as fh:
            bundle_scores = {os.path.abspath(r["path"]): float(r["score"]) for r in csv.DictReader(fh) if r["score"]}
    print(f"{'size':>5} {'grid':>4} {'pct':>4} {'descriptor':>10}" + ("  bundle  sum w=1  w=2  w=3" if bundle_scores else ""))
    for item in args.configs.split(","):
        size_s, grid_s, q_s = item.split(":")
        size = None if size_s == "none" else int(size_s)
        grid, q = int(grid_s), float(q_s)
        feats = {}
        paths = {}
        for sub in ("train/good", "calibrate/good", "test/good", "test/defective"):
            if (data / sub).is_dir():
                paths[sub], images = _load(data / sub, size)
                feats[sub] = np.array([descriptor(im, grid, q) for im in images])
        mu, sd = feats["train/good"].mean(0), feats["train/good"].std(0) + 1e-6
        nn = NearestNeighbors(n_neighbors=5).fit((feats["train/good"] - mu) / sd)
        score = {k: nn.kneighbors((v - mu) / sd)[0].mean(1) for k, v in feats.items()}
        y = np.r_[np.zeros(len(score["test/good"])), np.ones(len(score["test/defective"]))]
        s = np.r_[score["test/good"], score["test/defective"]]
        line = f"{size_s:>5} {grid:>4} {q:>4g} {roc_auc_score(y, s):10.3f}"
        if bundle_scores is not None:
            ref = score.get("calibrate/good", score["train/good"])
            z = (s - ref.mean()) / (ref.std() + 1e-12)
            test_paths = paths["test/good"] + paths["test/defective"]
            b = np.array([bundle_scores[os.path.abspath(t)] for t in test_paths])
            line += f"  {roc_auc_score(y, b):6.3f}" + "".join(f" {roc_auc_score(y, b + w * z):5.3f}" for w in (1, 2, 3))
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ELPV poly trial (2026-12-04): does a cell's *context* explain away the scores of normal cells?

The AAE's poly scores vary from module to module: in some modules every normal cell scores
below -2.5 (bright, clean cells), and their cracked cells score below the typical normal cell of
other modules. Two corrections, both fitted on normal cells only, are measured here against the
bundle's plain score (image AUROC, held-out functional vs defective cells):

1. ``appearance``: subtract what a cell's global appearance predicts for a normal cell's score.
   Features of the 260 px centre: median, 95th and 5th percentiles of the intensity, the median
   of 20 px block standard deviations and of the absolute high-pass (σ 3) response; the
   prediction is a 15-nearest-neighbour, ridge or Huber regression fitted on normal cells'
   scores (``calibrate/good``, ``train/good``, or both), clipped to their range.
2. ``module``: subtract the median score of the cells whose file numbers lie within ``w`` of the
   cell's own (ELPV numbers the cells of a module consecutively; the dataset names no modules):
   over every cell of the split ("all", transductive) or the normal training/calibration cells
   only.

Usage (after ``anomaly demo --cell-type poly --out DEMO``)::

    python benchmarks/elpv_context.py DEMO/data/elpv_poly DEMO/bundle
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPLITS = ("train/good", "calibrate/good", "test/good", "test/defective")


def bundle_scores(root: Path, bundle: str) -> dict[str, dict[str, float]]:
    """The bundle's score of every cell of the four splits, by file name."""
    from anomaly.deploy.runtime import Runtime

    rt = Runtime(bundle, device="cpu")
    out = {}
    for split in SPLITS:
        paths = sorted(str(p) for p in (root / split).glob("*.png"))
        out[split] = {Path(p).name: r.score for p, r in zip(paths, rt.score_paths(paths))}
    return out


def appearance(path: Path) -> list[float]:
    """Global appearance of one cell (see the module docstring), least touched by a local defect."""
    import cv2

    c = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32)[20:280, 20:280]
    high = np.abs(c - cv2.GaussianBlur(c, (0, 0), 3))
    blocks = c.reshape(13, 20, 13, 20).std(axis=(1, 3))
    return [float(np.median(c)), float(np.percentile(c, 95)), float(np.median(blocks)), float(np.median(high)),
            float(np.percentile(c, 5))]


def main(argv: list[str] | None = None) -> int:
    from sklearn.linear_model import HuberRegressor, Ridge
    from sklearn.metrics import roc_auc_score
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="the ELPV category folder of `anomaly demo` (train/, calibrate/, test/)")
    ap.add_argument("bundle", help="the bundle that scores it")
    args = ap.parse_args(argv)

    sc = bundle_scores(args.root, args.bundle)
    feats = {s: np.array([appearance(args.root / s / n) for n in v]) for s, v in sc.items()}
    score = {s: np.array(list(v.values())) for s, v in sc.items()}
    y_test = np.r_[score["test/good"], score["test/defective"]]
    x_test = np.vstack([feats["test/good"], feats["test/defective"]])
    truth = np.r_[np.zeros(len(score["test/good"])), np.ones(len(score["test/defective"]))]
    print(f"bundle score alone: AUROC {roc_auc_score(truth, y_test):.4f}\n")

    print("| appearance fitted on | features | knn15 | ridge | huber |\n|---|---|---|---|---|")
    columns = {"median": [0], "median, p95": [0, 1], "+ block std, high-pass": [0, 1, 2, 3], "+ p5": [0, 1, 2, 3, 4]}
    for fit_on in ("calibrate/good", "train/good", "both"):
        parts = ("calibrate/good", "train/good") if fit_on == "both" else (fit_on,)
        x, y = np.vstack([feats[p] for p in parts]), np.concatenate([score[p] for p in parts])
        for name, cols in columns.items():
            scale = StandardScaler().fit(x[:, cols])
            row = []
            for reg in (KNeighborsRegressor(15), Ridge(1.0), HuberRegressor()):
                reg.fit(scale.transform(x[:, cols]), y)
                predicted = np.clip(reg.predict(scale.transform(x_test[:, cols])), y.min(), y.max())
                row.append(f"{roc_auc_score(truth, y_test - predicted):.4f}")
            print(f"| {fit_on} | {name} | " + " | ".join(row) + " |")

    every = {int(n[4:8]): (v, s) for s, d in sc.items() for n, v in d.items()}
    ids = np.array(sorted(every))
    values = np.array([every[i][0] for i in ids])
    normal_pool = np.array([every[i][1] in ("train/good", "calibrate/good") for i in ids])
    tests = [i for i in ids if every[i][1].startswith("test/")]
    labels = np.array([every[i][1] == "test/defective" for i in tests])
    print("\n| module window w (file numbers) | minus median of all cells | minus median of normal cells |\n|---|---|---|")
    for w in (5, 10, 15, 20, 30):
        row = []
        for pool in (np.ones_like(normal_pool), normal_pool):
            r = []
            for i in tests:
                near = (np.abs(ids - i) <= w) & (ids != i) & pool
                r.append(every[i][0] - (np.median(values[near]) if near.any() else 0.0))
            row.append(f"{roc_auc_score(labels, r):.4f}")
        print(f"| {w} | " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

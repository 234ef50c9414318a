"""The scikit-learn-style ``AnomalyDetector`` on real ELPV cells, end to end, against its own bundle.

Fits the default detector on the demo split's training cells given as one uint8 array (the
in-memory path a notebook takes), calibrates on the held-out normal cells, then scores the test
cells in torch (``decision_function``) and through the bundle that ``save`` writes (onnxruntime),
and prints both AUROCs, the largest score difference, whether every label agrees, and the times.

Usage::

    python benchmarks/detector_elpv.py --work /tmp/det [--cell-type mono|poly] [--epochs 100]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import cv2
    from sklearn.metrics import roc_auc_score

    from anomaly import AnomalyDetector, Runtime
    from anomaly.data.elpv import prepare_elpv

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the split, the run and the bundle")
    ap.add_argument("--cell-type", default="mono", choices=("mono", "poly"))
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    root = prepare_elpv(args.work / "data", args.cell_type)
    train = np.stack([cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((root / "train" / "good").glob("*.png"))])
    good = sorted(str(p) for p in (root / "test" / "good").glob("*.png"))
    bad = sorted(str(p) for p in (root / "test" / "defective").glob("*.png"))
    files, y = good + bad, np.r_[np.zeros(len(good)), np.ones(len(bad))]

    t = time.perf_counter()
    det = AnomalyDetector(epochs=args.epochs, seed=args.seed, work_dir=args.work / "detector").fit(train)
    fit_s = time.perf_counter() - t
    det.calibrate(root / "calibrate" / "good")
    t = time.perf_counter()
    scores, labels = det.decision_function(files), det.predict(files)
    torch_s = time.perf_counter() - t
    rt = Runtime(det.save(args.work / "bundle"), device="cpu")
    t = time.perf_counter()
    results = list(rt.score_paths(files))
    ort_s = time.perf_counter() - t
    deployed = np.array([r.score for r in results])

    print(f"ELPV {args.cell_type}: fit on {train.shape} {train.dtype} in {fit_s:.0f} s ({args.epochs} epochs, seed {args.seed}); "
          f"threshold {det.threshold_:.4f} from {det.calibration_source_['images']} held-out normal cells")
    print(f"| scored by | test AUROC | flagged | seconds for {len(files)} cells |\n|---|---|---|---|")
    print(f"| AnomalyDetector (torch) | {roc_auc_score(y, scores):.4f} | {int(labels.sum())} | {torch_s:.1f} |")
    print(f"| its bundle (onnxruntime) | {roc_auc_score(y, deployed):.4f} | {sum(r.label for r in results)} | {ort_s:.1f} |")
    print(f"max |score difference| {np.abs(deployed - scores).max():.2e} (normal score std "
          f"{det.calibrator_.normal_stats_['std']:.3f}); labels equal: {[r.label for r in results] == labels.tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Post-hoc colour trial: how an RGB model's residual channels are combined into one map.

The exported ``l1`` scoring averages ``|x - x_hat|`` over R, G and B, in which luma dominates: a hue
change at constant luma (``discolour`` defects of the ``ihc`` texture) moves it little. This script
takes the ``l1`` bundles of RGB models that ``benchmarks/quality.py --datasets ihc --channels 3``
exported, keeps their reconstructions, and compares channel combinations on the same residuals:

* ``l1_mean``: mean over R, G, B of ``|d|`` (what the bundle computes);
* ``l1_max``: max over R, G, B; ``l2``: Euclidean norm over R, G, B;
* ``ycc_l1``: mean of ``|dY|, |dCb|, |dCr|`` (BT.601; chroma gets two of three votes);
* ``rgb_chan_std`` / ``ycc_chan_std``: each channel's ``|d|`` divided by its mean on 100 training
  images first (per-channel standardisation).

Every map is smoothed with a Gaussian of sigma 2 px, as the bundles' maps are, and scored with
pixel AUROC and AUPRO overall, and pixel AUROC per defect kind (normal images against that kind).

    python benchmarks/quality.py --datasets ihc --configs ae --seeds 0,1,2 --epochs 30 --image-size 128 \\
        --texture-test 200 --threads 1 --channels 3 --out OUT
    python benchmarks/colour_residual.py OUT/data/ihc_128_test200 OUT/bundles --model ae --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: RGB -> (Y, Cb, Cr) differences, BT.601 (no offsets: these are residuals).
YCC = np.array([[0.299, 0.587, 0.114], [-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]], np.float32)


def inputs_and_reconstructions(rt, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed inputs and the bundle's reconstructions, both ``(N, 3, S, S)``."""
    from anomaly.data.io import read_image

    images = [read_image(p) for p in paths]
    recs = np.stack([r.reconstruction for r in rt.score_images(images, keep_reconstruction=True)])
    return np.stack([rt.preprocess(im) for im in images]), recs


def channel_maps(x: np.ndarray, rec: np.ndarray, scale: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every channel combination of the residual ``x - rec``: name -> smoothed ``(N, S, S)`` maps."""
    import cv2

    d = x - rec
    ycc = np.einsum("ij,njhw->nihw", YCC, d)
    raw = {"l1_mean": np.abs(d).mean(1), "l1_max": np.abs(d).max(1), "l2": np.sqrt((d ** 2).sum(1)),
           "ycc_l1": np.abs(ycc).mean(1),
           "rgb_chan_std": (np.abs(d) / scale["rgb"][None, :, None, None]).mean(1),
           "ycc_chan_std": (np.abs(ycc) / scale["ycc"][None, :, None, None]).mean(1)}
    return {k: np.stack([cv2.GaussianBlur(m, (0, 0), 2) for m in v]) for k, v in raw.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="the ihc data set folder quality.py wrote (OUT/data/ihc_128_test200)")
    p.add_argument("bundles", help="quality.py's OUT/bundles (holds ihc__MODEL__l1__sSEED__c3)")
    p.add_argument("--model", default="ae", help="config whose l1 bundles to read (ae, aae)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import cv2

    from anomaly.metrics import aupro, pixel_metrics
    from anomaly.data.folder import discover
    from anomaly.deploy.runtime import Runtime

    layout = discover(Path(args.data))
    test = layout.test
    size = cv2.imread(str(test[0].path), cv2.IMREAD_UNCHANGED).shape[0]  # the data set's side (maps are at it too)
    masks = np.stack([(cv2.imread(str(s.mask), cv2.IMREAD_GRAYSCALE) > 127) if s.mask else np.zeros((size, size), bool)
                      for s in test]).astype(np.uint8)
    kinds = np.array([s.defect_type for s in test])
    labels = np.array([s.label for s in test])
    rows: dict[str, list[dict[str, float]]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        bundle = Path(args.bundles) / f"ihc__{args.model}__l1__s{seed}__c3"
        if not bundle.is_dir():
            p.error(f"{bundle}: no such bundle; run benchmarks/quality.py with --channels 3 first")
        rt = Runtime(bundle, device="cpu", threads=args.threads)
        xt, rect = inputs_and_reconstructions(rt, [str(s.path) for s in layout.train[:100]])
        d = xt - rect
        scale = {"rgb": np.abs(d).mean((0, 2, 3)), "ycc": np.abs(np.einsum("ij,njhw->nihw", YCC, d)).mean((0, 2, 3))}
        x, rec = inputs_and_reconstructions(rt, [str(s.path) for s in test])
        for name, maps in channel_maps(x, rec, scale).items():
            row = {"pixel_auroc": pixel_metrics(masks, maps)["pixel_auroc"], "aupro": aupro(masks, maps)}
            for kind in sorted(set(kinds[labels == 1])):
                sel = (labels == 0) | (kinds == kind)
                row[kind] = pixel_metrics(masks[sel], maps[sel])["pixel_auroc"]
            rows.setdefault(name, []).append(row)
        print(f"# seed {seed}: mean |d| per channel, RGB {np.round(scale['rgb'], 4)}, YCbCr {np.round(scale['ycc'], 4)}",
              flush=True)
    cols = list(next(iter(rows.values()))[0])
    print(f"\n{args.model}, {len(next(iter(rows.values())))} seed(s), mean (pixel AUROC per kind):\n")
    print("| combination | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, rs in rows.items():
        print(f"| {name} | " + " | ".join(f"{np.mean([r[c] for r in rs]):.3f}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

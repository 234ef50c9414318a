"""Post-hoc texture trial: a map of local texture statistics, alone and summed with a bundle's map.

The weak kind on grass is the foreign blob: a patch of another texture whose brightness differs from
its surroundings by 0.12-0.3, which the CycleGAN repair's segmenter finds at 0.85-0.87 pixel AUROC.
A patch of brick or gravel in grass differs in its local statistics (contrast, gradient energy, blob
scale) even where it looks like one more leaf. This script measures such a map with no learning,
:class:`anomaly.texture_stats.StatisticsMap` (9 statistics per pixel, nearest of ``--centres`` k-means
centres of the run's training images' statistics, ``split.json``'s train part), smoothed with a
Gaussian of sigma 2 px as the bundles' maps are.

The sum with a bundle's map standardises each on the run's *validation* images (normal, held out from
training: ``split.json``'s val part), then adds them (``--weights``). Image score: mean of the top 1 %
of the map, as the bundles'. Pixel AUROC, AUPRO and image AUROC over the test set, per defect kind too.

    python benchmarks/quality.py --datasets grass --configs cyclegan_repair_segdiff_decay --seeds S \\
        --epochs 60 --image-size 128 --threads 1 --tta both --texture-test 200 --out OUT_S
    python benchmarks/texture_stats.py --data OUT_0/data/grass_128_test200 \\
        --runs OUT_0 OUT_1 OUT_2 --bundle grass__cyclegan_repair_segdiff_decay__learned+tta__s{seed} --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

class StatisticsMap:
    """The product's statistics map (:mod:`anomaly.texture_stats`), fitted on training images."""

    def __init__(self, train_images: list[np.ndarray], centres: int = 1024, seed: int = 0) -> None:
        import torch

        from anomaly.texture_stats import StatisticsMap as Module, fit_statistics_bank

        self.torch = torch
        batches = [torch.from_numpy(np.stack(train_images[i:i + 32]))[:, None] for i in range(0, len(train_images), 32)]
        self.module = Module()
        self.module.set_bank(*fit_statistics_bank(batches, centres=centres, seed=seed))

    def maps(self, images: list[np.ndarray]) -> np.ndarray:
        """``(N, H, W)`` maps, smoothed with a Gaussian of sigma 2 px as the bundles' maps are."""
        from anomaly.scoring import gaussian_blur

        out = []
        with self.torch.no_grad():
            for i in range(0, len(images), 32):
                x = self.torch.from_numpy(np.stack(images[i:i + 32]))[:, None]
                out.append(gaussian_blur(self.module(x), 2.0)[:, 0].numpy())
        return np.concatenate(out)


def read_gray(path: str, size: int) -> np.ndarray:
    import cv2

    im = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if im is None:
        raise SystemExit(f"texture_stats: cannot read {path}")
    if im.shape != (size, size):
        im = cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA)
    return im.astype(np.float32) / 255.0


def test_set(data: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Test image paths, their kinds, and their ``(N, H, W)`` masks (zeros for good images), from the
    data set's layout (:func:`anomaly.data.folder.discover`)."""
    import cv2

    from anomaly.data.folder import discover

    test = discover(data).test
    masks = [(cv2.imread(str(s.mask), cv2.IMREAD_GRAYSCALE) > 127).astype(np.uint8) if s.mask else None for s in test]
    shape = next(m.shape for m in masks if m is not None)
    masks = [np.zeros(shape, np.uint8) if m is None else m for m in masks]
    return [str(s.path) for s in test], np.array([s.defect_type for s in test]), np.stack(masks)


def evaluate(maps: np.ndarray, masks: np.ndarray, kinds: np.ndarray) -> dict:
    from anomaly.metrics import aupro, image_metrics, pixel_metrics

    k = max(1, int(round(0.01 * maps[0].size)))
    scores = np.array([np.sort(m.ravel())[-k:].mean() for m in maps])
    labels = (kinds != "good").astype(int)
    out = {"image_auroc": image_metrics(labels, scores)["auroc"],
           "pixel_auroc": pixel_metrics(masks, maps)["pixel_auroc"], "aupro": aupro(masks, maps)}
    good = kinds == "good"
    for kind in sorted(set(kinds) - {"good"}):
        sel = good | (kinds == kind)
        out[kind] = [pixel_metrics(masks[sel], maps[sel])["pixel_auroc"], aupro(masks[sel], maps[sel])]
    return out


def bundle_maps(bundle: Path, paths: list[str]) -> np.ndarray:
    from anomaly.deploy.runtime import Runtime

    rt = Runtime(bundle, device="cpu", threads=2)
    try:
        return np.stack([r.anomaly_map for r in rt.score_paths(paths)])
    finally:
        rt.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the texture data set (test/, ground_truth/)")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="quality.py --out folders, one per seed")
    p.add_argument("--bundle", required=True, help="bundle name under RUNS/bundles, with {seed}")
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--centres", type=int, default=1024)
    p.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--json", type=Path, help="write every row here")
    args = p.parse_args(argv)
    if len(args.runs) != len(args.seeds):
        raise SystemExit("texture_stats: give one --runs folder per seed")

    paths, kinds, masks = test_set(args.data)
    size = masks.shape[-1]
    rows = []
    for seed, out in zip(args.seeds, args.runs):
        splits = list((out / "runs").glob(f"*__s{seed}/split.json"))
        if len(splits) != 1:
            raise SystemExit(f"texture_stats: expected one run with seed {seed} under {out / 'runs'}, found {len(splits)}")
        split = json.loads(splits[0].read_text())
        stats = StatisticsMap([read_gray(q, size) for q in split["train"]], centres=args.centres, seed=seed)
        feat = stats.maps([read_gray(q, size) for q in paths])
        feat_val = stats.maps([read_gray(q, size) for q in split["val"]])
        bundle = out / "bundles" / args.bundle.format(seed=seed)
        learned, learned_val = bundle_maps(bundle, paths), bundle_maps(bundle, split["val"])

        def z(m: np.ndarray, ref: np.ndarray) -> np.ndarray:
            return (m - ref.mean()) / (ref.std() + 1e-8)

        variants = {"bundle": learned, "statistics": feat}
        for w in args.weights:
            variants[f"bundle + {w:g} x statistics"] = z(learned, learned_val) + w * z(feat, feat_val)
        for name, maps in variants.items():
            row = {"seed": seed, "map": name, **evaluate(maps, masks, kinds)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    names = list(dict.fromkeys(r["map"] for r in rows))
    kind_names = sorted(set(kinds) - {"good"})
    print(f"\n| map | image AUROC | pixel AUROC | AUPRO | {' | '.join(kind_names)} (pixel AUROC / AUPRO) |")
    print("|---|---|---|---|" + "---|" * len(kind_names))
    for name in names:
        sel = [r for r in rows if r["map"] == name]
        cells = [f"{np.mean([r[k] for r in sel]):.3f} ± {np.std([r[k] for r in sel]):.3f}"
                 for k in ("image_auroc", "pixel_auroc", "aupro")]
        cells += [f"{np.mean([r[k][0] for r in sel]):.3f} / {np.mean([r[k][1] for r in sel]):.3f}" for k in kind_names]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

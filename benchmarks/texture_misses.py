"""Which texture defects a bundle finds and which it misses outright, per defect kind.

AUPRO averages, over defects, the share of each defect's pixels above a threshold. A low AUPRO can
mean every defect half lit, or some defects fully lit and the rest dark; only the second is past
help from smoothing or region filling. This prints, per kind, at the map value that ``--fpr`` of
the normal test pixels exceed (normal images' pixels and defective images' pixels outside the
masks): the mean share of a defect's pixels above it, the defects more than half above it
(``found``) and those with less than a tenth (``missed``). ``--panel`` draws the worst misses of one
kind: the crop, the crop with the mask's outline, and the map (JET, 0 to twice the threshold).

    python benchmarks/texture_misses.py --data OUT/data/grass_128_test200 \\
        --bundle OUT/bundles/grass__cyclegan_repair_segdiff_decay__learned+stats+tta__s0 \\
        [--fpr 0.05 0.01] [--panel misses.png --kind foreign]

``--data`` is a texture data set as ``benchmarks/quality.py`` writes it (``test/``, ``ground_truth/``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)


def coverage(maps: np.ndarray, masks: np.ndarray, kinds: np.ndarray, fpr: float) -> tuple[float, dict[str, np.ndarray]]:
    """The threshold that ``fpr`` of the normal pixels exceed, and per kind each defect's share of
    pixels above it (``maps``, ``masks``: ``(N, H, W)``; ``kinds``: ``(N,)``, ``"good"`` for normal)."""
    good = kinds == "good"
    normal = np.concatenate([maps[good].ravel(), maps[~good][masks[~good] == 0]])
    t = float(np.quantile(normal, 1.0 - fpr))
    out = {}
    for kind in sorted(set(kinds) - {"good"}):
        idx = np.flatnonzero(kinds == kind)
        out[kind] = np.array([(maps[i][masks[i] > 0] > t).mean() if masks[i].any() else np.nan for i in idx])
    return t, out


def panel(path: Path, image_paths: list[str], maps: np.ndarray, masks: np.ndarray, order: np.ndarray,
          threshold: float, rows: int = 6) -> None:
    """Write the ``rows`` first images of ``order``: crop | crop with the mask outlined | map."""
    import cv2

    strips = []
    for i in order[:rows]:
        img = cv2.imread(image_paths[i], cv2.IMREAD_COLOR)
        outlined = img.copy()
        contours, _ = cv2.findContours(masks[i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(outlined, contours, -1, (0, 0, 255), 1)
        level = np.clip(maps[i] / (2.0 * threshold) * 255.0, 0, 255).astype(np.uint8) if threshold > 0 else \
            np.zeros(maps[i].shape, np.uint8)
        heat = cv2.resize(cv2.applyColorMap(level, cv2.COLORMAP_JET), img.shape[1::-1])
        strips.append(np.hstack([img, outlined, heat]))
    if not strips:
        raise SystemExit("texture_misses: no defects of that kind to draw")
    cv2.imwrite(str(path), np.vstack(strips))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="texture data set (test/, ground_truth/)")
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder (model.onnx + model.json)")
    p.add_argument("--fpr", type=float, nargs="+", default=[0.05, 0.01], help="normal-pixel rates (default 0.05 0.01)")
    p.add_argument("--panel", type=Path, help="PNG of the worst misses of --kind at the first --fpr")
    p.add_argument("--kind", default="foreign", help="defect kind for --panel (default foreign)")
    args = p.parse_args(argv)
    if not all(0.0 < f < 1.0 for f in args.fpr):
        raise SystemExit("texture_misses: --fpr values must be in (0, 1)")

    from texture_stats import bundle_maps, test_set

    paths, kinds, masks = test_set(args.data)
    maps = bundle_maps(args.bundle, paths)
    if maps.shape[1:] != masks.shape[1:]:
        import cv2

        maps = np.stack([cv2.resize(m, masks.shape[2:0:-1], interpolation=cv2.INTER_LINEAR) for m in maps])
    print(f"{args.bundle.name}: {int((kinds == 'good').sum())} normal and {int((kinds != 'good').sum())} defective test images")
    print(f"{'FPR':>5} {'threshold':>9}  {'kind':<10} {'defects':>7} {'mean share':>10} {'found':>6} {'missed':>6}")
    for fpr in args.fpr:
        t, shares = coverage(maps, masks, kinds, fpr)
        for kind, share in shares.items():
            s = share[~np.isnan(share)]
            print(f"{fpr:5.2f} {t:9.3f}  {kind:<10} {len(s):7d} {s.mean():10.3f} {np.mean(s > 0.5):6.0%} {np.mean(s < 0.1):6.0%}")
    if args.panel:
        t, shares = coverage(maps, masks, kinds, args.fpr[0])
        if args.kind not in shares:
            raise SystemExit(f"texture_misses: no kind {args.kind!r}; the test set has {', '.join(shares)}")
        idx = np.flatnonzero(kinds == args.kind)
        panel(args.panel, paths, maps, masks, idx[np.argsort(shares[args.kind], kind="stable")], t)
        print(f"wrote {args.panel}: the {args.kind} defects with the fewest pixels above {t:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Long dark lines on ELPV cells: a learning-free crack score, alone and summed with a bundle's.

The poly cells every model misses are bright, clean cells crossed by one thin crack (see the README's
ELPV section); short filters and global descriptors rank cells by their grain instead. A crack is
long and nearly straight, grain is not, so this integrates a ridge map along every straight line:

1. the cell at ``--size`` px (area-resized), divided by its median brightness;
2. ridge map: the larger Hessian eigenvalue at ``--sigma`` px (positive across a dark line),
   clipped at 0 and scaled by sigma^2;
3. Radon transform at ``--angles`` angles: the ridge map's mean along each line ``(rho, theta)``;
   lines shorter than ``--min-length`` of the side are ignored. With ``--window`` below 1, the
   transform runs on square windows of that fraction of the side, at half-window steps, so a
   curved crack is straight enough within one of them;
4. per angle, the cell's median over rho is subtracted (a grainy cell lifts all its lines alike),
   then each ``(rho, theta)`` is standardised by its mean and std over the training cells (busbars,
   borders and the usual streaks are long dark lines in every cell);
5. the score is the mean of the ``--top`` largest standardised lines.

With ``--bundle`` (repeatable) the same test cells are scored by the bundle's runtime and the line
score, standardised on ``calibrate/good``, is added to the bundle's score (already standardised by
the export) at a few weights. Nothing here is tuned on the test cells: the weights are printed side
by side. Takes ~0.5 CPU s per cell at 300 px (``--workers`` processes).

Usage::

    python benchmarks/elpv_lines.py /tmp/qf/data/elpv_poly --bundle BUNDLE [--bundle BUNDLE2]
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SUBSETS = ("train/good", "calibrate/good", "test/good", "test/defective")


def line_profile(path: str, size: int, sigma: float, angles: int, window: int | None = None) -> np.ndarray:
    """``(n_windows, n_rho, angles)`` float32: mean ridge response along each straight line of each
    ``window`` px square (half-window steps; the whole cell, one window, when ``window`` is None)."""
    import cv2
    from skimage.feature import hessian_matrix, hessian_matrix_eigvals
    from skimage.transform import radon

    image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    im = cv2.resize(image.astype(np.float32) / 255.0, (size, size), interpolation=cv2.INTER_AREA)
    im /= max(float(np.median(im)), 1e-3)
    h = hessian_matrix(im, sigma=sigma, order="rc", use_gaussian_derivatives=False)
    ridge = (np.maximum(hessian_matrix_eigvals(h)[0], 0.0) * sigma ** 2).astype(np.float32)
    theta = np.linspace(0.0, 180.0, angles, endpoint=False)
    w = window or size
    lengths = np.maximum(line_lengths(w, angles), 1.0)
    starts = range(0, size - w + 1, max(1, w // 2))
    return np.stack([radon(ridge[y:y + w, x:x + w], theta=theta, circle=False) / lengths
                     for y in starts for x in starts]).astype(np.float32)


def line_lengths(size: int, angles: int) -> np.ndarray:
    """``(n_rho, angles)``: how many pixels of the ``size`` x ``size`` cell each line crosses."""
    from skimage.transform import radon

    theta = np.linspace(0.0, 180.0, angles, endpoint=False)
    return radon(np.ones((size, size), np.float32), theta=theta, circle=False)


def line_scores(profiles: dict[str, np.ndarray], valid: np.ndarray, top: int) -> dict[str, np.ndarray]:
    """Per subset ``(N,)``: mean of the ``top`` largest standardised lines (steps 4-5 above).

    ``profiles`` hold ``(N, n_windows, n_rho, angles)`` arrays; ``valid`` is ``(n_rho, angles)``.
    """
    def relative(x: np.ndarray) -> np.ndarray:
        masked = np.where(valid, x, np.nan)
        return x - np.nanmedian(masked, axis=-2, keepdims=True)

    rel = {k: relative(v) for k, v in profiles.items()}
    mu, sd = rel["train/good"].mean(0), rel["train/good"].std(0) + 1e-6
    out = {}
    for k, v in rel.items():
        z = np.where(valid, (v - mu) / sd, -np.inf).reshape(len(v), -1)
        out[k] = -np.sort(-z, axis=1)[:, :top].mean(1)
    return out


def main(argv: list[str] | None = None) -> int:
    from sklearn.metrics import roc_auc_score

    from anomaly.data.io import list_images

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="an ELPV category folder (train/good, calibrate/good, test/good, test/defective)")
    p.add_argument("--bundle", action="append", default=[], help="an exported bundle to sum with (repeatable)")
    p.add_argument("--size", type=int, default=300, help="cell side in px before the ridge filter (default: %(default)s)")
    p.add_argument("--sigma", type=float, default=1.0, help="Hessian scale in px (default: %(default)s)")
    p.add_argument("--angles", type=int, default=90, help="Radon angles over 180 degrees (default: %(default)s)")
    p.add_argument("--min-length", type=float, default=0.3, help="shortest line kept, as a fraction of the side (default: %(default)s)")
    p.add_argument("--window", type=float, default=1.0,
                   help="window side as a fraction of the cell's, half-window steps; 1: the whole cell (default: %(default)s)")
    p.add_argument("--top", type=int, default=5, help="lines averaged into the score (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="processes for the ridge and Radon steps (default: %(default)s)")
    p.add_argument("--cache", default=None, help="an .npz to keep the line profiles in (read when it exists and has the same settings); large: 0.2 GB for poly's 1,322 cells, 0.9 GB with --window 0.5")
    args = p.parse_args(argv)
    data = Path(args.data)
    for sub in SUBSETS:
        if not (data / sub).is_dir():
            p.error(f"{data / sub}: no such folder")
    paths = {sub: [str(q) for q in list_images(data / sub)] for sub in SUBSETS}
    for sub, ps in paths.items():
        if not ps:
            p.error(f"{data / sub}: no images")

    if not 0.0 < args.window <= 1.0:
        p.error("--window must be in (0, 1]")
    window = max(8, round(args.window * args.size))
    settings = [float(args.size), float(args.sigma), float(args.angles), float(window)]
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.is_file():
        with np.load(cache) as f:
            kept = f["settings"].tolist() if "settings" in f.files else None
            if kept != settings:
                p.error(f"{cache} holds profiles for size, sigma, angles, window = {kept}, not {settings}")
            profiles = {sub: f[sub.replace("/", "_")] for sub in SUBSETS}
        print(f"line profiles read from {cache}")
    else:
        work = partial(line_profile, size=args.size, sigma=args.sigma, angles=args.angles, window=window)
        profiles = {}
        with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
            for sub in SUBSETS:
                try:
                    profiles[sub] = np.stack(list(pool.map(work, paths[sub], chunksize=8)))
                except ValueError as e:  # an unreadable cell: say which, without the worker's traceback
                    p.error(str(e))
                print(f"{sub}: {len(paths[sub])} cells", flush=True)
        if cache is not None:
            np.savez(cache, settings=np.array(settings), **{sub.replace("/", "_"): v for sub, v in profiles.items()})

    valid = line_lengths(window, args.angles) >= args.min_length * window
    score = line_scores(profiles, valid, args.top)
    y = np.r_[np.zeros(len(paths["test/good"])), np.ones(len(paths["test/defective"]))]
    s = np.r_[score["test/good"], score["test/defective"]]
    ref = score["calibrate/good"]
    z = (s - ref.mean()) / (ref.std() + 1e-12)
    print(f"size {args.size}, sigma {args.sigma:g}, {args.angles} angles, window {window} px, "
          f"min length {args.min_length:g}, top {args.top}")
    print(f"line score alone: image AUROC {roc_auc_score(y, s):.3f}")
    if args.bundle:
        from anomaly.deploy.runtime import Runtime

        test_paths = paths["test/good"] + paths["test/defective"]
        print(f"{'bundle':<60} {'alone':>6} {'w=0.5':>6} {'w=1':>6} {'w=2':>6}")
        for b in args.bundle:
            rt = Runtime(b)
            results = list(rt.score_paths(test_paths, batch_size=32))
            failed = [r for r in results if r.error]
            if failed:
                p.error(f"{b}: {len(failed)} test cell(s) could not be scored, e.g. {failed[0].path}: {failed[0].error}")
            bs = np.array([r.score for r in results], dtype=np.float64)
            row = "".join(f" {roc_auc_score(y, bs + w * z):6.3f}" for w in (0.5, 1.0, 2.0))
            print(f"{Path(b).name:<60} {roc_auc_score(y, bs):6.3f}{row}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

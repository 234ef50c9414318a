"""Batch audit: score many images with the deployed runtime and write results and heatmaps.

Outputs in ``OUT/``: ``results.csv`` (path, score, label, threshold, error) and, with heatmaps
on, ``heatmaps/<n>_<name>.png`` — the anomaly map over the original image at its original
resolution. Unreadable files become rows with an error; the batch goes on. Files are written
atomically (temporary file, then rename).
"""
from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from data.io import atomic_write, paths_from, read_image, write_image
from deploy.runtime import ImageResult, Runtime

__all__ = ["run_audit", "heatmap_overlay", "RESULT_FIELDS"]

log = logging.getLogger(__name__)
RESULT_FIELDS = ("path", "score", "label", "threshold", "error")


def heatmap_overlay(image: np.ndarray, anomaly_map: np.ndarray, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Colour the map (0 -> blue, ``vmax`` -> red) over the image at the image's resolution.

    Args:
        image: float ``(H, W)`` or ``(H, W, C)`` in [0, 1] (as :func:`data.io.read_image` returns).
        anomaly_map: ``(S, S)`` float map at model resolution.
        vmax: map value drawn as full red (e.g. twice the pixel threshold).

    Returns:
        uint8 ``(H, W, 3)`` RGB.
    """
    from deploy.regions import overlay_heatmap

    rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    rgb8 = (np.clip(rgb[:, :, :3], 0, 1) * 255).astype(np.uint8)
    return overlay_heatmap(rgb8, anomaly_map, 0.0, vmax, alpha=alpha)


def run_audit(
    bundle: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    batch_size: int = 16,
    heatmaps: bool = True,
    device: str = "auto",
    category: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Audit ``inputs`` (files and folders) with ``bundle``; returns a summary dict.

    Raises:
        deploy.bundle.BundleError: the bundle is missing or inconsistent.
        FileNotFoundError: an input path does not exist.
    """
    missing = [str(p) for p in inputs if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}")
    paths = paths_from(inputs)
    rt = Runtime(bundle, device=device, category=category)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vmax = 2.0 * (rt.pixel_threshold or 1.0)
    heat_dir = out / "heatmaps"
    t0 = time.monotonic()
    counts = {"images": 0, "flagged": 0, "failed": 0}
    with atomic_write(out / "results.csv", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        for i, r in enumerate(rt.score_paths(paths, batch_size=batch_size)):
            counts["images"] += 1
            counts["failed"] += r.error is not None
            counts["flagged"] += r.label == 1
            writer.writerow({"path": r.path, "score": "" if r.error else f"{r.score:.6g}", "label": "" if r.error else r.label,
                             "threshold": "" if r.threshold is None else f"{r.threshold:.6g}", "error": r.error or ""})
            if heatmaps and r.error is None:
                _write_heatmap(heat_dir / f"{i:06d}_{Path(r.path).stem}.png", r, vmax)
            if progress:
                progress(i + 1, len(paths))
    seconds = time.monotonic() - t0
    summary = {**counts, "threshold": rt.threshold, "seconds": seconds,
               "images_per_second": counts["images"] / seconds if seconds > 0 else None,
               "results": str(out / "results.csv"), "heatmaps": str(heat_dir) if heatmaps else None}
    log.info("audited %d images in %.1fs: %d flagged, %d failed", counts["images"], seconds, counts["flagged"], counts["failed"])
    return summary


def _write_heatmap(path: Path, r: ImageResult, vmax: float) -> None:
    image = read_image(r.path)
    write_image(path, heatmap_overlay(image, r.anomaly_map, vmax))

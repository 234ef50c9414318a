"""Fit the bundle's thresholds on held-out images and write them into the sidecar.

``calibrate_bundle`` scores a folder of normal images (and optionally defective images with
masks) with the deployed runtime — the same numbers the line will see — fits an image
:class:`~anomaly.calibration.ThresholdCalibrator` and a pixel
:class:`~anomaly.calibration.PixelThresholdCalibrator`, and rewrites only the sidecar's
``calibration`` section, atomically. Images the model was trained on are refused: their scores
are optimistic and would put the threshold too low.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anomaly.calibration import PixelThresholdCalibrator, ThresholdCalibrator
from data.io import list_images, read_image
from deploy.bundle import load_sidecar, update_calibration
from deploy.runtime import Runtime

__all__ = ["calibrate_bundle", "CalibrationError"]

log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """Calibration inputs that cannot give an honest threshold (missing, empty, trained-on)."""


def _images(folder: str | os.PathLike, what: str) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise CalibrationError(f"{root}: no such folder (expected a folder of {what} images)")
    paths = list_images(root)
    if not paths:
        raise CalibrationError(f"{root}: no images found (expected {what} images such as .png or .jpg)")
    return paths


def _training_images(meta: dict[str, Any]) -> set[str]:
    run = meta.get("model", {}).get("run")
    split = Path(run) / "split.json" if run else None
    if split is None or not split.is_file():
        return set()
    return {str(Path(p).resolve()) for p in json.loads(split.read_text()).get("train", [])}


def _mask_for(path: Path, masks: Path | None, size: int) -> np.ndarray:
    import cv2

    if masks is None:
        raise CalibrationError("internal: no mask folder")
    for cand in (masks / f"{path.stem}_mask.png", masks / path.name, masks / f"{path.stem}.png"):
        if cand.is_file():
            m = read_image(cand)
            m = m.max(axis=2) if m.ndim == 3 else m
            return cv2.resize((m > 0.5).astype(np.float32), (size, size), interpolation=cv2.INTER_NEAREST)
    raise CalibrationError(f"{masks}: no mask for {path.name} (expected {path.stem}_mask.png)")


def calibrate_bundle(
    bundle: str | os.PathLike,
    normal: str | os.PathLike,
    *,
    defects: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    method: str = "fpr",
    target_fpr: float = 0.01,
    k: float = 3.0,
    percentile: float = 99.0,
    probability: str | None = None,
    pixel_fpr: float = 0.001,
    batch_size: int = 16,
    device: str = "auto",
) -> dict[str, Any]:
    """Calibrate ``bundle`` in place; returns a report (threshold, expected FPR, recall, images used).

    Args:
        normal: folder of held-out normal images (never trained on).
        defects: optional folder of defective images (enables ``f1``/``youden`` and probability).
        masks: optional folder of defect masks ``<name>_mask.png`` (pixel threshold by F1).
        method: ``fpr``, ``sigma``, ``percentile`` (normal-only), ``f1``, ``youden`` (need defects).
        target_fpr, k, percentile: parameters of the normal-only methods.
        probability: ``isotonic`` or ``logistic`` probability model (needs defects).
        pixel_fpr: pixel false-positive rate of the normal-only pixel threshold.

    Raises:
        CalibrationError: missing/empty folders, images used in training, every image unreadable.
    """
    meta = load_sidecar(bundle)
    normal_paths = _images(normal, "normal")
    defect_paths = _images(defects, "defective") if defects else []
    trained = _training_images(meta)
    overlap = [p for p in normal_paths + defect_paths if str(p.resolve()) in trained]
    if overlap:
        raise CalibrationError(f"{len(overlap)} calibration image(s) were used to train this model "
                               f"(e.g. {overlap[0]}); calibrate on held-out images only")
    rt = Runtime(bundle, device=device)
    size = rt.preprocess.image_size

    scores: list[float] = []
    labels: list[int] = []
    maps: list[np.ndarray] = []
    mask_list: list[np.ndarray] = []
    used: dict[str, list[str]] = {"normal": [], "defects": []}
    failed: list[dict[str, str]] = []
    mask_root = Path(masks) if masks else None
    for kind, paths, y in (("normal", normal_paths, 0), ("defects", defect_paths, 1)):
        for r in rt.score_paths(paths, batch_size=batch_size):
            if r.error:
                failed.append({"path": str(r.path), "error": r.error})
                continue
            scores.append(r.score)
            labels.append(y)
            used[kind].append(str(r.path))
            if y == 0 or mask_root is not None:
                maps.append(r.anomaly_map)
                mask_list.append(np.zeros((size, size), np.float32) if y == 0 else _mask_for(Path(r.path), mask_root, size))
    if not used["normal"]:
        raise CalibrationError(f"{normal}: none of the {len(normal_paths)} normal images could be scored")
    cal = ThresholdCalibrator(method=method, target_fpr=target_fpr, k=k, percentile=percentile,
                              probability=probability).fit(np.asarray(scores), np.asarray(labels))
    pix_method = "f1" if mask_root is not None and used["defects"] else "fpr"
    pix = PixelThresholdCalibrator(method=pix_method, target_fpr=pixel_fpr).fit(
        np.stack(maps), np.stack(mask_list) if pix_method == "f1" else None)
    source = {"normal": str(Path(normal).resolve()), "n_normal": len(used["normal"]),
              "defects": str(Path(defects).resolve()) if defects else None, "n_defects": len(used["defects"]),
              "masks": str(mask_root.resolve()) if mask_root else None, "failed": failed}
    update_calibration(bundle, {"image": cal.to_dict(), "pixel": pix.to_dict(), "source": source})
    report = {"threshold": cal.threshold_, "method": method, "expected_fpr": cal.expected_fpr_, "recall": cal.recall_,
              "pixel_threshold": pix.threshold_, "pixel_method": pix_method, **source}
    log.info("calibrated %s: threshold %.6g (%s)", bundle, cal.threshold_, method)
    return report

"""``anomaly evaluate bundle/ --data CATEGORY_DIR``: standard metrics of a bundle on a labelled test set.

Scores ``test/`` of an MVTec-style category with the deployed runtime and reports image AUROC,
AP, F1-max; pixel AUROC, AP and AUPRO up to 30 % FPR (per-region overlap, Bergmann et al. 2021)
where ground-truth masks exist; and the confusion counts at the bundle's calibrated threshold.
Masks are compared at model resolution (maps are not resized; a tiled bundle's at its tiling scale), the convention of the MVTec
evaluation when all images share one size.

Split discipline: a test image that lies inside the folders the bundle was calibrated on, or
whose content is one of the model's training images (the sidecar's hashes; no run folder
needed), is an error — a metric on such images would be optimistic.

Torch-free.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from anomaly.metrics import aupro, confusion_counts, image_metrics, pixel_metrics
from anomaly.data.folder import discover
from anomaly.data.io import atomic_write, read_image
from anomaly.data.progress import MODES, CountProgress
from anomaly.deploy.bundle import trained_on, training_images_message
from anomaly.deploy.runtime import Runtime

__all__ = ["evaluate_bundle", "EvaluationError", "add_parsers"]

log = logging.getLogger(__name__)


class EvaluationError(ValueError):
    """A test set that cannot give an honest evaluation (no test images, one class, leakage)."""


def _inside(path: Path, folder: str | None) -> bool:
    if not folder:
        return False
    try:
        path.resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def _mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """The ground truth at the map's ``(h, w)`` (``(S, S)``, or a tiled bundle's scaled image size)."""
    h, w = int(shape[0]), int(shape[1])
    if path is None:
        return np.zeros((h, w), np.uint8)
    m = read_image(path)
    m = m.max(axis=2) if m.ndim == 3 else m
    return cv2.resize((m > 0.5).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)


def evaluate_bundle(bundle: str | os.PathLike, data: str | os.PathLike, *, batch_size: int = 16,
                    device: str = "auto", fpr_limit: float = 0.3, category: str | int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Evaluate ``bundle`` on ``data/test`` (MVTec layout); returns the metrics dict. ``category``:
    what a conditional model of several categories scores the images as (and whose thresholds).
    ``progress``: called as ``progress(done, total)`` with ``(0, total)`` before the first test
    image and after each one is scored (unreadable ones too); a command shows it, library code
    does not print.

    Raises:
        EvaluationError: no labelled test images, a single class, or images used for
            calibration or training.
    """
    layout = discover(data)
    test = layout.test
    if not test:
        raise EvaluationError(f"{data}: no test images (expected test/good and test/<defect-type> folders)")
    rt = Runtime(bundle, device=device, category=category)
    cal = rt.meta.get("calibration") or {}
    sources = [cal.get("source") or {}] + [(c or {}).get("source") or {} for c in (cal.get("categories") or {}).values()]
    leaked = [s.path for s in test if any(_inside(s.path, src.get("normal")) or _inside(s.path, src.get("defects"))
                                          for src in sources)]
    trained = trained_on(rt.meta, [s.path for s in test])
    if trained:
        raise EvaluationError(training_images_message(trained, "test", "evaluate on held-out images only"))
    if leaked:
        raise EvaluationError(f"{len(leaked)} test image(s) were used to calibrate this bundle "
                              f"(e.g. {leaked[0]}); evaluate on held-out images only")
    labels, scores, preds, maps, masks, failed = [], [], [], [], [], []
    has_masks = any(s.mask is not None for s in test)
    if progress is not None:
        progress(0, len(test))
    for done, (s, r) in enumerate(zip(test, rt.score_paths([s.path for s in test], batch_size=batch_size)), 1):
        if progress is not None:
            progress(done, len(test))
        if r.error:
            failed.append({"path": str(s.path), "error": r.error})
            continue
        labels.append(s.label)
        scores.append(r.score)
        preds.append(r.label)
        if has_masks:
            maps.append(r.anomaly_map.astype(np.float32))
            masks.append(_mask(s.mask, r.anomaly_map.shape))
    y = np.asarray(labels)
    if y.min(initial=1) == y.max(initial=0):
        raise EvaluationError(f"{data}: the test set needs both normal and defective images; found only label {int(y[0]) if len(y) else 'none'}")
    result: dict[str, Any] = {"bundle": str(Path(bundle).resolve()), "data": str(Path(data).resolve()),
                              "n_images": int(len(y)), "n_defective": int(y.sum()), "failed": failed}
    result["image"] = image_metrics(y, np.asarray(scores))
    if has_masks:
        # a tiled bundle's maps are each image's own size: the metrics take lists
        m, a = (np.stack(masks), np.stack(maps)) if not rt.preprocess.tiled else (masks, maps)
        result["pixel"] = {**pixel_metrics(m, a), "aupro": aupro(m, a, fpr_limit=fpr_limit), "aupro_fpr_limit": fpr_limit}
    if rt.threshold is not None:
        result["threshold"] = rt.threshold
        result["confusion"] = confusion_counts(y, np.asarray(preds))
    return result


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="image/pixel AUROC, AP, F1-max, AUPRO of a bundle on a labelled test set",
                       description="Evaluate a bundle on CATEGORY/test (MVTec layout); prints and writes JSON.")
    p.add_argument("bundle")
    p.add_argument("--data", required=True, help="MVTec-style category folder with test/ (and ground_truth/)")
    p.add_argument("--out", default=None, help="JSON file to write (default: BUNDLE/evaluation.json)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--category", default=None, help="conditional models of several categories: the category of the test images")
    p.add_argument("--progress", default="auto", choices=MODES,
                   help="auto: a live bar with ETA on a terminal, a line every 30 s and at the end otherwise, as in "
                        "logs and CI (default); bar, lines or none to choose; on stderr")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    with CountProgress(desc="evaluate", unit="images", mode=args.progress) as show:
        res = evaluate_bundle(args.bundle, args.data, batch_size=args.batch_size, device=args.device,
                              category=args.category, progress=show)
    out = Path(args.out) if args.out else Path(args.bundle) / "evaluation.json"
    with atomic_write(out) as fh:
        json.dump(res, fh, indent=2)
    im = res["image"]
    print(f"{res['n_images']} test images ({res['n_defective']} defective)"
          + (f", {len(res['failed'])} unreadable" if res["failed"] else ""))
    print(f"image  AUROC {im['auroc']:.4f}  AP {im['ap']:.4f}  F1-max {im['f1_max']:.4f}")
    if "pixel" in res:
        px = res["pixel"]
        print(f"pixel  AUROC {px['pixel_auroc']:.4f}  AP {px['pixel_ap']:.4f}  AUPRO@{px['aupro_fpr_limit']:.0%} {px['aupro']:.4f}")
    if "confusion" in res:
        c = res["confusion"]
        print(f"at threshold {res['threshold']:.6g}: TP {c['tp']}  FP {c['fp']}  TN {c['tn']}  FN {c['fn']}")
    print(f"written: {out}")
    return 0

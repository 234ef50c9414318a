"""Fit the bundle's thresholds on held-out images and write them into the sidecar.

``calibrate_bundle`` scores a folder of normal images (and optionally defective images with
masks) with the deployed runtime — the same numbers the line will see — fits an image
:class:`~anomaly.calibration.ThresholdCalibrator` and a pixel
:class:`~anomaly.calibration.PixelThresholdCalibrator`, and rewrites only the sidecar's
``calibration`` section, atomically, with the normal images' scores as the drift alarm's
``reference_scores`` (:mod:`anomaly.deploy.bundle`). Images the model was trained on are refused,
recognised by content from the sidecar's training-image hashes (no run folder needed): their scores
are optimistic and would put the threshold too low.

``reviews=decisions.json`` (from ``anomaly review``: a reviewer marked flagged images ``defect`` or
``false_alarm``) refits the image threshold with those labels (defect = 1, false alarm = 0), using
the scores recorded in the decisions (same model: the file's ``bundle_sha256`` must be this
bundle's ONNX sha256):

* both classes reviewed: a labelled method, ``method`` if it is ``f1`` or ``youden``, else ``f1``;
  with ``normal`` (and ``defects``) folders too, their scores join the fit;
* only false alarms: the threshold is raised to just above the highest false alarm's score
  (``nextafter``; a defect is ``score > threshold``), never lowered;
* only defects: the threshold is kept (the reviewer confirmed every flag).

Without ``normal``, only the image threshold changes: the pixel threshold, the normal-score
histogram/statistics and (unless ``probability`` is given) the probability model are kept from the
current calibration, and the expected FPR is re-estimated from the stored normal histogram.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from anomaly.calibration import PixelThresholdCalibrator, ThresholdCalibrator
from anomaly.data.io import list_images, read_image
from anomaly.deploy.bundle import load_sidecar, reference_scores, trained_on, training_images_message, update_calibration
from anomaly.deploy.runtime import Runtime, resolve_category

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


def _mask_for(path: Path, masks: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """The mask of ``path`` at the map's ``(h, w)`` (a tiled bundle's maps are each image's size)."""
    import cv2

    h, w = int(shape[0]), int(shape[1])
    if masks is None:
        raise CalibrationError("internal: no mask folder")
    for cand in (masks / f"{path.stem}_mask.png", masks / path.name, masks / f"{path.stem}.png"):
        if cand.is_file():
            m = read_image(cand)
            m = m.max(axis=2) if m.ndim == 3 else m
            return cv2.resize((m > 0.5).astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST)
    raise CalibrationError(f"{masks}: no mask for {path.name} (expected {path.stem}_mask.png)")


def _load_reviews(path: str | os.PathLike, meta: dict[str, Any]) -> dict[str, Any]:
    """Read and check a decisions file -> ``{"file", "scores", "labels"}`` (defect 1, false alarm 0)."""
    from anomaly.deploy.review import validate_decisions

    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"{p}: no such decisions file (expected the JSON saved by `anomaly review`)")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        decisions = validate_decisions(doc)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise CalibrationError(f"{p}: not a decisions file ({exc})") from exc
    expected = meta.get("onnx", {}).get("sha256")
    if doc.get("bundle_sha256") != expected:
        raise CalibrationError(f"{p}: decisions were made on scores of another model (bundle sha256 "
                               f"{str(doc.get('bundle_sha256'))[:12]}…, this bundle {str(expected)[:12]}…)")
    scores = [float(d["score"]) for d in decisions]
    labels = [1 if d["decision"] == "defect" else 0 for d in decisions]
    if not scores:
        raise CalibrationError(f"{p}: no decisions with a score to learn from")
    return {"file": str(p.resolve()), "scores": np.asarray(scores), "labels": np.asarray(labels, dtype=np.int64)}


def _category_name(meta: dict[str, Any], category: str | int | None) -> str | None:
    """The category whose thresholds a calibration writes: a name for a conditional model of several
    categories (required there), ``None`` (the bundle's own thresholds) otherwise."""
    names = list((meta.get("model") or {}).get("categories") or [])
    if "label" not in (meta.get("inputs") or []) or len(names) < 2:
        return None
    return names[resolve_category(names, category)]  # the runtime's rule (CategoryError on a bad one)


def _fpr_from_histogram(hist: dict[str, list] | None, threshold: float) -> float | None:
    """Fraction of a stored normal-score histogram above ``threshold`` (uniform within bins)."""
    if not hist or not hist.get("counts"):
        return None
    edges, counts = np.asarray(hist["edges"], dtype=np.float64), np.asarray(hist["counts"], dtype=np.float64)
    lo, hi = edges[:-1], edges[1:]
    frac = np.clip((hi - threshold) / np.maximum(hi - lo, 1e-300), 0.0, 1.0)
    return float((counts * frac).sum() / max(counts.sum(), 1.0))


def _review_rule(rv: dict[str, Any], method: str) -> tuple[str, str]:
    """Which rule the reviews call for -> ``(kind, labelled method)``; kind is both / false_alarms / defects."""
    n_def = int(rv["labels"].sum())
    n_fa = int(len(rv["labels"]) - n_def)
    m = method if method in ("f1", "youden") else "f1"
    if n_def and n_fa:
        return "both", m
    return ("false_alarms", m) if n_fa else ("defects", m)


def _review_report(rv: dict[str, Any], before: float | None, after: float, rule: str) -> dict[str, Any]:
    s, y = rv["scores"], rv["labels"]
    flagged = lambda t: s > t if t is not None else np.zeros(len(s), bool)  # noqa: E731
    return {"file": rv["file"], "n_defect": int(y.sum()), "n_false_alarm": int((y == 0).sum()), "rule": rule,
            "previous_threshold": before, "changed": before is None or float(after) != float(before),
            "defects_flagged": int((flagged(after) & (y == 1)).sum()),
            "false_alarms_flagged": int((flagged(after) & (y == 0)).sum()),
            "defects_flagged_before": int((flagged(before) & (y == 1)).sum()),
            "false_alarms_flagged_before": int((flagged(before) & (y == 0)).sum())}


def _refit_from_reviews(bundle: str | os.PathLike, meta: dict[str, Any], rv: dict[str, Any], method: str,
                        probability: str | None, name: str | None = None) -> dict[str, Any]:
    """Reviews only: change the image threshold, keep everything else of the current calibration
    (category ``name``'s, when given)."""
    root = dict(meta.get("calibration") or {})
    categories = dict(root.get("categories") or {})
    cal = dict(categories.get(name) or {}) if name is not None else root
    prev = cal.get("image")
    if not prev:
        hint = f" --category {name}" if name is not None else ""
        raise CalibrationError(f"{bundle}: has no calibration{' for category ' + name if name else ''} to adjust; "
                               f"run `anomaly calibrate --normal ...{hint}` first")
    before = float(prev["threshold"])
    kind, m = _review_rule(rv, method)
    if kind == "both":
        fit = ThresholdCalibrator(method=m, probability=probability).fit(rv["scores"], rv["labels"])
        new = fit.to_dict()
        for key in ("normal_histogram", "normal_stats", "n_normal"):  # the held-out normal set stays the reference
            new[key] = prev.get(key)
        if probability is None:
            new["probability_model"] = prev.get("probability_model")
        rule = f"{m} on the reviewed scores (defect=1, false alarm=0)"
    elif kind == "false_alarms":
        new = dict(prev)
        new["threshold"] = max(before, float(np.nextafter(rv["scores"].max(), np.inf)))
        rule = "only false alarms: threshold raised just above the highest false alarm's score"
    else:
        new = dict(prev)
        rule = "only defects: threshold kept (every reviewed flag was a defect)"
    after = float(new["threshold"])
    est = _fpr_from_histogram(prev.get("normal_histogram"), after)
    if est is not None:
        new["expected_fpr"] = est
    review = _review_report(rv, before, after, rule)
    cal["image"] = new
    cal["source"] = {**(cal.get("source") or {}), "reviews": {k: v for k, v in review.items() if k != "changed"}}
    if name is not None:
        categories[name] = cal
        cal = {**root, "categories": categories}
    update_calibration(bundle, cal)
    log.info("refit %s from reviews: threshold %.6g -> %.6g (%s)", bundle, before, after, rule)
    return {"threshold": after, "method": new.get("method"), "expected_fpr": new.get("expected_fpr"),
            "recall": None, "pixel_threshold": (cal.get("pixel") or {}).get("threshold"), "pixel_method": None,
            "normal": None, "n_normal": 0, "defects": None, "n_defects": 0, "masks": None, "failed": [],
            "reviews": review}


def calibrate_bundle(
    bundle: str | os.PathLike,
    normal: str | os.PathLike | None = None,
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
    reviews: str | os.PathLike | None = None,
    category: str | int | None = None,
    progress: Callable[[int, int], None] | None = None,
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
        reviews: decisions JSON from ``anomaly review`` (see the module docstring); ``normal`` may
            then be ``None``. The report gains ``reviews`` (counts, rule, threshold before/after).
        category: for a conditional model of several categories (required there): the category
            the images (or the reviewed scores) belong to. Its thresholds go to
            ``calibration.categories[<name>]``, which the runtime uses when it runs for that
            category; the bundle's own and the other categories' stay as they were.
        progress: called as ``progress(done, total)`` with ``(0, total)`` before the first image
            and after each image is scored (unreadable ones too), ``total`` being the normal and
            defective images together; a command shows it (library code does not print). Not
            called for a calibration from ``reviews`` alone (no images are scored).

    Raises:
        CalibrationError: missing/empty folders, images used in training, every image unreadable,
            a decisions file that is malformed or belongs to another model.
    """
    meta = load_sidecar(bundle)
    name = _category_name(meta, category)
    rv = _load_reviews(reviews, meta) if reviews is not None else None
    if normal is None:
        if rv is None:
            raise CalibrationError("nothing to calibrate on: pass a folder of held-out normal images and/or reviews")
        return {**_refit_from_reviews(bundle, meta, rv, method, probability, name), "category": name}
    normal_paths = _images(normal, "normal")
    defect_paths = _images(defects, "defective") if defects else []
    overlap = trained_on(meta, normal_paths + defect_paths)
    if overlap:
        raise CalibrationError(training_images_message(overlap, "calibration", "calibrate on held-out images only"))
    rt = Runtime(bundle, device=device, category=name if name is not None else category)  # scores as that category

    scores: list[float] = []
    labels: list[int] = []
    normal_scores: list[float] = []  # the drift alarm's reference: the normal images' scores only
    maps: list[np.ndarray] = []
    mask_list: list[np.ndarray] = []
    used: dict[str, list[str]] = {"normal": [], "defects": []}
    failed: list[dict[str, str]] = []
    mask_root = Path(masks) if masks else None
    total, done = len(normal_paths) + len(defect_paths), 0
    if progress is not None:
        progress(0, total)
    for kind, paths, y in (("normal", normal_paths, 0), ("defects", defect_paths, 1)):
        for r in rt.score_paths(paths, batch_size=batch_size):
            done += 1
            if progress is not None:
                progress(done, total)
            if r.error:
                failed.append({"path": str(r.path), "error": r.error})
                continue
            scores.append(r.score)
            labels.append(y)
            used[kind].append(str(r.path))
            if y == 0:
                normal_scores.append(r.score)
            if y == 0 or mask_root is not None:
                maps.append(r.anomaly_map)
                shape = r.anomaly_map.shape
                mask_list.append(np.zeros(shape, np.float32) if y == 0 else _mask_for(Path(r.path), mask_root, shape))
    if not used["normal"]:
        raise CalibrationError(f"{normal}: none of the {len(normal_paths)} normal images could be scored")
    review: dict[str, Any] | None = None
    if rv is not None:
        before = (rt.calibration.get("image") or {}).get("threshold")
        kind, m = _review_rule({"labels": np.asarray(labels + rv["labels"].tolist())}, method)
        method = m if kind == "both" else method
        scores += rv["scores"].tolist()
        labels += rv["labels"].tolist()
    cal = ThresholdCalibrator(method=method, target_fpr=target_fpr, k=k, percentile=percentile,
                              probability=probability).fit(np.asarray(scores), np.asarray(labels))
    if rv is not None:
        rule = f"{method} on the normal images and the reviewed scores"
        if kind == "false_alarms" and rv["labels"].size and (rv["labels"] == 0).any():
            cal.threshold_ = max(cal.threshold_, float(np.nextafter(rv["scores"][rv["labels"] == 0].max(), np.inf)))
            rule += ", then raised just above the highest false alarm"
            s_all, y_all = np.asarray(scores), np.asarray(labels)
            cal.expected_fpr_ = float(np.mean(s_all[y_all == 0] > cal.threshold_))
            cal.recall_ = float(np.mean(s_all[y_all == 1] > cal.threshold_)) if (y_all == 1).any() else None
        review = _review_report(rv, before, cal.threshold_, rule)
    pix_method = "f1" if mask_root is not None and used["defects"] else "fpr"
    pix = PixelThresholdCalibrator(method=pix_method, target_fpr=pixel_fpr).fit(  # lists: sizes may differ (tiled)
        maps, mask_list if pix_method == "f1" else None)
    source = {"normal": str(Path(normal).resolve()), "n_normal": len(used["normal"]),
              "defects": str(Path(defects).resolve()) if defects else None, "n_defects": len(used["defects"]),
              "masks": str(mask_root.resolve()) if mask_root else None, "failed": failed}
    if review is not None:
        source["reviews"] = {k: v for k, v in review.items() if k != "changed"}
    new = {"image": cal.to_dict(), "pixel": pix.to_dict(), "source": source,
           "reference_scores": reference_scores(normal_scores)}
    old = meta.get("calibration") or {}
    categories = dict(old.get("categories") or {})
    if name is not None:  # this category's own; the bundle's and the other categories' stay
        categories[name] = new
        update_calibration(bundle, {**old, "categories": categories})
    else:
        update_calibration(bundle, {**new, **({"categories": categories} if categories else {})})
    report = {"threshold": cal.threshold_, "method": method, "expected_fpr": cal.expected_fpr_, "recall": cal.recall_,
              "pixel_threshold": pix.threshold_, "pixel_method": pix_method, **source, "reviews": review,
              "category": name}
    log.info("calibrated %s%s: threshold %.6g (%s)", bundle, f" for {name}" if name else "", cal.threshold_, method)
    return report

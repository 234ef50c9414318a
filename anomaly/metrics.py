"""Evaluation metrics for anomaly detection: image level, pixel level and AUPRO.

Torch-free (numpy, scikit-learn, OpenCV): the deployed runtime and the audit command import it.

Conventions:
    * scores and anomaly maps follow the PyOD sign: **higher = more anomalous**;
    * labels and masks are binary, 1 / non-zero = defect;
    * a threshold ``t`` predicts defect where ``score > t`` (strictly), the same rule as
      :meth:`anomaly.calibration.ThresholdCalibrator.predict`.

Metrics:
    * :func:`image_metrics` - image AUROC, average precision, F1-max and its threshold;
    * :func:`pixel_metrics` - pixel AUROC and AP (deterministic, class-stratified subsampling
      bounds memory);
    * :func:`aupro` - area under the per-region-overlap curve up to an FPR limit, normalised
      (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021, §4.2 / the official
      MVTec AD evaluation code);
    * :func:`confusion_counts` - tp / fp / tn / fn.

Example::

    from anomaly.metrics import image_metrics, pixel_metrics, aupro
    m = image_metrics(labels, scores)          # {'auroc': ..., 'ap': ..., 'f1_max': ..., ...}
    p = pixel_metrics(masks, maps)             # {'pixel_auroc': ..., 'pixel_ap': ...}
    pro = aupro(masks, maps, fpr_limit=0.3)    # 1.0 for a perfect map
"""
from __future__ import annotations

import logging
from typing import Sequence

import cv2
import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "image_metrics",
    "pixel_metrics",
    "aupro",
    "pro_curve",
    "confusion_counts",
    "f1_max_threshold",
    "youden_threshold",
]

logger = logging.getLogger(__name__)

#: Default bound on the number of pixels fed to scikit-learn's ranking metrics.
DEFAULT_MAX_PIXELS = 2_000_000


# ----------------------------------------------------------------------------------------------
# validation helpers (shared with anomaly.calibration)
# ----------------------------------------------------------------------------------------------
def _as_scores(scores: ArrayLike, name: str = "scores") -> np.ndarray:
    """Return ``scores`` as a finite float64 vector ``(N,)``; raise ``ValueError`` otherwise."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of shape (N,); got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: expected at least one score")
    if not np.all(np.isfinite(arr)):
        n_bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"{name} contains {n_bad} NaN or infinite value(s); expected finite scores")
    return arr


def _as_labels(labels: ArrayLike, n: int, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as an int vector ``(n,)`` of 0/1; raise ``ValueError`` otherwise."""
    arr = np.asarray(labels)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the scores; got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isin(arr, (0, 1))):
        found = np.unique(arr)[:10]
        raise ValueError(f"{name} must be 0 (normal) or 1 (defect); found values {found.tolist()}")
    return arr.astype(np.int64)


def _require_both_classes(labels: np.ndarray, what: str = "labels") -> None:
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        only = "defect (1)" if n_pos else "normal (0)"
        raise ValueError(
            f"only one class present in {what}: all {labels.size} are {only}; this metric needs "
            "both normal (0) and defect (1) samples"
        )


def _strict_threshold(scores: np.ndarray, t_ge: float) -> float:
    """Turn a ``score >= t_ge`` threshold into an equivalent ``score > t`` threshold.

    scikit-learn's curves predict positive where ``score >= threshold``; this package uses
    ``score > threshold``. The returned value is the midpoint between ``t_ge`` and the largest
    score below it (so it generalises symmetrically), or the float just below ``t_ge`` if no
    score is lower. On the given scores both rules then make identical predictions.
    """
    lower = scores[scores < t_ge]
    if lower.size:
        return float((t_ge + lower.max()) / 2.0)
    return float(np.nextafter(t_ge, -np.inf))


def f1_max_threshold(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds (on scikit-learn's ``precision_recall_curve``).

    Args:
        labels: ``(N,)`` 0/1, 1 = defect; both classes required.
        scores: ``(N,)`` finite, higher = more anomalous.

    Returns:
        ``(f1_max, threshold)`` where ``score > threshold`` achieves ``f1_max``.
    """
    from sklearn.metrics import precision_recall_curve

    s = _as_scores(scores)
    y = _as_labels(labels, s.size)
    _require_both_classes(y)
    precision, recall, thresholds = precision_recall_curve(y, s)
    # the last (precision=1, recall=0) point has no threshold
    p, r = precision[:-1], recall[:-1]
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    # precision_recall_curve returns thresholds ascending; among equal F1 prefer the highest
    # threshold (fewest false alarms): argmax over the reversed array
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    return float(f1[best]), _strict_threshold(s, float(thresholds[best]))


def youden_threshold(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Threshold maximising Youden's J = TPR - FPR (on scikit-learn's ``roc_curve``).

    Args:
        labels: ``(N,)`` 0/1, 1 = defect; both classes required.
        scores: ``(N,)`` finite, higher = more anomalous.

    Returns:
        ``(j_max, threshold)`` where ``score > threshold`` achieves ``j_max``.
    """
    from sklearn.metrics import roc_curve

    s = _as_scores(scores)
    y = _as_labels(labels, s.size)
    _require_both_classes(y)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    j = tpr - fpr
    j[~np.isfinite(thresholds)] = -np.inf  # the (0, 0) point at threshold=inf predicts nothing
    best = int(np.argmax(j))  # thresholds descending: first max = highest threshold
    return float(j[best]), _strict_threshold(s, float(thresholds[best]))


# ----------------------------------------------------------------------------------------------
# image level
# ----------------------------------------------------------------------------------------------
def image_metrics(labels: ArrayLike, scores: ArrayLike) -> dict[str, float]:
    """Image-level AUROC, average precision and F1-max.

    Args:
        labels: ``(N,)`` 0/1, 1 = defect; both classes must be present.
        scores: ``(N,)`` image scores, higher = more anomalous.

    Returns:
        ``{"auroc", "ap", "f1_max", "f1_threshold"}``; ``f1_threshold`` uses ``score > t``.

    Raises:
        ValueError: shapes differ, scores not finite, labels not 0/1, or a single class present.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    s = _as_scores(scores)
    y = _as_labels(labels, s.size)
    _require_both_classes(y)
    f1, thr = f1_max_threshold(y, s)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "ap": float(average_precision_score(y, s)),
        "f1_max": f1,
        "f1_threshold": thr,
    }


def confusion_counts(labels: ArrayLike, predictions: ArrayLike) -> dict[str, int]:
    """Confusion counts for binary predictions.

    Args:
        labels: ``(N,)`` 0/1 ground truth, 1 = defect.
        predictions: ``(N,)`` 0/1 predictions.

    Returns:
        ``{"tp", "fp", "tn", "fn"}`` as Python ints.
    """
    y = _as_labels(labels, np.asarray(labels).size)
    p = _as_labels(predictions, y.size, name="predictions")
    return {
        "tp": int(np.count_nonzero((y == 1) & (p == 1))),
        "fp": int(np.count_nonzero((y == 0) & (p == 1))),
        "tn": int(np.count_nonzero((y == 0) & (p == 0))),
        "fn": int(np.count_nonzero((y == 1) & (p == 0))),
    }


# ----------------------------------------------------------------------------------------------
# pixel level
# ----------------------------------------------------------------------------------------------
def _flatten_pairs(
    masks: ArrayLike | Sequence[np.ndarray], maps: ArrayLike | Sequence[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Validate masks/maps as lists of matching ``(H, W)`` arrays (binary masks, finite maps).

    Accepts ``(N, H, W)`` arrays, ``(N, 1, H, W)`` arrays, a single ``(H, W)`` array (one image),
    or sequences of ``(H, W)`` arrays (sizes may differ between images).
    """

    def as_list(x, name):
        if isinstance(x, np.ndarray):
            if x.ndim == 4 and x.shape[1] == 1:
                x = x[:, 0]
            if x.ndim == 2:
                x = x[None]
            if x.ndim != 3:
                raise ValueError(f"{name} must be (N, H, W) or a list of (H, W) arrays; got shape {x.shape}")
            return list(x)
        out = []
        for a in x:
            a = np.asarray(a)
            if a.ndim == 3 and a.shape[0] == 1:  # (1, H, W)
                a = a[0]
            elif a.ndim == 3 and a.shape[2] == 1:  # (H, W, 1)
                a = a[..., 0]
            out.append(a)
        for a in out:
            if a.ndim != 2:
                raise ValueError(f"each item of {name} must be (H, W); got shape {a.shape}")
        return out

    mk = as_list(masks, "masks")
    mp = as_list(maps, "maps")
    if len(mk) != len(mp):
        raise ValueError(f"got {len(mk)} masks but {len(mp)} maps; expected one mask per map")
    if not mk:
        raise ValueError("masks and maps are empty: expected at least one image")
    out_masks, out_maps = [], []
    for i, (m, a) in enumerate(zip(mk, mp)):
        if m.shape != a.shape:
            raise ValueError(f"mask {i} has shape {m.shape} but map {i} has shape {a.shape}; resize one to the other")
        a = np.asarray(a, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"map {i} contains NaN or infinite values")
        out_masks.append(np.asarray(m) > 0)
        out_maps.append(a)
    return out_masks, out_maps


def _stratified_subsample(
    y: np.ndarray, s: np.ndarray, max_pixels: int, random_state: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ``max_pixels`` pixels, the same fraction of each class (deterministic).

    Keeping the class ratio leaves AP unbiased, and keeps at least one pixel of each class.
    """
    if max_pixels is None or y.size <= max_pixels:
        return y, s
    rng = np.random.default_rng(random_state)
    frac = max_pixels / y.size
    keep = []
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        if idx.size == 0:
            continue
        k = max(1, int(round(idx.size * frac)))
        keep.append(rng.choice(idx, size=min(k, idx.size), replace=False))
    sel = np.sort(np.concatenate(keep))
    logger.debug("subsampled %d of %d pixels", sel.size, y.size)
    return y[sel], s[sel]


def pixel_metrics(
    masks: ArrayLike | Sequence[np.ndarray],
    maps: ArrayLike | Sequence[np.ndarray],
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    random_state: int = 0,
) -> dict[str, float]:
    """Pixel-level AUROC and average precision.

    Args:
        masks: ``(N, H, W)`` ground truth (non-zero = defect), or a list of ``(H, W)``.
        maps: ``(N, H, W)`` anomaly maps at the masks' resolution, higher = more anomalous.
        max_pixels: bound on the pixels given to scikit-learn; above it a deterministic
            class-stratified random subsample is used (``None`` = all pixels).
        random_state: seed of that subsample.

    Returns:
        ``{"pixel_auroc", "pixel_ap"}``.

    Raises:
        ValueError: shape mismatch, non-finite maps, or masks with no defect / no normal pixel.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    mk, mp = _flatten_pairs(masks, maps)
    y = np.concatenate([m.ravel() for m in mk]).astype(np.int8)
    s = np.concatenate([a.ravel() for a in mp])
    _require_both_classes(y, "mask pixels")
    y, s = _stratified_subsample(y, s, max_pixels, random_state)
    return {
        "pixel_auroc": float(roc_auc_score(y, s)),
        "pixel_ap": float(average_precision_score(y, s)),
    }


# ----------------------------------------------------------------------------------------------
# AUPRO
# ----------------------------------------------------------------------------------------------
def pro_curve(
    masks: ArrayLike | Sequence[np.ndarray],
    maps: ArrayLike | Sequence[np.ndarray],
    num_thresholds: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-region-overlap curve: (FPR, PRO) for decreasing thresholds.

    For a threshold ``t`` the prediction is ``map > t``. FPR is the fraction of normal pixels
    (mask == 0, over all images) predicted defective; PRO is the mean, over every connected
    ground-truth region (8-connectivity, ``cv2.connectedComponents`` per mask), of the fraction
    of that region's pixels predicted defective. Every region counts equally, whatever its size.

    Computed as in the official MVTec AD evaluation: sort all pixels by score once, then
    cumulative sums give FPR and PRO at every threshold.

    Args:
        masks: ``(N, H, W)`` ground truth or list of ``(H, W)``; non-zero = defect.
        maps: matching anomaly maps.
        num_thresholds: ``None`` = exact curve (one point per distinct score); an int = that many
            thresholds evenly spaced between the maps' min and max (as anomalib does).

    Returns:
        ``(fpr, pro, thresholds)``, each ``(K,)``, with fpr and pro non-decreasing and
        thresholds decreasing; the first point is ``(0, 0)`` at ``threshold = +inf``.
    """
    mk, mp = _flatten_pairs(masks, maps)
    scores, weights_fp, weights_pro = [], [], []
    n_normal = sum(int(np.count_nonzero(~m)) for m in mk)
    n_regions = 0
    region_labels = []
    for m in mk:
        n_lab, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        region_labels.append((n_lab - 1, lab))
        n_regions += n_lab - 1
    if n_regions == 0:
        raise ValueError("masks contain no defect region: AUPRO needs at least one defect pixel")
    if n_normal == 0:
        raise ValueError("masks contain no normal pixel: AUPRO needs normal pixels for the FPR")
    for (n_reg, lab), a in zip(region_labels, mp):
        lab = lab.ravel()
        sizes = np.bincount(lab, minlength=n_reg + 1).astype(np.float64)
        # each pixel of region r adds 1 / (|r| * R) to PRO once predicted; each normal pixel adds
        # 1 / n_normal to FPR
        w_pro = np.where(lab > 0, 1.0 / (sizes[lab] * n_regions), 0.0)
        w_fp = np.where(lab == 0, 1.0 / n_normal, 0.0)
        scores.append(a.ravel())
        weights_pro.append(w_pro)
        weights_fp.append(w_fp)
    s = np.concatenate(scores)
    w_pro = np.concatenate(weights_pro)
    w_fp = np.concatenate(weights_fp)
    order = np.argsort(-s, kind="stable")
    s = s[order]
    cum_fp = np.cumsum(w_fp[order])
    cum_pro = np.cumsum(w_pro[order])
    if num_thresholds is None:
        # the curve is defined at the end of each group of tied scores
        last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
        fpr, pro = cum_fp[last], cum_pro[last]
        # the point selects every pixel with score >= s[last], i.e. ``map > t`` for t just below
        thr = np.nextafter(s[last], -np.inf)
    else:
        if num_thresholds < 2:
            raise ValueError(f"num_thresholds must be >= 2 or None; got {num_thresholds}")
        thr = np.linspace(s[0], s[-1], num_thresholds)  # decreasing
        # number of pixels with score > t; s is sorted descending
        n_above = np.searchsorted(-s, -thr, side="left")
        cum_fp0 = np.r_[0.0, cum_fp]
        cum_pro0 = np.r_[0.0, cum_pro]
        fpr, pro = cum_fp0[n_above], cum_pro0[n_above]
    fpr = np.r_[0.0, np.clip(fpr, 0.0, 1.0)]
    pro = np.r_[0.0, np.clip(pro, 0.0, 1.0)]
    thr = np.r_[np.inf, thr]
    return fpr, pro, thr


def aupro(
    masks: ArrayLike | Sequence[np.ndarray],
    maps: ArrayLike | Sequence[np.ndarray],
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD's AU-PRO).

    The PRO-vs-FPR curve of :func:`pro_curve` is integrated with the trapezoid rule from FPR 0 to
    ``fpr_limit`` (the last segment is linearly interpolated at the limit) and divided by
    ``fpr_limit``, so a perfect map scores 1.0 and a map that ranks every defect pixel below every
    normal pixel scores 0.0.

    Args:
        masks: ``(N, H, W)`` ground truth (non-zero = defect) or list of ``(H, W)``.
        maps: matching anomaly maps, higher = more anomalous.
        fpr_limit: upper FPR integration limit in ``(0, 1]``; 0.3 is the MVTec standard.
        num_thresholds: ``None`` = exact; int = evenly spaced thresholds (see :func:`pro_curve`).

    Returns:
        AU-PRO in ``[0, 1]``.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    fpr, pro, _ = pro_curve(masks, maps, num_thresholds=num_thresholds)
    # make the curve end at fpr = 1 (every pixel predicted) for the interpolation below
    if fpr[-1] < 1.0:
        fpr, pro = np.r_[fpr, 1.0], np.r_[pro, 1.0]
    inside = fpr <= fpr_limit
    x, y = fpr[inside], pro[inside]
    if x[-1] < fpr_limit:
        j = int(np.argmax(fpr > fpr_limit))  # first point beyond the limit
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    return float(np.clip(area / fpr_limit, 0.0, 1.0))

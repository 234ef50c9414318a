"""Threshold calibration: turn raw anomaly scores into decisions (and probabilities).

Torch-free (numpy, scikit-learn, OpenCV). The deployed runtime does not import this module: it
applies the sidecar's calibration with :class:`anomaly.decision.ImageDecision` (numpy alone, no
scikit-learn import at load time), and :class:`ThresholdCalibrator` calls the same functions.

Scores follow the PyOD sign (higher = more anomalous) and a sample is a defect when
``score > threshold_`` (strictly).

Image-threshold methods (:class:`ThresholdCalibrator`):

==============  ====================  ==========================================================
method          needs                 threshold
==============  ====================  ==========================================================
``fpr``         normal scores         empirical quantile of the normals at ``1 - target_fpr``
                                      (``np.quantile(method="higher")``: an actual normal score,
                                      so the measured FPR on the fit normals is
                                      ``<= target_fpr``)
``sigma``       normal scores         ``mean + k * std`` of the normals (population std)
``percentile``  normal scores         ``np.percentile(normals, percentile, method="higher")``
``f1``          normals and defects   F1-max on ``sklearn.metrics.precision_recall_curve``
``youden``      normals and defects   max of Youden's J = TPR - FPR on ``sklearn.metrics.roc_curve``
==============  ====================  ==========================================================

For ``f1`` / ``youden`` the curve's ``score >= t`` threshold is converted to ``score > t'`` with
``t'`` the midpoint between ``t`` and the next lower score (identical decisions on the fit data).

Optionally (``probability="isotonic"`` or ``"logistic"``, with labelled defects) a probability
model maps scores to P(defect) (Platt, 1999; Zadrozny & Elkan, 2002). Both are evaluated with
plain numpy (``np.interp`` for isotonic, a sigmoid for logistic; :mod:`anomaly.decision`), so a
calibrator rebuilt from its dict, and the runtime, give bit-identical outputs.

:class:`PixelThresholdCalibrator` (and :func:`fit_pixel_threshold`) does the same for the pixel
threshold used to segment anomaly maps: ``fpr`` on normal pixels, or ``f1`` over pixels with
ground-truth masks (deterministic subsampling bounds memory).

Example::

    cal = ThresholdCalibrator(method="fpr", target_fpr=0.01).fit(val_normal_scores)
    cal.predict(test_scores)                  # (N,) 0/1
    json.dump(cal.to_dict(), f)               # sidecar
    cal2 = ThresholdCalibrator.from_dict(json.load(f))

    cal = ThresholdCalibrator(method="f1", probability="isotonic").fit(scores, labels)
    cal.predict_proba(test_scores)            # (N,) P(defect)
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from anomaly.decision import PROBABILITY_MODELS, SCHEMA, check_calibration_dict, decide, defect_probability
from anomaly.metrics import (
    _as_labels,
    _as_scores,
    _flatten_pairs,
    _require_both_classes,
    f1_max_threshold,
    youden_threshold,
)

__all__ = [
    "NORMAL_METHODS",
    "DEFECT_METHODS",
    "METHODS",
    "PROBABILITY_MODELS",
    "ThresholdCalibrator",
    "PixelThresholdCalibrator",
    "fit_pixel_threshold",
]

logger = logging.getLogger(__name__)

NORMAL_METHODS = ("fpr", "sigma", "percentile")
DEFECT_METHODS = ("f1", "youden")
METHODS = NORMAL_METHODS + DEFECT_METHODS
PIXEL_METHODS = ("fpr", "f1")

#: Number of bins of the stored normal-score histogram.
HISTOGRAM_BINS = 50
PIXEL_SCHEMA = "anomaly.pixel_threshold_calibrator/1"


def _histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, list]:
    counts, edges = np.histogram(values, bins=bins)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _stats(values: np.ndarray) -> dict[str, float]:
    q = np.quantile(values, [0.5, 0.9, 0.99])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "median": float(q[0]),
        "q90": float(q[1]),
        "q99": float(q[2]),
    }


def _check_params(method: str, target_fpr: float, k: float, percentile: float, probability: str | None) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {list(METHODS)}")
    if not 0.0 < float(target_fpr) < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1); got {target_fpr}")
    if not np.isfinite(k):
        raise ValueError(f"k must be finite; got {k}")
    if not 0.0 < float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in (0, 100]; got {percentile}")
    if probability is not None and probability not in PROBABILITY_MODELS:
        raise ValueError(
            f"unknown probability model {probability!r}; expected None or one of {list(PROBABILITY_MODELS)}"
        )


class ThresholdCalibrator(BaseEstimator):
    """Image-score threshold (and optional probability model) following scikit-learn conventions.

    Args:
        method: ``"fpr"``, ``"sigma"``, ``"percentile"`` (normal scores only) or ``"f1"``,
            ``"youden"`` (needs labelled defects). See the module docstring.
        target_fpr: for ``fpr``: accepted false-positive rate on normal images, in ``(0, 1)``.
        k: for ``sigma``: number of standard deviations above the normal mean.
        percentile: for ``percentile``: percentile of the normal scores, in ``(0, 100]``.
        probability: ``None``, ``"isotonic"`` or ``"logistic"``: fit a score -> P(defect) model
            (requires labelled defects) used by :meth:`predict_proba`.

    Attributes:
        threshold_: float, a score ``> threshold_`` is a defect.
        method_: the method used.
        n_normal_, n_defect_: number of normal / defect scores seen in ``fit``.
        normal_histogram_: ``{"edges": [B+1], "counts": [B]}`` of the normal scores.
        normal_stats_: mean, std, min, max, median, q90, q99 of the normal scores.
        expected_fpr_: fraction of the fit normals above the threshold.
        recall_: fraction of the fit defects above the threshold (``None`` without defects).
        probability_model_: ``None`` or a dict of the fitted probability model's parameters.
    """

    def __init__(
        self,
        method: str = "fpr",
        target_fpr: float = 0.01,
        k: float = 3.0,
        percentile: float = 99.0,
        probability: str | None = None,
    ) -> None:
        self.method = method
        self.target_fpr = target_fpr
        self.k = k
        self.percentile = percentile
        self.probability = probability

    # ------------------------------------------------------------------------------------------
    def fit(self, scores: ArrayLike, labels: ArrayLike | None = None) -> "ThresholdCalibrator":
        """Learn the threshold.

        Args:
            scores: ``(N,)`` finite image scores, higher = more anomalous.
            labels: ``(N,)`` 0/1 (1 = defect) or ``None`` (all normal). Normal-only methods use
                the scores with label 0; ``f1``/``youden`` and ``probability`` need both classes.

        Returns:
            ``self``.

        Raises:
            ValueError: unknown method, empty / NaN scores, bad labels, no normal scores, or a
                defect method / probability model without labelled defects.
        """
        _check_params(self.method, self.target_fpr, self.k, self.percentile, self.probability)
        s = _as_scores(scores)
        y = np.zeros(s.size, dtype=np.int64) if labels is None else _as_labels(labels, s.size)
        normal, defect = s[y == 0], s[y == 1]
        if normal.size == 0:
            raise ValueError("no normal scores (label 0) to calibrate on; every label is 1")
        needs_defects = self.method in DEFECT_METHODS or self.probability is not None
        if needs_defects and defect.size == 0:
            what = f"method={self.method!r}" if self.method in DEFECT_METHODS else f"probability={self.probability!r}"
            raise ValueError(
                f"{what} needs labelled defects (labels == 1) as well as normal scores; got only "
                f"{normal.size} normal score(s). Pass labels, or use a normal-only method {list(NORMAL_METHODS)}"
            )

        if self.method == "fpr":
            if normal.size * self.target_fpr < 1.0:
                logger.warning(
                    "only %d normal scores: too few to resolve target_fpr=%g (need >= %d); the "
                    "threshold is the largest normal score", normal.size, self.target_fpr,
                    int(np.ceil(1.0 / self.target_fpr)),
                )
            # "higher": the threshold is an actual normal score and strictly fewer than
            # target_fpr * n normals lie above it, so the measured FPR never exceeds the target
            threshold = float(np.quantile(normal, 1.0 - self.target_fpr, method="higher"))
        elif self.method == "sigma":
            threshold = float(normal.mean() + self.k * normal.std())
        elif self.method == "percentile":
            threshold = float(np.percentile(normal, self.percentile, method="higher"))
        elif self.method == "f1":
            _, threshold = f1_max_threshold(y, s)
        else:  # youden
            _, threshold = youden_threshold(y, s)

        self.threshold_ = threshold
        self.method_ = self.method
        self.n_normal_ = int(normal.size)
        self.n_defect_ = int(defect.size)
        self.normal_histogram_ = _histogram(normal)
        self.normal_stats_ = _stats(normal)
        self.expected_fpr_ = float(np.mean(normal > threshold))
        self.recall_ = float(np.mean(defect > threshold)) if defect.size else None
        self.probability_model_ = self._fit_probability(s, y) if self.probability else None
        logger.info(
            "calibrated threshold %.6g with method=%s on %d normal / %d defect scores "
            "(FPR on fit normals %.4f%s)",
            threshold, self.method, self.n_normal_, self.n_defect_, self.expected_fpr_,
            "" if self.recall_ is None else f", recall {self.recall_:.4f}",
        )
        return self

    def _fit_probability(self, s: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        _require_both_classes(y)
        if self.probability == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(s, y)
            return {
                "kind": "isotonic",
                "X_thresholds_": [float(v) for v in iso.X_thresholds_],
                "y_thresholds_": [float(v) for v in iso.y_thresholds_],
            }
        from sklearn.linear_model import LogisticRegression

        # standardise so the default regularisation behaves whatever the score scale
        center = float(s.mean())
        scale = float(s.std()) or 1.0
        lr = LogisticRegression().fit(((s - center) / scale)[:, None], y)
        return {
            "kind": "logistic",
            "coef": float(lr.coef_.ravel()[0]),
            "intercept": float(lr.intercept_.ravel()[0]),
            "center": center,
            "scale": scale,
        }

    # ------------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "threshold_"):
            raise NotFittedError(
                f"This {type(self).__name__} is not fitted yet; call fit(scores, labels) or "
                "from_dict(...) before using it"
            )

    @property
    def has_probability(self) -> bool:
        """Whether :meth:`predict_proba` is available (fitted with a probability model)."""
        return getattr(self, "probability_model_", None) is not None

    def predict(self, scores: ArrayLike) -> np.ndarray:
        """Decisions ``(N,)`` int 0/1: 1 where ``score > threshold_``."""
        self._check_fitted()
        return decide(scores, self.threshold_)

    def decision_function(self, scores: ArrayLike) -> np.ndarray:
        """Signed margin ``score - threshold_`` ``(N,)``: positive = defect."""
        self._check_fitted()
        return _as_scores(scores) - self.threshold_

    def predict_proba(self, scores: ArrayLike) -> np.ndarray:
        """Probability of defect ``(N,)`` from the fitted probability model.

        Raises:
            NotFittedError: before ``fit``.
            ValueError: the calibrator was fitted without ``probability=...`` (and defects).
        """
        self._check_fitted()
        pm = self.probability_model_
        if pm is None:
            raise ValueError(
                "predict_proba needs a probability model: construct the calibrator with "
                "probability='isotonic' or 'logistic' and fit it with labelled defects"
            )
        return defect_probability(scores, pm)

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (plain Python types), enough for :meth:`from_dict`."""
        self._check_fitted()
        return {
            "schema": SCHEMA,
            "method": self.method_,
            "params": {
                "method": self.method,
                "target_fpr": float(self.target_fpr),
                "k": float(self.k),
                "percentile": float(self.percentile),
                "probability": self.probability,
            },
            "threshold": float(self.threshold_),
            "n_normal": self.n_normal_,
            "n_defect": self.n_defect_,
            "expected_fpr": self.expected_fpr_,
            "recall": self.recall_,
            "normal_histogram": self.normal_histogram_,
            "normal_stats": self.normal_stats_,
            "probability_model": self.probability_model_,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ThresholdCalibrator":
        """Rebuild a fitted calibrator from :meth:`to_dict` output.

        Raises:
            ValueError: see :func:`anomaly.decision.check_calibration_dict` (not a dict, wrong
                schema tag, missing keys, a bad probability model), or unexpected params.
        """
        check_calibration_dict(d)
        try:
            obj = cls(**d["params"])
        except TypeError as exc:
            raise ValueError(f"calibrator dict has unexpected params {d['params']!r}: {exc}") from None
        obj.threshold_ = float(d["threshold"])
        obj.method_ = str(d["method"])
        obj.n_normal_ = int(d["n_normal"])
        obj.n_defect_ = int(d["n_defect"])
        obj.expected_fpr_ = d.get("expected_fpr")
        obj.recall_ = d.get("recall")
        obj.normal_histogram_ = d.get("normal_histogram")
        obj.normal_stats_ = d.get("normal_stats")
        obj.probability_model_ = d.get("probability_model")
        return obj


# ----------------------------------------------------------------------------------------------
# pixel threshold
# ----------------------------------------------------------------------------------------------
class PixelThresholdCalibrator(BaseEstimator):
    """Pixel threshold for segmenting anomaly maps (a pixel is defective where ``map > threshold_``).

    Args:
        method: ``"fpr"``: quantile of normal pixels at ``1 - target_fpr`` (normal pixels are all
            pixels of the maps if no masks are given, else the pixels where mask == 0);
            ``"f1"``: F1-max over pixels, needs masks with defect pixels.
        target_fpr: pixel false-positive rate for ``fpr``, in ``(0, 1)``.
        max_pixels: at most this many pixels are used (deterministic uniform subsample above it).
        random_state: seed of the subsample.

    Attributes:
        threshold_, method_, n_pixels_ (pixels used), expected_fpr_ (on the used normal pixels),
        f1_ (``f1`` method only, else ``None``), normal_histogram_.
    """

    def __init__(
        self, method: str = "fpr", target_fpr: float = 0.01, max_pixels: int = 1_000_000, random_state: int = 0
    ) -> None:
        self.method = method
        self.target_fpr = target_fpr
        self.max_pixels = max_pixels
        self.random_state = random_state

    def fit(
        self,
        maps: ArrayLike | Sequence[np.ndarray],
        masks: ArrayLike | Sequence[np.ndarray] | None = None,
    ) -> "PixelThresholdCalibrator":
        """Learn the pixel threshold.

        Args:
            maps: ``(N, H, W)`` anomaly maps (or a list of ``(H, W)``), higher = more anomalous.
            masks: matching ground truth (non-zero = defect) or ``None`` (all pixels normal).

        Returns:
            ``self``.
        """
        if self.method not in PIXEL_METHODS:
            raise ValueError(f"unknown pixel calibration method {self.method!r}; expected one of {list(PIXEL_METHODS)}")
        if not 0.0 < float(self.target_fpr) < 1.0:
            raise ValueError(f"target_fpr must be in (0, 1); got {self.target_fpr}")
        if masks is None:
            if self.method == "f1":
                raise ValueError("method='f1' needs ground-truth masks with defect pixels; got masks=None")
            _, mp = _flatten_pairs(maps, maps)
            mk = [np.zeros(a.shape, dtype=bool) for a in mp]
        else:
            mk, mp = _flatten_pairs(masks, maps)
        y = np.concatenate([m.ravel() for m in mk]).astype(np.int8)
        s = np.concatenate([a.ravel() for a in mp])
        if self.max_pixels is not None and s.size > self.max_pixels:
            sel = np.sort(np.random.default_rng(self.random_state).choice(s.size, self.max_pixels, replace=False))
            y, s = y[sel], s[sel]
        normal = s[y == 0]
        if self.method == "fpr":
            if normal.size == 0:
                raise ValueError("no normal pixels (mask == 0) to calibrate the pixel threshold on")
            threshold = float(np.quantile(normal, 1.0 - self.target_fpr, method="higher"))
            self.f1_ = None
        else:
            if not np.any(y == 1):
                raise ValueError("method='f1' needs masks with defect pixels; every mask is empty")
            self.f1_, threshold = f1_max_threshold(y, s)
        self.threshold_ = threshold
        self.method_ = self.method
        self.n_pixels_ = int(s.size)
        self.expected_fpr_ = float(np.mean(normal > threshold)) if normal.size else None
        self.normal_histogram_ = _histogram(normal) if normal.size else None
        logger.info("calibrated pixel threshold %.6g with method=%s on %d pixels", threshold, self.method, s.size)
        return self

    def predict(self, maps: ArrayLike) -> np.ndarray:
        """Binary masks (same shape as ``maps``), uint8 0/1: 1 where ``map > threshold_``."""
        if not hasattr(self, "threshold_"):
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet; call fit(maps, masks) first")
        return (np.asarray(maps, dtype=np.float64) > self.threshold_).astype(np.uint8)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, enough for :meth:`from_dict`."""
        if not hasattr(self, "threshold_"):
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet; call fit(maps, masks) first")
        return {
            "schema": PIXEL_SCHEMA,
            "method": self.method_,
            "params": {
                "method": self.method,
                "target_fpr": float(self.target_fpr),
                "max_pixels": self.max_pixels,
                "random_state": self.random_state,
            },
            "threshold": float(self.threshold_),
            "n_pixels": self.n_pixels_,
            "expected_fpr": self.expected_fpr_,
            "f1": self.f1_,
            "normal_histogram": self.normal_histogram_,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PixelThresholdCalibrator":
        """Rebuild a fitted pixel calibrator from :meth:`to_dict` output."""
        if not isinstance(d, dict) or d.get("schema") != PIXEL_SCHEMA:
            found = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"unsupported pixel calibrator dict {found!r}; expected schema {PIXEL_SCHEMA!r}")
        obj = cls(**d["params"])
        obj.threshold_ = float(d["threshold"])
        obj.method_ = str(d["method"])
        obj.n_pixels_ = int(d.get("n_pixels", 0))
        obj.expected_fpr_ = d.get("expected_fpr")
        obj.f1_ = d.get("f1")
        obj.normal_histogram_ = d.get("normal_histogram")
        return obj


def fit_pixel_threshold(
    maps: ArrayLike | Sequence[np.ndarray],
    masks: ArrayLike | Sequence[np.ndarray] | None = None,
    method: str = "fpr",
    target_fpr: float = 0.01,
    max_pixels: int = 1_000_000,
    random_state: int = 0,
) -> float:
    """Shortcut: ``PixelThresholdCalibrator(...).fit(maps, masks).threshold_``."""
    return PixelThresholdCalibrator(
        method=method, target_fpr=target_fpr, max_pixels=max_pixels, random_state=random_state
    ).fit(maps, masks).threshold_

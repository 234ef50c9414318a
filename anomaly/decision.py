"""Applying a fitted image calibration with numpy alone: the runtime's half of the calibration.

:mod:`anomaly.calibration` *fits* thresholds and probability models with scikit-learn. Applying
them is a comparison and an interpolation (isotonic) or a sigmoid (logistic), so the deployed
runtime rebuilds an :class:`ImageDecision` from the sidecar instead of a
:class:`~anomaly.calibration.ThresholdCalibrator`: importing scikit-learn (and SciPy with it)
took 1.2–1.6 s on the 2-core development VM, several times what loading the ONNX model takes, and
a line PC would pay it every time it loads a bundle. ``ThresholdCalibrator.predict``,
``predict_proba`` and ``from_dict`` call the functions below, so training and runtime share one
definition of the decision (bit-identical outputs, tested).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from numpy.typing import ArrayLike

from anomaly.metrics import _as_scores

__all__ = ["SCHEMA", "PROBABILITY_MODELS", "ImageDecision", "check_calibration_dict", "decide", "defect_probability"]

#: Schema tag of ``ThresholdCalibrator.to_dict`` (bump when the layout changes).
SCHEMA = "anomaly.threshold_calibrator/1"
#: Probability models a calibration may carry.
PROBABILITY_MODELS = ("isotonic", "logistic")


def decide(scores: ArrayLike, threshold: float) -> np.ndarray:
    """Decisions ``(N,)`` int64 0/1: 1 (defect) where ``score > threshold`` (strictly).

    Raises:
        ValueError: empty or non-finite scores.
    """
    return (_as_scores(scores) > threshold).astype(np.int64)


def defect_probability(scores: ArrayLike, model: Mapping[str, Any]) -> np.ndarray:
    """Probability of defect ``(N,)`` float64 from a fitted probability model's parameters.

    ``isotonic``: linear interpolation between the fitted steps, clipped at the ends (what
    ``IsotonicRegression(out_of_bounds="clip").predict`` computes). ``logistic``: the sigmoid of
    the fitted line on standardised scores.
    """
    s = _as_scores(scores)
    if model["kind"] == "isotonic":
        return np.interp(s, np.asarray(model["X_thresholds_"]), np.asarray(model["y_thresholds_"]))
    z = model["coef"] * (s - model["center"]) / model["scale"] + model["intercept"]
    return 1.0 / (1.0 + np.exp(-z))


def check_calibration_dict(d: Any) -> None:
    """Raise ``ValueError`` unless ``d`` is a ``ThresholdCalibrator.to_dict()`` of this schema.

    Checks the schema tag, the keys every calibration has and the probability model's kind, so
    that a damaged sidecar fails at load time with the reason, not later with a ``KeyError``.
    """
    if not isinstance(d, dict):
        raise ValueError(f"expected a dict from ThresholdCalibrator.to_dict(); got {type(d).__name__}")
    if d.get("schema") != SCHEMA:
        raise ValueError(f"unsupported calibrator schema {d.get('schema')!r}; expected {SCHEMA!r}")
    missing = [k for k in ("params", "threshold", "method", "n_normal", "n_defect") if k not in d]
    if missing:
        raise ValueError(f"calibrator dict is missing key(s) {missing}")
    try:
        finite = bool(np.isfinite(float(d["threshold"])))
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise ValueError(f"calibrator dict has no finite threshold: {d['threshold']!r}")
    pm = d.get("probability_model")
    if pm is not None:
        if not isinstance(pm, dict) or pm.get("kind") not in PROBABILITY_MODELS:
            kind = pm.get("kind") if isinstance(pm, dict) else type(pm).__name__
            raise ValueError(f"unknown probability model kind {kind!r} in calibrator dict")
        need = ("X_thresholds_", "y_thresholds_") if pm["kind"] == "isotonic" else ("coef", "intercept", "center", "scale")
        lacking = [k for k in need if k not in pm]
        if lacking:
            raise ValueError(f"{pm['kind']} probability model is missing key(s) {lacking}")


@dataclass(frozen=True)
class ImageDecision:
    """A fitted image threshold and optional probability model, applied with numpy.

    Attributes:
        threshold: a score ``> threshold`` is a defect.
        method: the calibration method that chose the threshold (``fpr``, ``f1``, ...).
        probability_model: ``None`` or the fitted model's parameters (see :func:`defect_probability`).
    """

    threshold: float
    method: str
    probability_model: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageDecision":
        """From ``ThresholdCalibrator.to_dict()`` output (the sidecar's ``calibration.image``).

        Raises:
            ValueError: see :func:`check_calibration_dict`.
        """
        check_calibration_dict(d)
        return cls(threshold=float(d["threshold"]), method=str(d["method"]), probability_model=d.get("probability_model"))

    @property
    def has_probability(self) -> bool:
        """Whether :meth:`predict_proba` is available."""
        return self.probability_model is not None

    def predict(self, scores: ArrayLike) -> np.ndarray:
        """Decisions ``(N,)`` int64 0/1 (see :func:`decide`)."""
        return decide(scores, self.threshold)

    def predict_proba(self, scores: ArrayLike) -> np.ndarray:
        """Probability of defect ``(N,)`` (see :func:`defect_probability`).

        Raises:
            ValueError: the calibration has no probability model.
        """
        if self.probability_model is None:
            raise ValueError("this calibration has no probability model: calibrate with labelled defects and "
                             "probability='isotonic' or 'logistic'")
        return defect_probability(scores, self.probability_model)

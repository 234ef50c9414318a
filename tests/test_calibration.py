"""Tests for anomaly.calibration: threshold methods, probability models, serialisation, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from anomaly.calibration import PixelThresholdCalibrator, ThresholdCalibrator, fit_pixel_threshold
from anomaly.decision import ImageDecision


def _separable(n: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Normals uniform in [0, 1), defects uniform in [2, 3)."""
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.random(n), 2 + rng.random(n)]
    labels = np.r_[np.zeros(n, int), np.ones(n, int)]
    return scores, labels


def _overlapping(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return np.r_[rng.normal(0, 1, n), rng.normal(2.5, 1, n)], np.r_[np.zeros(n, int), np.ones(n, int)]


# ---------------------------------------------------------------------------------------------
# normal-only methods
# ---------------------------------------------------------------------------------------------
def test_fpr_exact_on_known_scores():
    # 100 normals 0..99, target 10 %: np.quantile(q=.9, method="higher") -> index ceil(.9 * 99) = 90
    cal = ThresholdCalibrator(method="fpr", target_fpr=0.1).fit(np.arange(100.0))
    assert cal.threshold_ == 90.0
    assert cal.expected_fpr_ == pytest.approx(0.09)  # 91..99 lie above: never more than the target
    assert cal.predict([89.0, 90.0, 90.5]).tolist() == [0, 0, 1]


def test_fpr_on_gaussian_gives_target_rate():
    rng = np.random.default_rng(0)
    cal = ThresholdCalibrator(method="fpr", target_fpr=0.05).fit(rng.normal(size=100_000))
    assert cal.threshold_ == pytest.approx(1.6449, abs=0.03)  # N(0, 1) 95 % quantile
    assert 0.049 <= cal.expected_fpr_ <= 0.05
    fresh = rng.normal(size=100_000)
    assert cal.predict(fresh).mean() == pytest.approx(0.05, abs=0.004)
    assert cal.n_normal_ == 100_000 and cal.n_defect_ == 0 and cal.recall_ is None


def test_sigma_and_percentile():
    s = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    cal = ThresholdCalibrator(method="sigma", k=2.0).fit(s)
    assert cal.threshold_ == pytest.approx(3.0 + 2.0 * np.sqrt(2.0))  # population std of 1..5 = sqrt(2)
    cal = ThresholdCalibrator(method="percentile", percentile=50).fit(s)
    assert cal.threshold_ == 3.0
    cal = ThresholdCalibrator(method="percentile", percentile=100).fit(s)
    assert cal.threshold_ == 5.0 and cal.expected_fpr_ == 0.0


def test_normal_methods_use_only_label_zero():
    scores, labels = _separable()
    with_labels = ThresholdCalibrator(method="fpr", target_fpr=0.1).fit(scores, labels)
    normals_only = ThresholdCalibrator(method="fpr", target_fpr=0.1).fit(scores[labels == 0])
    assert with_labels.threshold_ == normals_only.threshold_
    assert with_labels.n_normal_ == 50 and with_labels.n_defect_ == 50
    assert with_labels.recall_ == 1.0


def test_histogram_and_stats():
    s = np.random.default_rng(1).random(500)
    cal = ThresholdCalibrator().fit(s)
    h = cal.normal_histogram_
    assert len(h["edges"]) == len(h["counts"]) + 1
    assert sum(h["counts"]) == 500
    assert h["edges"][0] == pytest.approx(s.min()) and h["edges"][-1] == pytest.approx(s.max())
    assert cal.normal_stats_["mean"] == pytest.approx(s.mean())


# ---------------------------------------------------------------------------------------------
# methods with defects
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["f1", "youden"])
def test_defect_methods_pick_the_gap_on_separable_data(method):
    scores, labels = _separable()
    cal = ThresholdCalibrator(method=method).fit(scores, labels)
    gap_lo, gap_hi = scores[labels == 0].max(), scores[labels == 1].min()
    assert cal.threshold_ == pytest.approx((gap_lo + gap_hi) / 2)  # midpoint of the gap
    assert np.array_equal(cal.predict(scores), labels)
    assert cal.expected_fpr_ == 0.0 and cal.recall_ == 1.0


@pytest.mark.parametrize("method", ["f1", "youden"])
def test_defect_methods_on_overlapping_data(method):
    scores, labels = _overlapping()
    cal = ThresholdCalibrator(method=method).fit(scores, labels)
    # equal-variance Gaussians at 0 and 2.5 with equal priors: both optima sit near 1.25
    assert 0.6 < cal.threshold_ < 1.9
    assert 0.0 < cal.expected_fpr_ < 0.3 and 0.7 < cal.recall_ < 1.0


def test_youden_maximises_j():
    scores, labels = _overlapping(seed=5)
    cal = ThresholdCalibrator(method="youden").fit(scores, labels)
    j_best = cal.recall_ - cal.expected_fpr_
    for t in np.unique(scores):
        pred = scores > t
        j = pred[labels == 1].mean() - pred[labels == 0].mean()
        assert j <= j_best + 1e-12


# ---------------------------------------------------------------------------------------------
# probability
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["isotonic", "logistic"])
def test_predict_proba(kind):
    scores, labels = _overlapping()
    cal = ThresholdCalibrator(method="f1", probability=kind).fit(scores, labels)
    assert cal.has_probability
    grid = np.linspace(-4, 7, 50)
    p = cal.predict_proba(grid)
    assert p.shape == (50,)
    assert np.all((p >= 0) & (p <= 1)) and np.all(np.diff(p) >= 0)
    assert p[0] < 0.05 and p[-1] > 0.95
    if kind == "isotonic":  # same values as scikit-learn's own predict
        from sklearn.isotonic import IsotonicRegression

        ref = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(scores, labels).predict(grid)
        np.testing.assert_allclose(p, ref, atol=1e-12)


def test_predict_proba_without_probability_model():
    cal = ThresholdCalibrator().fit(np.arange(10.0))
    assert not cal.has_probability
    with pytest.raises(ValueError, match="probability="):
        cal.predict_proba([1.0])
    with pytest.raises(ValueError, match="labelled defects"):
        ThresholdCalibrator(probability="isotonic").fit(np.arange(10.0))


# ---------------------------------------------------------------------------------------------
# conventions, serialisation, errors
# ---------------------------------------------------------------------------------------------
def test_sklearn_conventions():
    cal = ThresholdCalibrator(method="sigma", k=2.5)
    assert cal.get_params() == {"method": "sigma", "target_fpr": 0.01, "k": 2.5, "percentile": 99.0,
                                "probability": None}
    assert not any(k.endswith("_") for k in vars(cal))  # __init__ stores params only
    assert clone(cal).get_params() == cal.get_params()
    # invalid params are only reported at fit time
    bad = ThresholdCalibrator(method="nope")
    with pytest.raises(ValueError, match="unknown calibration method 'nope'"):
        bad.fit([1.0, 2.0])
    assert ThresholdCalibrator().fit([1.0, 2.0]) is not None


def test_not_fitted_error():
    cal = ThresholdCalibrator()
    for call in (lambda: cal.predict([1.0]), lambda: cal.predict_proba([1.0]), cal.to_dict,
                 lambda: cal.decision_function([1.0])):
        with pytest.raises(NotFittedError):
            call()
    with pytest.raises(NotFittedError):
        PixelThresholdCalibrator().predict(np.zeros((2, 2)))


@pytest.mark.parametrize(
    "kwargs", [dict(method="fpr"), dict(method="sigma"), dict(method="percentile"),
               dict(method="f1", probability="isotonic"), dict(method="youden", probability="logistic")]
)
def test_to_dict_round_trip(kwargs):
    scores, labels = _overlapping()
    cal = ThresholdCalibrator(**kwargs).fit(scores, labels)
    d = json.loads(json.dumps(cal.to_dict()))  # through real JSON text
    cal2 = ThresholdCalibrator.from_dict(d)
    test = np.random.default_rng(9).normal(1, 2, 1000)
    assert cal2.threshold_ == cal.threshold_
    assert cal2.get_params() == cal.get_params()
    np.testing.assert_array_equal(cal2.predict(test), cal.predict(test))
    if cal.has_probability:
        np.testing.assert_array_equal(cal2.predict_proba(test), cal.predict_proba(test))
    assert cal2.to_dict() == d


def test_from_dict_errors():
    with pytest.raises(ValueError, match="schema"):
        ThresholdCalibrator.from_dict({"schema": "other/9", "threshold": 1.0})
    with pytest.raises(ValueError, match="expected a dict"):
        ThresholdCalibrator.from_dict([1, 2])
    d = ThresholdCalibrator().fit(np.arange(5.0)).to_dict()
    del d["threshold"]
    with pytest.raises(ValueError, match="threshold"):
        ThresholdCalibrator.from_dict(d)


@pytest.mark.parametrize("kwargs", [dict(method="fpr"), dict(method="f1", probability="isotonic"),
                                    dict(method="youden", probability="logistic")])
def test_image_decision_matches_calibrator(kwargs):
    """The runtime's numpy-only decision gives the calibrator's labels and probabilities, bit for bit."""
    scores, labels = _overlapping()
    cal = ThresholdCalibrator(**kwargs).fit(scores, labels)
    dec = ImageDecision.from_dict(json.loads(json.dumps(cal.to_dict())))
    test = np.r_[np.random.default_rng(3).normal(1, 2, 1000), cal.threshold_]  # the threshold itself is normal
    assert dec.threshold == cal.threshold_ and dec.method == kwargs["method"]
    np.testing.assert_array_equal(dec.predict(test), cal.predict(test))
    assert dec.predict([cal.threshold_])[0] == 0 and dec.predict([np.nextafter(cal.threshold_, np.inf)])[0] == 1
    assert dec.has_probability == cal.has_probability
    if cal.has_probability:
        p = dec.predict_proba(test)
        np.testing.assert_array_equal(p, cal.predict_proba(test))
        assert ((p >= 0) & (p <= 1)).all() and p[np.argmax(test)] > p[np.argmin(test)]
    else:
        with pytest.raises(ValueError, match="no probability model"):
            dec.predict_proba(test)


def test_image_decision_rejects_damaged_calibrations():
    good = ThresholdCalibrator(method="f1", probability="logistic").fit(*_overlapping()).to_dict()
    cases = [
        ({**good, "schema": "other/9"}, "schema"),
        ({**good, "threshold": float("nan")}, "finite threshold"),
        ({**good, "threshold": None}, "finite threshold"),
        ({k: v for k, v in good.items() if k != "method"}, "missing key"),
        ({**good, "probability_model": {"kind": "platt"}}, "unknown probability model kind 'platt'"),
        ({**good, "probability_model": {"kind": "logistic", "coef": 1.0}}, "missing key.*intercept"),
        ({**good, "probability_model": {"kind": "isotonic", "X_thresholds_": [0.0]}}, "y_thresholds_"),
    ]
    for d, match in cases:
        with pytest.raises(ValueError, match=match):
            ImageDecision.from_dict(d)
        with pytest.raises(ValueError, match=match):  # the training side checks the same way
            ThresholdCalibrator.from_dict(d)
    with pytest.raises(ValueError, match="expected a dict"):
        ImageDecision.from_dict([1, 2])
    with pytest.raises(ValueError, match="NaN"):
        ImageDecision.from_dict(good).predict([np.nan])


def test_bad_input_errors():
    cal = ThresholdCalibrator()
    with pytest.raises(ValueError, match="empty"):
        cal.fit([])
    with pytest.raises(ValueError, match="NaN"):
        cal.fit([0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="needs labelled defects"):
        ThresholdCalibrator(method="f1").fit([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="needs labelled defects"):
        ThresholdCalibrator(method="youden").fit([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="no normal scores"):
        ThresholdCalibrator(method="fpr").fit([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        cal.fit([0.1, 0.2], [0, 3])
    with pytest.raises(ValueError, match="target_fpr"):
        ThresholdCalibrator(target_fpr=1.5).fit([0.1, 0.2])
    with pytest.raises(ValueError, match="unknown probability model"):
        ThresholdCalibrator(probability="platt").fit([0.1, 0.2])
    fitted = ThresholdCalibrator().fit([0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        fitted.predict([np.nan])


# ---------------------------------------------------------------------------------------------
# pixel threshold
# ---------------------------------------------------------------------------------------------
def test_pixel_fpr_normal_only():
    rng = np.random.default_rng(0)
    maps = rng.random((20, 32, 32))  # uniform [0, 1): 99 % quantile ~ .99
    cal = PixelThresholdCalibrator(method="fpr", target_fpr=0.01).fit(maps)
    assert cal.threshold_ == pytest.approx(0.99, abs=0.005)
    assert cal.expected_fpr_ <= 0.01
    assert cal.predict(maps).mean() == pytest.approx(0.01, abs=0.002)
    assert fit_pixel_threshold(maps, target_fpr=0.01) == cal.threshold_


def test_pixel_fpr_with_masks_uses_normal_pixels_only():
    maps = np.zeros((2, 10, 10))
    masks = np.zeros((2, 10, 10), np.uint8)
    masks[:, :5] = 255
    maps[:, :5] = 100.0  # defect pixels are huge; the normal-pixel quantile must ignore them
    maps[:, 5:] = np.random.default_rng(0).random((2, 5, 10))
    cal = PixelThresholdCalibrator(target_fpr=0.1).fit(maps, masks)
    assert cal.threshold_ < 1.0


def test_pixel_f1_with_masks_and_subsampling():
    rng = np.random.default_rng(0)
    masks = np.zeros((10, 40, 40), np.uint8)
    masks[:, 10:20, 10:20] = 1
    maps = rng.random(masks.shape) * 0.5 + 0.6 * masks  # normals < .5, defects > .6
    cal = PixelThresholdCalibrator(method="f1", max_pixels=3000).fit(maps, masks)
    assert 0.5 <= cal.threshold_ <= 0.6 and cal.f1_ == 1.0
    assert cal.n_pixels_ == 3000
    again = PixelThresholdCalibrator(method="f1", max_pixels=3000).fit(maps, masks)
    assert again.threshold_ == cal.threshold_  # deterministic subsample
    d = json.loads(json.dumps(cal.to_dict()))
    assert PixelThresholdCalibrator.from_dict(d).threshold_ == cal.threshold_
    np.testing.assert_array_equal(PixelThresholdCalibrator.from_dict(d).predict(maps), masks)


def test_pixel_errors():
    with pytest.raises(ValueError, match="needs ground-truth masks"):
        PixelThresholdCalibrator(method="f1").fit(np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="every mask is empty"):
        PixelThresholdCalibrator(method="f1").fit(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="unknown pixel calibration method"):
        PixelThresholdCalibrator(method="sigma").fit(np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="shape"):
        PixelThresholdCalibrator().fit(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))

"""Tests for anomaly.metrics: hand-computed cases, a brute-force AUPRO reference, edge cases."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomaly.metrics import aupro, confusion_counts, image_metrics, pixel_metrics, pro_curve

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# image level
# ---------------------------------------------------------------------------------------------
def test_image_metrics_perfect_and_inverted():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    m = image_metrics(labels, scores)
    assert m["auroc"] == 1.0 and m["ap"] == 1.0 and m["f1_max"] == 1.0
    # strict rule score > t; midpoint between the last normal and the first defect
    assert m["f1_threshold"] == pytest.approx(0.55)
    inv = image_metrics(labels, -scores)
    assert inv["auroc"] == 0.0


def test_image_metrics_random_is_half():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 20000)
    scores = rng.normal(size=20000)
    assert image_metrics(labels, scores)["auroc"] == pytest.approx(0.5, abs=0.02)


def test_f1_max_tiny_example():
    # sorted by score: 0.9(1) 0.8(1) 0.4(0) 0.35(1) 0.2(0) 0.1(0)
    # top-k F1: k=1 .5, k=2 .8, k=3 2/3, k=4 P=3/4 R=1 -> 6/7, k=5 .75, k=6 2/3
    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    m = image_metrics(labels, scores)
    assert m["f1_max"] == pytest.approx(6 / 7)
    # predicting the top 4 means score >= 0.35, i.e. score > midpoint(0.35, 0.2)
    assert m["f1_threshold"] == pytest.approx(0.275)
    # AP by hand: recall steps at ranks 1, 2, 4 with precisions 1, 1, 3/4 -> (1 + 1 + .75) / 3
    assert m["ap"] == pytest.approx((1 + 1 + 0.75) / 3)
    # AUROC: pairs (defect > normal): 0.9 and 0.8 beat 3 normals each, 0.35 beats 2 -> 8/9
    assert m["auroc"] == pytest.approx(8 / 9)


def test_image_metrics_errors():
    with pytest.raises(ValueError, match="one class"):
        image_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one class"):
        image_metrics([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        image_metrics([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="shape"):
        image_metrics([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        image_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="empty"):
        image_metrics([], [])


def test_confusion_counts():
    c = confusion_counts([1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0])
    assert c == {"tp": 2, "fp": 1, "tn": 2, "fn": 1}
    with pytest.raises(ValueError):
        confusion_counts([1, 0], [1])


# ---------------------------------------------------------------------------------------------
# pixel level
# ---------------------------------------------------------------------------------------------
def _blob_masks(n: int = 4, size: int = 32, seed: int = 0, radius: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    for m in masks:
        cx, cy = rng.integers(2 * radius, size - 2 * radius, 2)
        cv2.circle(m, (int(cx), int(cy)), radius, 255, -1)
    return masks


def test_pixel_metrics_perfect_inverted_and_subsampling():
    masks = _blob_masks()
    maps = (masks > 0).astype(np.float32) + 0.01 * np.random.default_rng(1).random(masks.shape)
    p = pixel_metrics(masks, maps)
    assert p["pixel_auroc"] == 1.0 and p["pixel_ap"] == pytest.approx(1.0)
    assert pixel_metrics(masks, -maps)["pixel_auroc"] == 0.0
    # subsampling: deterministic and close to the full value on a noisy map
    noisy = maps + np.random.default_rng(2).normal(0, 0.6, maps.shape)
    full = pixel_metrics(masks, noisy, max_pixels=None)
    a = pixel_metrics(masks, noisy, max_pixels=1500)
    b = pixel_metrics(masks, noisy, max_pixels=1500)
    assert a == b
    assert a["pixel_auroc"] == pytest.approx(full["pixel_auroc"], abs=0.05)
    # list of differently sized maps is accepted
    p2 = pixel_metrics([masks[0], masks[1][:20, :24]], [maps[0], maps[1][:20, :24]])
    assert p2["pixel_auroc"] == 1.0


def test_pixel_metrics_errors():
    masks = np.zeros((2, 8, 8))
    with pytest.raises(ValueError, match="one class"):
        pixel_metrics(masks, np.random.default_rng(0).random((2, 8, 8)))
    with pytest.raises(ValueError, match="shape"):
        pixel_metrics(np.ones((1, 8, 8)), np.ones((1, 8, 9)))
    with pytest.raises(ValueError, match="2 masks but 1 maps"):
        pixel_metrics(np.ones((2, 8, 8)), np.ones((1, 8, 8)))


# ---------------------------------------------------------------------------------------------
# AUPRO
# ---------------------------------------------------------------------------------------------
# Hand example (H=2, W=4). Mask: region A = pixel (0,0), region B = pixels (0,2),(0,3);
# the other 5 pixels are normal. A and B are not 8-connected (column 1 lies between).
#   map row 0: A=.9  n=.5  B=.8  B=.3
#   map row 1: n=.1  n=.2  n=.6  n=.4
# Lowering the threshold through the sorted scores .9 .8 .6 .5 .4 .3 .2 .1:
#   start        FPR 0    PRO 0
#   .9 (A)       FPR 0    PRO (1 + 0)/2   = .5
#   .8 (B half)  FPR 0    PRO (1 + .5)/2  = .75
#   .6 .5 .4 (n) FPR .2, .4, .6   PRO .75
#   .3 (B full)  FPR .6   PRO 1
#   .2 .1 (n)    FPR .8, 1  PRO 1
# Area up to FPR .3 = .3 * .75 -> normalised .75.
# Area up to FPR 1  = .6 * .75 + .4 * 1 = .85.
# Area up to FPR .7 = .6 * .75 + .1 * 1 = .55 -> normalised .55 / .7.
HAND_MASK = np.array([[1, 0, 1, 1], [0, 0, 0, 0]], np.uint8)
HAND_MAP = np.array([[0.9, 0.5, 0.8, 0.3], [0.1, 0.2, 0.6, 0.4]])


def test_aupro_hand_example():
    assert aupro(HAND_MASK[None], HAND_MAP[None], fpr_limit=0.3) == pytest.approx(0.75)
    assert aupro(HAND_MASK[None], HAND_MAP[None], fpr_limit=1.0) == pytest.approx(0.85)
    assert aupro(HAND_MASK[None], HAND_MAP[None], fpr_limit=0.7) == pytest.approx(0.55 / 0.7)
    fpr, pro, thr = pro_curve(HAND_MASK[None], HAND_MAP[None])
    np.testing.assert_allclose(pro, [0, 0.5, 0.75, 0.75, 0.75, 0.75, 1, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.2, 0.4, 0.6, 0.6, 0.8, 1.0])
    assert np.all(np.diff(thr) < 0)


def test_aupro_regions_count_equally_across_images():
    # the same example split over two images gives the same value (regions pooled, FPR pooled)
    masks = [HAND_MASK[:, :2], HAND_MASK[:, 2:]]
    maps = [HAND_MAP[:, :2], HAND_MAP[:, 2:]]
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.85)


def test_aupro_perfect_and_inverted():
    masks = _blob_masks()
    perfect = (masks > 0).astype(np.float64)
    assert aupro(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, -perfect) == pytest.approx(0.0)
    assert aupro(masks, perfect, num_thresholds=50) == pytest.approx(1.0)


def _brute_force_aupro(masks, maps, fpr_limit):
    """Literal definition: loop over every distinct threshold, average the region overlaps."""
    regions = list(_regions_by_image(masks))
    normal = np.concatenate([(m == 0).ravel() for m in masks])
    allv = np.concatenate([a.ravel() for a in maps])
    xs, ys = [0.0], [0.0]
    for t in np.unique(allv)[::-1]:
        t = np.nextafter(t, -np.inf)  # include the pixels equal to this score
        pred = [a > t for a in maps]
        xs.append(np.concatenate([p.ravel() for p in pred])[normal].mean())
        ys.append(np.mean([pred[i][reg].mean() for i, reg in regions]))
    x, y = np.array(xs), np.array(ys)
    inside = x <= fpr_limit
    xi, yi = list(x[inside]), list(y[inside])
    if xi[-1] < fpr_limit:  # interpolate the segment crossing the limit
        j = int(np.argmax(x > fpr_limit))
        xi.append(fpr_limit)
        yi.append(y[j - 1] + (y[j] - y[j - 1]) * (fpr_limit - x[j - 1]) / (x[j] - x[j - 1]))
    return np.trapezoid(yi, xi) / fpr_limit


def _regions_by_image(masks):
    for i, m in enumerate(masks):
        n, lab = cv2.connectedComponents((m > 0).astype(np.uint8), connectivity=8)
        for r in range(1, n):
            yield i, lab == r


def test_aupro_matches_brute_force_definition():
    rng = np.random.default_rng(3)
    masks = _blob_masks(n=3, size=16, seed=4, radius=2)
    masks[0, 1:3, 1:3] = 255  # a second, small region in image 0
    maps = 0.5 * (masks > 0) + rng.random(masks.shape)
    maps = np.round(maps, 2)  # create ties
    for limit in (0.05, 0.3, 1.0):
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(_brute_force_aupro(masks, maps, limit), abs=1e-9)
    # evenly spaced thresholds approximate the exact value
    assert aupro(masks, maps, num_thresholds=500) == pytest.approx(aupro(masks, maps), abs=0.02)


def test_aupro_errors():
    with pytest.raises(ValueError, match="no defect region"):
        aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="no normal pixel"):
        aupro(np.ones((1, 4, 4)), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(HAND_MASK[None], HAND_MAP[None], fpr_limit=0.0)


# ---------------------------------------------------------------------------------------------
# runtime stays torch-free
# ---------------------------------------------------------------------------------------------
def test_runtime_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import anomaly.calibration, anomaly.metrics, anomaly.deploy.regions\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    # the installed package (editable here, the wheel in the torch-free venv), not the source folder
    res = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr

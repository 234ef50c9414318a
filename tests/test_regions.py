"""Tests for anomaly.deploy.regions: regions at original resolution, resizing, heatmap overlays."""
from __future__ import annotations

import json

import numpy as np
import pytest

from anomaly.deploy.regions import Region, find_regions, overlay_heatmap, resize_map


def _two_blob_map() -> np.ndarray:
    """64x64 map with blob A (rows 10-19, cols 5-14, value 1.0) and B (rows 40-49, cols 30-44, 0.8)."""
    m = np.zeros((64, 64), np.float32)
    m[10:20, 5:15] = 1.0
    m[40:50, 30:45] = 0.8
    return m


# With the map resized bilinearly to (256, 192) (x4 in y, x3 in x) and threshold 0.4, a blob
# edge between map pixels i-1 (0) and i (v >= .8) crosses v/2 >= .4 at map coordinate i - .5, i.e.
# original row 4i - .5 / column 3i - .5: the boxes are exactly the map boxes scaled.
EXPECTED_A = (15, 40, 30, 40)   # x = 5*3, y = 10*4, w = 10*3, h = 10*4
EXPECTED_B = (90, 160, 45, 40)  # x = 30*3, y = 40*4, w = 15*3, h = 10*4


@pytest.mark.parametrize("morphology", [0, 3])
def test_two_blobs_at_original_resolution(morphology):
    mask, regions = find_regions(_two_blob_map(), threshold=0.4, original_size=(256, 192), morphology=morphology)
    assert mask.shape == (256, 192) and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 255}
    assert len(regions) == 2
    a, b = regions  # sorted by peak: A (1.0) before B (0.8)
    assert (a.x, a.y, a.w, a.h) == EXPECTED_A
    assert (b.x, b.y, b.w, b.h) == EXPECTED_B
    assert a.peak == pytest.approx(1.0) and b.peak == pytest.approx(0.8)
    assert 0.4 < a.mean <= 1.0 and 0.4 < b.mean <= 0.8
    # the mask lines up with the boxes: every mask pixel lies in a box, box centres are set
    for r in regions:
        x0, y0, x1, y1 = r.box
        assert mask[(y0 + y1) // 2, (x0 + x1) // 2] == 255
        assert r.area <= r.w * r.h and r.area > 0.9 * r.w * r.h
    inside = np.zeros_like(mask, bool)
    for r in regions:
        x0, y0, x1, y1 = r.box
        inside[y0:y1, x0:x1] = True
    assert not np.any(mask[~inside])
    assert int((mask > 0).sum()) == a.area + b.area


def test_no_resize_and_json():
    m = _two_blob_map()
    mask, regions = find_regions(m, threshold=0.4, morphology=0, min_area=1)
    assert mask.shape == (64, 64)
    assert [(r.x, r.y, r.w, r.h, r.area) for r in regions] == [(5, 10, 10, 10, 100), (30, 40, 15, 10, 150)]
    json.dumps([r.to_dict() for r in regions])
    assert isinstance(regions[0], Region)


def test_speckles_removed_by_morphology_and_min_area():
    m = _two_blob_map()
    m[60, 60] = 1.0  # a one-pixel speckle: ~4x3 pixels at original resolution
    _, raw = find_regions(m, 0.4, original_size=(256, 192), morphology=0, min_area=0)
    assert len(raw) == 3
    _, by_area = find_regions(m, 0.4, original_size=(256, 192), morphology=0, min_area=50)
    assert len(by_area) == 2
    _, by_opening = find_regions(m, 0.4, original_size=(256, 192), morphology=3, min_area=0)
    assert len(by_opening) == 2


def _whole_image_regions(m, threshold, size, min_area, morphology):
    """Reference: the clean-up and labelling on the whole image (find_regions works in a window)."""
    import cv2

    full = resize_map(m, size)
    binary = (full > threshold).astype(np.uint8)
    h, w = m.shape
    k = max(1, int(round(morphology * 0.5 * (size[0] / h + size[1] / w)))) if morphology > 1 else 1
    k += 1 - k % 2
    if k > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        binary = cv2.morphologyEx(cv2.morphologyEx(binary, cv2.MORPH_OPEN, kernel), cv2.MORPH_CLOSE, kernel)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    mask, boxes = np.zeros(size, np.uint8), {}
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[i, :5])
        if area >= max(min_area, 1):
            sel = labels == i
            mask[sel] = 255
            boxes[(x, y, bw, bh, area)] = (float(full[sel].max()), float(full[sel].astype(np.float64).mean()))
    return mask, boxes


def test_window_matches_whole_image():
    """Regions are found in a window around the foreground (the audit's hot path); masks, boxes,
    peaks and means equal the whole-image computation, morphology at the window's edge included."""
    import cv2

    # a ring around a blob: the boxes overlap (their areas add up to more than the window), which
    # takes the one-pass statistics instead of the box-by-box ones
    ring = np.zeros((32, 32), np.float32)
    ring[4:28, 4:28], ring[8:24, 8:24], ring[12:20, 12:20] = 1.0, 0.0, 0.8
    for morphology in (0, 3):
        mask, regions = find_regions(ring, 0.4, original_size=(96, 80), min_area=16, morphology=morphology)
        ref_mask, ref_boxes = _whole_image_regions(ring, 0.4, (96, 80), 16, morphology)
        assert len(regions) == 2 and np.array_equal(mask, ref_mask)
        assert {(r.x, r.y, r.w, r.h, r.area): (r.peak, pytest.approx(r.mean, rel=1e-9)) for r in regions} == ref_boxes

    rng = np.random.default_rng(0)
    for _ in range(150):
        s = int(rng.choice([8, 16, 32, 64]))
        m = cv2.GaussianBlur(rng.random((s, s)).astype(np.float32), (0, 0), float(rng.uniform(0.3, 3)))
        size = (int(rng.integers(4, 300)), int(rng.integers(4, 300)))
        threshold = float(np.quantile(m, rng.uniform(0.5, 0.999)))
        morphology, min_area = int(rng.choice([0, 2, 3, 5])), int(rng.choice([0, 16]))
        mask, regions = find_regions(m, threshold, original_size=size, min_area=min_area, morphology=morphology,
                                     max_zoom=None if size[0] > 4 * s or size[1] > 4 * s else 4)
        ref_mask, ref_boxes = _whole_image_regions(m, threshold, size, min_area, morphology)
        assert np.array_equal(mask, ref_mask)
        assert {(r.x, r.y, r.w, r.h, r.area): (r.peak, pytest.approx(r.mean, rel=1e-9)) for r in regions} == ref_boxes
        assert [r.peak for r in regions] == sorted((r.peak for r in regions), reverse=True)


def test_large_originals_traced_on_a_zoomed_grid():
    """An original over 4x the map is traced on a 4x grid: the boxes, areas and mask agree with each
    other exactly, and with the original-grid computation to within a few grid cells (a region at
    the edge of surviving the clean-up may come or go, so the comparison is over 40 maps)."""
    import cv2

    rng = np.random.default_rng(1)
    inter = union = same_count = pairs = close_boxes = close_peaks = 0
    for _ in range(40):
        s = int(rng.choice([16, 32, 64]))
        m = cv2.GaussianBlur(rng.random((s, s)).astype(np.float32), (0, 0), float(rng.uniform(1, 3)))
        size = (int(rng.integers(5 * s, 24 * s)), int(rng.integers(5 * s, 24 * s)))
        threshold = float(np.quantile(m, rng.uniform(0.8, 0.99)))
        mask, regions = find_regions(m, threshold, original_size=size, min_area=16, morphology=3)
        ref_mask, ref = find_regions(m, threshold, original_size=size, min_area=16, morphology=3, max_zoom=None)
        assert mask.shape == size and set(np.unique(mask).tolist()) <= {0, 255}
        # self-consistent: the mask is the regions' pixels, inside their boxes
        inside = np.zeros(size, bool)
        for r in regions:
            x0, y0, x1, y1 = r.box
            inside[y0:y1, x0:x1] = True
            assert 16 <= r.area <= r.w * r.h and mask[y0:y1, x0:x1].any()
        assert not np.any(mask[~inside]) and int((mask > 0).sum()) == sum(r.area for r in regions)
        inter += int(np.logical_and(mask, ref_mask).sum())
        union += int(np.logical_or(mask, ref_mask).sum())
        if len(regions) == len(ref):
            same_count += 1
            cy, cx = -(-size[0] // (4 * s)), -(-size[1] // (4 * s))  # a grid cell, in original pixels
            for r, q in zip(sorted(regions, key=lambda r: (r.y, r.x)), sorted(ref, key=lambda r: (r.y, r.x))):
                pairs += 1
                close_boxes += (abs(r.x - q.x) <= 2 * cx and abs(r.y - q.y) <= 2 * cy
                                and abs(r.x + r.w - q.x - q.w) <= 2 * cx and abs(r.y + r.h - q.y - q.h) <= 2 * cy)
                close_peaks += r.peak == pytest.approx(q.peak, rel=0.1)
    assert inter / union > 0.9
    assert same_count >= 25 and pairs >= 60
    assert close_boxes >= 0.9 * pairs and close_peaks >= 0.9 * pairs


def test_max_zoom_bad_values():
    with pytest.raises(ValueError, match="max_zoom"):
        find_regions(np.zeros((4, 4)), 0.5, original_size=(64, 64), max_zoom=0.5)


def test_nothing_above_threshold():
    mask, regions = find_regions(np.zeros((8, 8)), 0.5, original_size=(20, 30))
    assert regions == [] and mask.shape == (20, 30) and not mask.any()


def test_find_regions_errors():
    with pytest.raises(ValueError, match="anomaly_map must be"):
        find_regions(np.zeros((2, 3, 4)), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        find_regions(np.full((4, 4), np.nan), 0.5)
    with pytest.raises(ValueError, match="original_size"):
        find_regions(np.zeros((4, 4)), 0.5, original_size=(0, 4))


def test_resize_map():
    m = np.arange(16, dtype=np.float64).reshape(4, 4)
    r = resize_map(m, (8, 12))
    assert r.shape == (8, 12) and r.dtype == np.float32
    assert r.min() == pytest.approx(0.0) and r.max() == pytest.approx(15.0)
    assert resize_map(m[None], (4, 4)).shape == (4, 4)  # (1, h, w) accepted


def test_overlay_heatmap():
    img = np.full((120, 90, 3), 100, np.uint8)
    amap = np.zeros((30, 30), np.float32)
    amap[:15] = 1.0  # top half hot
    out = overlay_heatmap(img, amap, vmin=0.0, vmax=1.0, alpha=1.0)
    assert out.shape == (120, 90, 3) and out.dtype == np.uint8
    hot, cold = out[10, 45].astype(int), out[110, 45].astype(int)
    assert hot[0] > hot[2] and cold[2] > cold[0]  # JET: high = red, low = blue (RGB order)
    assert np.array_equal(overlay_heatmap(img, amap, 0.0, 1.0, alpha=0.0), img)
    # grey input, default vmin/vmax, boxes drawn in the requested colour
    region = Region(x=10, y=20, w=30, h=40, area=1200, peak=1.0, mean=1.0)
    boxed = overlay_heatmap(img[..., 0], amap, regions=[region], box_color=(0, 255, 0), thickness=1)
    assert boxed.shape == (120, 90, 3)
    assert tuple(boxed[20, 10]) == (0, 255, 0) and tuple(boxed[59, 39]) == (0, 255, 0)
    # bgr=True: the same picture in OpenCV's order, for colour and grey inputs; boxes keep their RGB colour
    colour = np.dstack([np.full((120, 90), v, np.uint8) for v in (30, 120, 210)])
    for src in (colour, colour[..., 0]):
        rgb = overlay_heatmap(src, amap, 0.0, 1.0, regions=[region], box_color=(0, 255, 0), thickness=1)
        as_bgr = src[..., ::-1] if src.ndim == 3 else src
        bgr = overlay_heatmap(as_bgr, amap, 0.0, 1.0, regions=[region], box_color=(0, 255, 0), thickness=1, bgr=True)
        np.testing.assert_array_equal(bgr, rgb[..., ::-1])
    with pytest.raises(ValueError, match="alpha"):
        overlay_heatmap(img, amap, alpha=2.0)
    with pytest.raises(ValueError, match="image must be"):
        overlay_heatmap(np.zeros((4, 4, 2), np.uint8), amap)

"""The benchmarks' thin and faint evaluation defects (benchmarks/eval_defects.py) and their binned
report (benchmarks/thin_defects.py): widths, contrast-to-noise, diffuseness, and the metrics' known answers."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:  # the evaluation-only modules live with the benchmarks (not a package)
    sys.path.append(str(REPO / "benchmarks"))

from eval_defects import (FAINT_EVAL_KINDS, EvalDefectGenerator, inscribed_width,  # noqa: E402
                          local_noise_std, measured_cnr)
from texture_data import make_texture_dataset  # noqa: E402
from thin_defects import (binned_metrics, cnr_bin, defect_recall, normal_pixel_threshold,  # noqa: E402
                          width_bin)

SIGMA = 0.02  # the noise std of the flat test images


def _flat(size: int = 96, seed: int = 0, channels: int = 1) -> np.ndarray:
    """Mid-gray plus white Gaussian noise of std SIGMA: the local noise is known exactly."""
    rng = np.random.default_rng(seed)
    return (0.5 + rng.normal(0.0, SIGMA, (channels, size, size))).astype(np.float32)


def _skeleton_length(skel: np.ndarray) -> float:
    """Length in px of a thin 8-connected skeleton: 1 per orthogonal and sqrt(2) per diagonal neighbour pair."""
    s = np.pad(skel.astype(np.int64), 1)
    c = s[1:-1, 1:-1]
    orth = (c * s[1:-1, 2:]).sum() + (c * s[2:, 1:-1]).sum()
    diag = (c * s[2:, 2:]).sum() + (c * s[2:, :-2]).sum()
    return float(orth + np.sqrt(2.0) * diag)


def _line_width(mask: np.ndarray) -> float:
    """Mean width of a line-like mask: its area over the length of its skeleton."""
    from skimage.morphology import skeletonize

    m = mask > 0
    return float(m.sum() / max(_skeleton_length(skeletonize(m)), 1.0))


@pytest.mark.parametrize("kind", ["thin_scratch", "thin_crack"])
@pytest.mark.parametrize("width", [1, 2, 3])
def test_thin_lines_are_as_wide_as_asked(kind: str, width: int):
    gen = EvalDefectGenerator(kinds=FAINT_EVAL_KINDS)
    measured = []
    for seed in range(4):
        d = gen.generate(_flat(seed=seed), np.random.default_rng(seed), kind, width=width, cnr=3.0)
        assert d.kind == kind and d.width_px == width and d.mask.shape == (1, 96, 96)
        m = d.mask[0]
        assert m.sum() >= 20, "a thin defect must still be a line, not a dot"
        measured.append(_line_width(m))
        # nowhere a blob: the local width along the skeleton stays the stroke's (crossings aside)
        from skimage.morphology import skeletonize

        local = 2 * cv2.distanceTransform(np.pad(m.astype(np.uint8), 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1] - 1
        assert np.percentile(local[skeletonize(m > 0)], 95) <= width + 1.0
        assert inscribed_width(m) <= 2 * width + 1.5
    assert abs(np.mean(measured) - width) < 0.35, (kind, width, measured)


@pytest.mark.parametrize("width", [1, 2, 3])
def test_dust_specks_have_the_asked_diameter(width: int):
    d = EvalDefectGenerator(kinds=("dust",)).generate(_flat(), np.random.default_rng(width), "dust", width=width, cnr=3.0)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(d.mask[0].astype(np.uint8), connectivity=4)
    areas = stats[1:, cv2.CC_STAT_AREA]
    assert n - 1 >= 15, "dust is many specks"
    diameters = np.sqrt(4 * areas / np.pi)  # of a disc of the same area
    assert abs(np.median(diameters) - width) < 0.6, (width, np.median(diameters))


def test_local_noise_std_recovers_white_noise_and_ignores_a_smooth_ramp():
    mask = np.zeros((96, 96), bool)
    mask[40:50, 20:70] = True
    for sigma in (0.005, 0.02, 0.05):
        img = 0.5 + np.random.default_rng(1).normal(0, sigma, (96, 96)).astype(np.float32)
        ramp = np.linspace(-0.2, 0.2, 96, dtype=np.float32)[None, :]  # a shading gradient is not noise
        assert local_noise_std(img, mask) == pytest.approx(sigma, rel=0.08)
        assert local_noise_std(img + ramp, mask) == pytest.approx(sigma, rel=0.08)
    assert local_noise_std(np.full((96, 96), 0.5, np.float32), mask) == pytest.approx(0.5 / 255)  # the floor
    with pytest.raises(ValueError, match="empty"):
        local_noise_std(np.zeros((8, 8)), np.zeros((8, 8)))


@pytest.mark.parametrize("kind", FAINT_EVAL_KINDS)
@pytest.mark.parametrize("cnr", [1.0, 3.0])
def test_faint_defects_have_the_asked_contrast_to_noise(kind: str, cnr: float):
    gen = EvalDefectGenerator(kinds=FAINT_EVAL_KINDS)
    image = _flat(seed=3)
    d = gen.generate(image, np.random.default_rng(7), kind, width=2, cnr=cnr)
    m = d.mask[0] > 0
    # measured against the noise we put in, not against the generator's own estimate of it
    change = np.abs(d.image[0] - image[0])[m].mean()
    assert change / SIGMA == pytest.approx(cnr, rel=0.1)
    assert d.cnr == pytest.approx(cnr, rel=0.02) and d.cnr_requested == cnr
    assert d.noise_std == pytest.approx(SIGMA, rel=0.1)
    if kind in ("thin_scratch", "thin_crack", "dust"):  # additive: visible on the defective image alone
        ring = (cv2.dilate(m.astype(np.uint8), np.ones((17, 17), np.uint8)) > 0) & \
            ~(cv2.dilate(m.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0)
        contrast = abs(d.image[0][m].mean() - d.image[0][ring].mean())
        assert contrast / d.image[0][ring].std() == pytest.approx(cnr, rel=0.15)
    # RGB images: the same CNR on the gray (channel-mean) image
    rgb = _flat(seed=3, channels=3)
    d3 = gen.generate(rgb, np.random.default_rng(7), kind, width=2, cnr=cnr)
    assert measured_cnr(rgb, d3.image, d3.mask) == pytest.approx(cnr, rel=0.02)


def test_haze_is_diffuse_and_a_scratch_is_not():
    gen = EvalDefectGenerator(kinds=FAINT_EVAL_KINDS)
    image = _flat(size=128, seed=5)

    def steepness(kind: str, seed: int) -> tuple[float, float]:
        """Max gradient of the (noise-smoothed) change over its peak, 1/px; and the mask's share of the image."""
        d = gen.generate(image, np.random.default_rng(seed), kind, width=1, cnr=1.0)
        delta = cv2.GaussianBlur(d.image[0] - image[0], (0, 0), 2.0)  # the change's shape, not the noise it scales
        gy, gx = np.gradient(delta)
        return float(np.hypot(gx, gy).max() / np.abs(delta).max()), float(d.mask.mean())

    for seed in range(4):
        grad, area = steepness("haze", seed)
        assert grad < 0.1, f"haze has an edge: it changes by {grad:.0%} of its peak per px"
        assert area > 0.04, f"haze covers only {area:.1%} of the image"
        assert steepness("thin_scratch", seed)[0] > 0.2  # the measure tells a line from a veil


def test_generate_is_deterministic_and_rejects_bad_requests():
    gen = EvalDefectGenerator(kinds=FAINT_EVAL_KINDS)
    a = gen.generate(_flat(), np.random.default_rng(2))
    b = gen.generate(_flat(), np.random.default_rng(2))
    np.testing.assert_array_equal(a.image, b.image)
    assert a.record() == b.record() and json.dumps(a.record())
    with pytest.raises(ValueError, match="cnr must be > 0"):
        gen.generate(_flat(), np.random.default_rng(0), "haze", cnr=0.0)
    with pytest.raises(ValueError, match="unknown kinds"):
        EvalDefectGenerator(kinds=("scratchy",))
    with pytest.raises(ValueError, match="widths"):
        EvalDefectGenerator(widths=(0,))


def test_texture_data_set_records_kind_width_and_cnr(tmp_path: Path):
    root = make_texture_dataset(tmp_path / "brick", "brick", image_size=64, n_train=2, n_test_good=1, n_test_bad=5,
                                seed=0, defect_kinds=FAINT_EVAL_KINDS, cnr_range=(2.0, 4.0))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["params"]["cnr_range"] == [2.0, 4.0]
    defects = {k: v for k, v in manifest["crops"].items() if "/good/" not in k}
    assert sorted(v["kind"] for v in defects.values()) == sorted(FAINT_EVAL_KINDS)
    for rel, rec in defects.items():
        assert (root / rel).is_file()
        mask = cv2.imread(str(root / "ground_truth" / rec["kind"] / Path(rel).name.replace(".png", "_mask.png")), 0)
        assert mask.any()
        if rec["kind"] in ("thin_scratch", "thin_crack", "dust"):
            assert rec["width_px"] in (1, 2, 3)
        # measured on the 8-bit file: close to the requested CNR (rounding moves it a little)
        assert rec["cnr"] == pytest.approx(rec["cnr_requested"], rel=0.15) and 2.0 <= rec["cnr_requested"] <= 4.0


# ------------------------------------------------------------------------------ binning and recall

def test_bins():
    assert [width_bin(w) for w in (1, 1.4, 2, 2.4, 3, 3.49, 3.5, 40)] == ["1", "1", "2", "2", "3", "3", ">3", ">3"]
    assert [cnr_bin(c) for c in (0.2, 0.999, 1.0, 1.9, 2.0, 3.9, 4.0, 100)] == ["<1", "<1", "1-2", "1-2", "2-4", "2-4", ">4", ">4"]


def _defect(mask: np.ndarray, amap: np.ndarray, score: float, kind: str = "thin_crack", width: float = 1,
            cnr: float = 1.5) -> dict:
    return {"mask": mask, "map": amap, "score": score, "kind": kind, "width_px": width, "cnr": cnr}


def test_perfect_map_constant_map_and_half_found_give_known_answers():
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32), bool)
    mask[10, 4:28] = True  # a 1-px line of 24 pixels
    normal_maps = np.zeros((5, 32, 32), np.float32)
    normal_scores = rng.uniform(0, 0.5, 5)
    perfect = binned_metrics(normal_scores, normal_maps, [_defect(mask, mask.astype(np.float32), 1.0)])
    g = {x["by"]: x for x in perfect["groups"]}
    assert g["all"]["pixel_recall"] == 1.0 and g["all"]["image_auroc"] == 1.0 and g["all"]["defect_recall"] == 1.0

    constant = binned_metrics(normal_scores, np.full((5, 32, 32), 0.7), [_defect(mask, np.full((32, 32), 0.7), 0.3)])
    assert {x["pixel_recall"] for x in constant["groups"]} == {0.0}

    # Normal pixels 0..99 (each value equally often): the 1 % threshold is 98.01, so 99 alone is above it.
    normal = np.tile(np.arange(100, dtype=np.float32), 5 * 32 * 32 // 100 + 1)[:5 * 32 * 32].reshape(5, 32, 32)
    t = normal_pixel_threshold(normal, 0.01)
    assert (normal > t).mean() == pytest.approx(0.01, abs=0.002)
    half = np.zeros((32, 32), np.float32)
    half[10, 4:16] = 150.0  # 12 of the line's 24 pixels above the threshold
    r = binned_metrics(normal_scores, normal, [_defect(mask, half, 0.0)])
    assert r["groups"][0]["pixel_recall"] == 0.5 and defect_recall(half, mask, t) == 0.5
    assert r["groups"][0]["image_auroc"] == 0.0  # its score is below every normal image's


def test_groups_split_by_kind_width_and_cnr():
    mask = np.zeros((16, 16), bool)
    mask[4:6, 2:14] = True
    hit, miss = mask.astype(np.float32) * 5.0, np.zeros((16, 16), np.float32)
    normal_scores, normal_maps = np.array([0.1, 0.2, 0.3]), np.zeros((3, 16, 16))
    defects = [_defect(mask, hit, 1.0, "thin_scratch", 1, 5.0), _defect(mask, hit, 2.0, "thin_scratch", 3, 0.5),
               _defect(mask, miss, 0.0, "haze", 40.0, 0.5), _defect(mask, miss, 0.05, "haze", 35.0, 1.2)]
    groups = {(g["by"], g["group"]): g for g in binned_metrics(normal_scores, normal_maps, defects)["groups"]}
    assert groups[("kind", "thin_scratch")]["image_auroc"] == 1.0 and groups[("kind", "thin_scratch")]["pixel_recall"] == 1.0
    assert groups[("kind", "haze")]["image_auroc"] == 0.0 and groups[("kind", "haze")]["pixel_recall"] == 0.0
    assert groups[("all", "all")]["pixel_recall"] == 0.5 and groups[("all", "all")]["n"] == 4
    assert {k[1]: g["n"] for k, g in groups.items() if k[0] == "width"} == {"1": 1, "3": 1, ">3": 2}
    assert {k[1]: g["n"] for k, g in groups.items() if k[0] == "cnr"} == {"<1": 2, "1-2": 1, ">4": 1}
    assert groups[("cnr", "<1")]["pixel_recall"] == 0.5
    assert groups[("width x cnr", ">3 px, CNR <1")]["n"] == 1 and groups[("kind x cnr", "haze, CNR 1-2")]["n"] == 1
    assert [g for (by, g) in groups if by == "width"] == ["1", "3", ">3"]  # in the bins' order

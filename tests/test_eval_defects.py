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


# ------------------------------------------------------------------------------ high-resolution sets

from highres_data import (_rebuild, cell_panel, column_bands, make_highres_dataset, panel_grid,  # noqa: E402
                          texture_mosaic)
from thin_defects import (COMPARE_GROUPINGS, PRESETS, compare_markdown, compare_rows, defect_values,  # noqa: E402
                          mean_report, parse_configs)


def test_mosaic_is_native_scale_from_its_band_and_new_every_time():
    source = np.random.default_rng(0).integers(0, 256, (200, 300), dtype=np.uint8)  # every pixel its own value
    train_cols, test_cols = column_bands(300, 0.6)
    assert train_cols == (0, 180) and test_cols == (180, 300)
    rng = np.random.default_rng(1)
    a, cells = texture_mosaic(source, 256, 48, test_cols, rng)
    b, _ = texture_mosaic(source, 256, 48, test_cols, rng)
    assert a.shape == (256, 256) and a.dtype == np.uint8
    assert not np.array_equal(a, b), "each normal image is different"
    # native scale: the mosaic is exactly its cells' source pixels, copied (flipped at most), never resized
    np.testing.assert_array_equal(_rebuild(source, 256, cells), a)
    for rec in cells:
        y0, x0, y1, x1 = rec["box"]
        assert (y1 - y0, x1 - x0) == (48, 48)
        assert test_cols[0] <= x0 and x1 <= test_cols[1], "a test cell outside the test band"
    covered = {(y, x) for rec in cells for y, x in [rec["at"]]}
    assert min(y for y, _ in covered) <= 0 and max(y for y, _ in covered) + 48 >= 256  # the grid covers the image
    seen = cv2.resize(a, (64, 64), interpolation=cv2.INTER_AREA)  # a whole-image model would see this
    assert seen.std() < a.std(), "sanity: shrinking averages the native grain away"
    with pytest.raises(ValueError, match="does not fit"):
        texture_mosaic(source, 256, 150, test_cols, rng)  # the test band is 120 px wide


def test_panels_use_distinct_cells_of_their_pool():
    pool = [np.full((30, 40), i, np.uint8) for i in range(12)]
    panel, idx = cell_panel(pool, 3, np.random.default_rng(0))
    assert panel.shape == (90, 120) and len(set(idx)) == 9
    for r in range(3):
        for c in range(3):
            assert (panel[30 * r:30 * (r + 1), 40 * c:40 * (c + 1)] == idx[3 * r + c]).all()
    assert panel_grid(1024) == 3 and panel_grid(2048) == 6 and panel_grid(200) == 1
    with pytest.raises(ValueError, match="distinct cells"):
        cell_panel(pool[:8], 3, np.random.default_rng(0))


def test_highres_texture_set_keeps_train_and_test_apart(tmp_path: Path):
    root = make_highres_dataset(tmp_path / "brick_hr", "brick_hr", size=160, n_train=2, n_test_good=2,
                                n_per_kind=1, seed=0, cell=64)
    m = json.loads((root / "manifest.json").read_text())
    assert m["train_columns"] == [0, 307] and m["test_columns"] == [307, 512]
    from anomaly.data.textures import load_texture

    source = load_texture("brick")
    for rel, rec in m["crops"].items():
        img = cv2.imread(str(root / rel), cv2.IMREAD_GRAYSCALE)
        assert img.shape == (160, 160), rel
        if "/good/" in rel:
            lo, hi = m["train_columns"] if rel.startswith("train/") else m["test_columns"]
            assert all(lo <= c["box"][1] and c["box"][3] <= hi for c in rec["cells"]), rel
            np.testing.assert_array_equal(_rebuild(source, 160, rec["cells"]), img)  # the file is native pixels
        else:  # one defect on a normal test image, with what it is
            assert rec["source"].startswith("test/good/") and rec["kind"] in FAINT_EVAL_KINDS and rec["cnr"] > 0
            assert (cv2.imread(str(root / "ground_truth" / rec["kind"] / Path(rel).name.replace(".png", "_mask.png")), 0) > 0).any()
    assert sorted(p.parent.name for p in (root / "test").glob("*/*.png")).count("good") == 2
    assert make_highres_dataset(tmp_path / "brick_hr", "brick_hr", size=160, n_train=2, n_test_good=2,
                                n_per_kind=1, seed=0, cell=64) == root  # reused, not rebuilt
    with pytest.raises(ValueError, match="unknown high-resolution"):
        make_highres_dataset(tmp_path / "x", "brick", size=160)


# ------------------------------------------------------------------------------ configurations, comparison

def test_configs_presets_custom_and_refusals():
    assert parse_configs(None) == {"aae": ["--model", "aae"]}  # the single run this benchmark always made
    c = parse_configs("whole,tiled", ["t05=--model aae --image-size 64 --tile-scale 0.5"])
    assert list(c) == ["whole", "tiled", "t05"] and c["tiled"] == list(PRESETS["tiled"])
    assert c["t05"][-2:] == ["--tile-scale", "0.5"]
    for names, custom, match in (("wide", [], "unknown configuration"), ("whole,whole", [], "twice"),
                                 (None, ["x=--out /tmp/y"], "set by the benchmark"), (None, ["=--model aae"], "NAME=OPTIONS")):
        with pytest.raises(ValueError, match=match):
            parse_configs(names, custom)


def _report(hit_scale: float, hit_share: float = 1.0) -> dict:
    """A report on 3 defects whose map is ``hit_scale`` on the first ``hit_share`` of a 24-px mask (0 elsewhere)."""
    mask = np.zeros((16, 16), bool)
    mask[4:6, 2:14] = True
    hit = np.zeros((16, 16), np.float32)
    hit[4:6, 2:2 + int(round(12 * hit_share))] = hit_scale
    defects = [_defect(mask, hit, 1.0 * hit_scale, "thin_scratch", 1, 5.0), _defect(mask, hit, 0.2, "haze", 40.0, 0.5),
               _defect(mask, np.zeros((16, 16), np.float32), 0.0, "thin_crack", 2, 1.5)]
    return binned_metrics(np.array([0.1, 0.2, 0.3]), np.zeros((3, 16, 16)), defects)


def test_values_instead_of_maps_give_the_same_report():
    mask = np.zeros((16, 16), bool)
    mask[4:6, 2:14] = True
    amap = np.random.default_rng(0).uniform(0, 1, (16, 16)).astype(np.float32)
    normal = np.random.default_rng(1).uniform(0, 1, (3, 16, 16))
    a = binned_metrics(np.array([0.1, 0.2, 0.3]), normal, [_defect(mask, amap, 0.5)])
    d = _defect(mask, amap, 0.5)
    b = binned_metrics(np.array([0.1, 0.2, 0.3]), normal, [{k: v for k, v in d.items() if k not in ("map", "mask")}
                                                           | {"values": defect_values(amap, mask)}])
    assert a == b
    with pytest.raises(ValueError, match="differ"):
        defect_values(amap[:8], mask)


def test_side_by_side_table_has_every_group_and_config_and_names_the_winner():
    reports = {"whole": _report(0.0), "tiled": _report(5.0), "tiled128": _report(2.0, hit_share=0.5)}
    rows = compare_rows(reports)
    groups = [g for g in reports["whole"]["groups"] if g["by"] in COMPARE_GROUPINGS]
    assert [(r["by"], r["group"]) for r in rows] == [(g["by"], g["group"]) for g in groups]
    assert {r["by"] for r in rows} == set(COMPARE_GROUPINGS) and ("kind x width", "thin_scratch, 1 px") in \
        {(r["by"], r["group"]) for r in rows}
    for r in rows:
        assert set(r["image_auroc"]) == set(r["pixel_recall"]) == set(reports)
    top = {r["group"]: r for r in rows if r["by"] == "kind"}
    assert top["thin_scratch"]["pixel_recall"] == {"whole": 0.0, "tiled": 1.0, "tiled128": 0.5}
    assert top["thin_scratch"]["best_recall"] == "tiled +0.500"
    assert top["thin_scratch"]["best_auroc"] == "tie"  # tiled and tiled128 both rank it above every normal image
    assert top["thin_crack"]["best_recall"] == "tie"  # nobody finds it
    assert next(r for r in rows if r["by"] == "all")["best_recall"] == "tiled +0.333"  # 2/3 against 1/3 of the pixels
    text = compare_markdown(reports, "brick_hr: side by side")
    table = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert {ln.count("|") for ln in table} == {2 + 2 * len(reports) + 2 + 1}  # group, n, 2 per config, 2 winners
    assert "| width 1 px |" in text and "| CNR <1 |" in text
    # over seeds: the mean of identical reports is the report, with the images counted twice
    mean = mean_report([reports["tiled"], reports["tiled"]])
    assert [g["pixel_recall"] for g in mean["groups"]] == [g["pixel_recall"] for g in reports["tiled"]["groups"]]
    assert mean["groups"][0]["n"] == 2 * reports["tiled"]["groups"][0]["n"]


def test_map_max_diagnostic_ranks_by_the_maps_largest_value():
    from thin_defects import map_max_aurocs, map_max_markdown

    defects = [{"kind": "haze", "map_max": 5.0}, {"kind": "dust", "map_max": 0.0}]
    got = map_max_aurocs(np.array([1.0, 2.0]), defects)
    assert got == {"all": 0.5, "dust": 0.0, "haze": 1.0}
    text = map_max_markdown([{"config": "whole", "map_max_auroc": got}, {"config": "tiled", "map_max_auroc": got}])
    assert "| haze | 1.000 | 1.000 |" in text and map_max_markdown([{"config": "x"}]) == ""


def test_summary_of_result_rows_per_seed_and_over_seeds():
    from thin_defects import summarize

    reports = {"whole": _report(0.0), "tiled": _report(5.0)}
    rows = [{"dataset": "brick_hr", "seed": seed, "config": c, "report": rep, "train_options": ["--model", "aae"],
             "commands": ["anomaly train ..."], "epochs_done": 3, "steps_done": 9, "stopped_by": "time",
             "train_cpu_s": 1.0, "train_wall_s": 2.0, "export_wall_s": 1.0, "map_shape": [64, 64],
             "scoring_ms_per_image": 1.0} for seed in (0, 1) for c, rep in reports.items()]
    text = summarize(rows)
    titles = [ln for ln in text.splitlines() if ln.startswith("### ")]
    assert titles == ["### brick_hr, seed 0: side by side", "### brick_hr, seed 1: side by side",
                      "### brick_hr: side by side, mean of seeds 0,1"]
    assert text.count("| whole | `--model aae` | 3, 9 (time) |") == 2  # the cost table of each seed
    assert summarize(rows[:1]) == ""  # one configuration: nothing to put side by side

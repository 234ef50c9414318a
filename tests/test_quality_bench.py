"""``benchmarks/quality.py``'s per-defect-kind breakdown: each kind is scored against the normal images only."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from anomaly.metrics import aupro, image_metrics, pixel_metrics


def _benchmark(name: str):
    """Load ``benchmarks/<name>.py`` as a module (the folder is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _quality():
    return _benchmark("quality")


def test_per_kind_metrics_score_each_kind_against_the_normal_images_only() -> None:
    rng = np.random.default_rng(0)
    kinds = ["good"] * 6 + ["easy"] * 4 + ["hard"] * 4
    labels = np.array([0 if k == "good" else 1 for k in kinds])
    masks = np.zeros((14, 16, 16), np.uint8)
    masks[6:, 4:10, 4:10] = 1
    maps = rng.random((14, 16, 16)).astype(np.float32)
    maps[6:10, 4:10, 4:10] += 2.0  # "easy" defects light up inside their masks; "hard" ones do not
    scores = maps.reshape(14, -1).max(1).astype(np.float64)
    scores[10:] = rng.random(4) * 0.5  # "hard" images score below every normal one

    out = _quality().per_kind_metrics(labels, scores, masks, maps, kinds)

    assert sorted(out) == ["easy", "hard"]
    assert out["easy"]["pixel_auroc"] == pytest.approx(1.0) and out["easy"]["image_auroc"] == pytest.approx(1.0)
    assert out["hard"]["image_auroc"] == pytest.approx(0.0)
    assert out["hard"]["pixel_auroc"] < 0.8
    # the same as computing on the normal images plus that kind's images by hand
    sel = np.r_[0:6, 10:14]
    assert out["hard"]["pixel_auroc"] == pytest.approx(pixel_metrics(masks[sel], maps[sel])["pixel_auroc"])
    assert out["hard"]["aupro"] == pytest.approx(aupro(masks[sel], maps[sel]))
    assert out["hard"]["image_auroc"] == pytest.approx(image_metrics(labels[sel], scores[sel])["auroc"])


def test_audit_split_accounts_for_the_audit_per_stage(trained_bundle: dict, tmp_path: Path) -> None:
    """``benchmarks/audit_split.py``: every image passes each stage once, the stages fit in the
    process's CPU, and the patched functions are put back."""
    import anomaly.deploy.render as render
    from anomaly.deploy.runtime import Runtime

    mod = _benchmark("audit_split")
    originals = (Runtime._decode, Runtime.infer, render.finish_record, render.write_image)
    images = sorted((trained_bundle["data"] / "test").rglob("*.png"))
    r = mod.measure(str(trained_bundle["bundle"]), [str(p) for p in images], str(tmp_path), batch_size=4)
    n = len(images)
    assert r["images"] == n and r["calls"]["decode"] == n and r["calls"]["overlay"] == n and r["calls"]["write"] == n
    assert r["calls"]["infer"] == -(-n // 4)  # one graph run per batch
    ms = r["ms_per_image"]
    assert all(ms[s] > 0 for s in ("decode", "infer", "finish", "overlay", "write", "main"))
    assert ms["overlay"] + ms["write"] <= ms["finish"]  # parts of the per-image finish
    assert ms["decode"] + ms["infer"] + ms["finish"] + ms["main"] <= 1.05 * ms["process"] + 0.05
    assert 0 < r["heatmap_kb"] < 100
    assert (Runtime._decode, Runtime.infer, render.finish_record, render.write_image) == originals
    assert list(tmp_path.iterdir()) == []  # its audit folder is removed


def test_audit_split_ceiling_runs_the_audit_sequentially(trained_bundle: dict, tmp_path: Path) -> None:
    """``audit_split.py --ceiling``: sequential audits, each image through each stage once; the
    estimate is the cores' rate over the lowest CPU per image against the fastest reference window;
    every output is removed."""
    mod = _benchmark("audit_split")
    images = sorted((trained_bundle["data"] / "test").rglob("*.png"))
    c = mod.ceiling(str(trained_bundle["bundle"]), [str(p) for p in images], str(tmp_path), batch_size=4,
                    repeats=2, windows=2, seconds=0.05)
    assert len(c["cpu_ms_per_image"]) == 2 and len(c["reference_images_per_second"]) == 2
    ms = c["split"]["ms_per_image"]
    assert ms["process_steady"] == min(c["cpu_ms_per_image"]) > 0
    assert c["split"]["calls"]["decode"] == len(images) and c["split"]["calls"]["infer"] == -(-len(images) // 4)
    # the runtime's stages ran in the calling thread and are not counted again in main
    assert ms["decode"] + ms["infer"] + ms["finish"] + ms["main"] <= 1.05 * ms["process"] + 0.05
    assert c["ceiling_images_per_second"] == pytest.approx(c["cores"] * 1e3 / ms["process_steady"])
    assert c["share"] == pytest.approx(c["ceiling_images_per_second"] / max(c["reference_images_per_second"]))
    assert list(tmp_path.iterdir()) == []


def test_texture_misses_tells_found_defects_from_missed_ones() -> None:
    """``texture_misses.coverage``: the threshold is the normal pixels' quantile, and each defect's
    share of pixels above it separates a lit defect from a dark one."""
    mod = _benchmark("texture_misses")
    rng = np.random.default_rng(0)
    maps = rng.random((4, 16, 16)).astype(np.float32)  # normal pixels in [0, 1)
    masks = np.zeros((4, 16, 16), np.uint8)
    masks[2:, 4:8, 4:8] = 1
    maps[2, 4:8, 4:8] = 5.0  # lit
    maps[3, 4:8, 4:8] = -1.0  # dark
    kinds = np.array(["good", "good", "blob", "blob"])
    t, shares = mod.coverage(maps, masks, kinds, fpr=0.05)
    normal = np.concatenate([maps[:2].ravel(), maps[2:][masks[2:] == 0]])
    assert t == pytest.approx(np.quantile(normal, 0.95)) and 0.9 < t < 1.0
    assert list(shares) == ["blob"] and shares["blob"].tolist() == [1.0, 0.0]


def test_elpv_types_holds_the_single_type_splits_as_two_categories(tmp_path: Path) -> None:
    """``--datasets elpv_types``: one folder whose categories ``mono`` and ``poly`` are the
    single-type data sets' own splits (so the rows compare), reused when asked again."""
    from anomaly.data.folder import discover

    q = _quality()
    root = q.prepare_dataset("elpv_types", tmp_path, 64)
    layout = discover(root)
    assert layout.kind == "multi" and layout.categories == ["mono", "poly"]
    for k, cell_type in enumerate(layout.categories):
        single = tmp_path / f"elpv_{cell_type}"
        for part in ("train/good", "test/good", "test/defective"):
            assert sorted(p.name for p in (root / cell_type / part).iterdir()) == \
                sorted(p.name for p in (single / part).iterdir()), part
        mine = sorted(s.path.name for s in layout.test if s.category == k)
        assert mine == sorted(s.path.name for s in discover(single).test)
    assert q.prepare_dataset("elpv_types", tmp_path, 64) == root
    with pytest.raises(ValueError, match="textures only"):
        q.prepare_dataset("elpv_types", tmp_path, 64, crop_size=32)


def test_texture_crop_size_sets_the_field_of_view_not_the_resolution(tmp_path: Path) -> None:
    """``--crop-size 64 --image-size 32``: 64-px cuts written at 32 px, in their own cache folder."""
    import json

    import cv2

    q = _quality()
    root = q.prepare_dataset("brick", tmp_path, 32, crop_size=64)
    assert root.name == "brick_32_crop64"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["params"]["crop_size"] == 64 and manifest["params"]["image_size"] == 32
    img = cv2.imread(str(sorted((root / "train" / "good").glob("*.png"))[0]), cv2.IMREAD_UNCHANGED)
    assert img.shape[:2] == (32, 32)
    assert q.prepare_dataset("brick", tmp_path, 32).name == "brick_32"  # default: cut at the image size
    with pytest.raises(ValueError, match="textures only"):
        q.prepare_dataset("elpv_mono", tmp_path, 32, crop_size=64)


def test_texture_test_set_grows_without_changing_training_or_the_first_test_images(tmp_path: Path) -> None:
    """``--texture-test 48``: 48 + 48 test crops in their own folder; the training crops and the
    default 40 + 40 are the same files, so models trained before can be scored on the larger set."""
    q = _quality()
    small = q.prepare_dataset("grass", tmp_path, 32)
    big = q.prepare_dataset("grass", tmp_path, 32, texture_test=48)
    assert big.name == "grass_32_test48"
    files = lambda root, part: sorted(p.relative_to(root) for p in (root / part).rglob("*.png"))  # noqa: E731
    assert len(files(small, "test")) == 80 and len(files(big, "test")) == 96
    assert set(files(small, "test")) < set(files(big, "test"))
    for part in ("train", "test", "ground_truth"):
        for rel in files(small, part):
            assert (small / rel).read_bytes() == (big / rel).read_bytes(), rel
    with pytest.raises(ValueError, match="textures only"):
        q.prepare_dataset("elpv_mono", tmp_path, 32, texture_test=48)
    with pytest.raises(ValueError, match=">= 1"):
        q.prepare_dataset("grass", tmp_path, 32, texture_test=0)


def test_evaluate_run_exports_each_scoring_with_and_without_flip_tta(trained_bundle: dict, tmp_path: Path) -> None:
    """``quality.py --tta both``: each scoring of the preset is exported and scored twice; the
    flipped bundle is named ``<scoring>+tta`` and its sidecar says so."""
    from anomaly.deploy.bundle import load_sidecar

    q = _quality()
    samples = q.test_samples(Path(trained_bundle["data"]))
    rows = q.evaluate_run(Path(trained_bundle["run"]), "tiles", "aae_norm", 0, samples, tmp_path, 1, ("none", "flips"))
    assert [(r["scoring"], r["tta"]) for r in rows] == [("l1_ssim+norm", "none"), ("l1_ssim+norm+tta", "flips")]
    for r in rows:
        assert 0.0 <= r["image_auroc"] <= 1.0 and r["n_test_good"] + r["n_test_bad"] == len(samples)
        assert r["scoring_settings"]["residual"] == "l1_ssim" and r["normalize"] is True
        meta = load_sidecar(tmp_path / "bundles" / f"tiles__aae_norm__{r['scoring']}__s0")
        assert meta["scoring"]["tta"] == r["tta"] and meta["scoring"]["normalized"]
    from anomaly.deploy.runtime import Runtime

    paths = [str(s.path) for s in samples]
    plain, tta = (list(Runtime(tmp_path / "bundles" / f"tiles__aae_norm__{r['scoring']}__s0", device="cpu").score_paths(paths))
                  for r in rows)
    assert max(abs(a.score - b.score) for a, b in zip(plain, tta)) > 0  # two different graphs were scored


def test_crack_segmenter_draws_thin_dark_cracks_inside_their_masks() -> None:
    """``benchmarks/elpv_crack_segmenter.py``: a crack only darkens, its mask covers what it darkened,
    and without the "darker area" kind the mask stays thin (a line, not a region)."""
    mod = _benchmark("elpv_crack_segmenter")
    rng = np.random.default_rng(0)
    cell = np.full((64, 64), 0.5, np.float32)
    drawn = 0
    for _ in range(40):
        out, mask = mod.draw_crack(cell, rng, (0.3, 0.5), region_p=0.0)
        assert out.shape == mask.shape == cell.shape and set(np.unique(mask)) <= {0.0, 1.0}
        assert (out <= cell + 1e-6).all()
        if mask.any():
            drawn += 1
            assert (cell - out)[mask > 0].mean() > 0.05  # darker inside the mask
            assert (cell - out)[mask == 0].max() < 0.5 * (cell - out).max()  # only faint anti-aliasing outside
            assert mask.mean() < 0.2
    assert drawn >= 35
    _, with_area = mod.draw_crack(cell, np.random.default_rng(1), (0.3, 0.5), region_p=1.0)
    assert with_area.mean() > 0.01


def test_channels_forces_the_models_colour_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``--channels 1`` trains a grayscale model on colour data (what a colour-blind product would do)."""
    import anomaly.training.run

    q = _quality()
    seen: dict = {}

    def fake_train(cfg):
        seen["channels"], seen["out"] = cfg.channels, cfg.out
        return object()

    def fake_evaluate(run_dir, dataset, config, seed, samples, out, threads, tta=("none",), channels=None):
        seen["bundle_channels"] = channels
        return [{"scoring": "l1"}]

    monkeypatch.setattr(anomaly.training.run, "train", fake_train)
    monkeypatch.setattr(q, "evaluate_run", fake_evaluate)
    monkeypatch.setattr(q, "test_samples", lambda *a, **k: [])
    rows = q.run_trial("ihc", tmp_path, "ae", 0, 1, 32, tmp_path, 1, None, None, channels=1)
    assert seen == {"channels": 1, "out": str(tmp_path / "runs" / "ihc__ae__s0__c1"), "bundle_channels": 1}
    assert rows[0]["channels"] == 1 and rows[0]["scoring"] == "l1"
    # The training fills of --defect-sources skimage include the ihc photograph itself: refused.
    with pytest.raises(SystemExit):
        q.main(["--datasets", "ihc", "--configs", "ae", "--defect-sources", "skimage", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "data").exists()


def test_elpv_lines_ranks_a_thin_line_above_heavier_grain(tmp_path: Path) -> None:
    """``elpv_lines``: a faint straight dark line on a clean cell outscores normal cells whose grain
    is twice as strong, which a residual's top pixels would not (the README's poly misses)."""
    import cv2

    mod = _benchmark("elpv_lines")
    rng = np.random.default_rng(0)

    def cell(grain: float, line: bool) -> str:
        noise = cv2.GaussianBlur(rng.standard_normal((64, 64)).astype(np.float32), (0, 0), 1.0)
        im = 0.7 + grain * noise
        if line:
            cv2.line(im, (5, 60), (58, 12), 0.7 - 0.08, 1)
        path = tmp_path / f"c{len(list(tmp_path.iterdir()))}.png"
        cv2.imwrite(str(path), np.clip(im * 255, 0, 255).astype(np.uint8))
        return str(path)

    profile = lambda p: mod.line_profile(p, size=64, sigma=1.0, angles=30)  # noqa: E731
    profiles = {
        "train/good": np.stack([profile(cell(0.05, False)) for _ in range(30)]),
        "grainy": np.stack([profile(cell(0.10, False)) for _ in range(6)]),
        "cracked": np.stack([profile(cell(0.03, True)) for _ in range(6)]),
    }
    assert profiles["train/good"].shape == (30, 1) + mod.line_lengths(64, 30).shape
    assert mod.line_profile(cell(0.05, False), size=64, sigma=1.0, angles=30, window=32).shape == \
        (9,) + mod.line_lengths(32, 30).shape  # 3 x 3 windows at half-window steps
    valid = mod.line_lengths(64, 30) >= 0.3 * 64
    s = mod.line_scores(profiles, valid, top=5)
    assert s["cracked"].min() > s["grainy"].max(), (s["cracked"], s["grainy"])
    with pytest.raises(ValueError, match="not a readable image"):
        mod.line_profile(str(tmp_path / "missing.png"), size=64, sigma=1.0, angles=30)

"""Native-resolution tiling: the grid, the blending, tiled preprocessing and datasets (numpy), and a
tiled bundle end to end (torch): trained on crops, exported, its stitched maps equal to the torch
graph's on the same tiles, and calibrate / evaluate / audit / regions on maps of the image's size."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomaly.data.folder import ImageDataset, Sample, discover
from anomaly.data.preprocess import Preprocess
from anomaly.data.tiling import Stitcher, axis_positions, blend_window, extract_tiles, random_crop, tile_grid

HAS_TORCH = importlib.util.find_spec("torch") is not None


# -- the grid and the blending ----------------------------------------------------------------
@pytest.mark.parametrize("length,tile,overlap", [(32, 32, 8), (33, 32, 8), (100, 32, 8), (1000, 64, 16), (97, 32, 0)])
def test_axis_positions_cover_the_side_with_at_least_the_overlap(length, tile, overlap):
    pos = axis_positions(length, tile, overlap)
    assert pos[0] == 0 and pos[-1] == length - tile
    covered = np.zeros(length, bool)
    for p in pos:
        covered[p:p + tile] = True
    assert covered.all()
    gaps = np.diff(pos)
    assert (gaps <= tile - overlap).all() and (gaps > 0).all()
    assert len(gaps) == 0 or gaps.max() - gaps.min() <= 1  # spread evenly


def test_axis_positions_refuse_a_side_smaller_than_a_tile():
    with pytest.raises(ValueError, match="smaller than the tile"):
        axis_positions(20, 32, 8)
    with pytest.raises(ValueError, match="overlap"):
        axis_positions(64, 32, 32)


def test_stitching_tiles_of_one_global_map_gives_the_map_back():
    """Tiles that agree (crops of one map) blend back into exactly that map, edges included."""
    rng = np.random.default_rng(0)
    h, w, t, ov = 150, 217, 32, 8
    full = rng.normal(size=(h, w)).astype(np.float32)
    grid = tile_grid(h, w, t, ov)
    tiles = extract_tiles(full[None], grid, t)
    st = Stitcher((h, w), t, ov)
    for a in range(0, len(grid), 7):  # in batches, as the runtime adds them
        st.add(tiles[a:a + 7], grid[a:a + 7])
    np.testing.assert_allclose(st.result(), full, rtol=1e-5, atol=1e-5)


def test_stitching_fades_out_tile_borders():
    """A value only one tile's border holds is weighted down where a neighbour's centre covers it."""
    h, w, t, ov = 32, 56, 32, 8
    grid = tile_grid(h, w, t, ov)
    assert grid == [(0, 0), (0, 24)]
    maps = np.zeros((2, 1, t, t), np.float32)
    maps[0, 0, :, -1] = 10.0  # tile 0's last column (x = 31), inside tile 1 (x = 24..55)
    st = Stitcher((h, w), t, ov)
    st.add(maps, grid)
    out = st.result()
    assert out[:, 31].max() < 1.0  # tile 1 holds x=31 at weight 7.5/8 against tile 0's 0.5/8
    win = blend_window(t, ov)
    assert win.shape == (t, t) and win.min() > 0 and win[t // 2, t // 2] == 1.0


def test_stitcher_needs_every_pixel_and_the_right_shapes():
    st = Stitcher((40, 40), 32, 8)
    with pytest.raises(ValueError, match="expected 1 maps"):
        st.add(np.zeros((2, 32, 32)), [(0, 0)])
    st.add(np.zeros((1, 32, 32)), [(0, 0)])
    with pytest.raises(ValueError, match="covered by no tile"):
        st.result()


def test_random_crop_stays_inside_and_refuses_small_images():
    rng = np.random.default_rng(0)
    img = np.arange(3 * 50 * 60, dtype=np.float32).reshape(3, 50, 60)
    for _ in range(20):
        c = random_crop(img, 32, rng)
        assert c.shape == (3, 32, 32)
        y, x = divmod(int(c[0, 0, 0]), 60)
        np.testing.assert_array_equal(c, img[:, y:y + 32, x:x + 32])
    with pytest.raises(ValueError, match="cannot crop"):
        random_crop(img[:, :20], 32, rng)


# -- tiled preprocessing ------------------------------------------------------------------------
def test_tiled_preprocess_keeps_native_pixels_and_round_trips_through_the_sidecar():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 130), dtype=np.uint8)
    pre = Preprocess(image_size=32, channels=1, tile_scale=1.0)
    x = pre(img)
    assert x.shape == (1, 90, 130)
    np.testing.assert_array_equal(x[0], img.astype(np.float32) / 255.0)  # no resampling at scale 1
    assert pre(img.astype(np.float32) / 255.0).shape == (1, 90, 130)
    half = Preprocess(image_size=32, channels=1, tile_scale=0.5)
    assert half(img).shape == (1, 45, 65) and half.input_size(90, 130) == (45, 65)
    assert Preprocess(image_size=32, channels=1, tile_scale=0.25).input_size(90, 130) == (32, 46)  # short side >= S
    d = half.to_dict()
    assert d["tile_scale"] == 0.5 and d["tile_overlap"] == 0.25
    assert Preprocess.from_dict(json.loads(json.dumps(d))) == half
    whole = Preprocess(image_size=32, channels=1)
    assert "tile_scale" not in whole.to_dict() and Preprocess.from_dict(whole.to_dict()) == whole
    tiles, grid = pre.tiles(x)
    assert tiles.shape == (len(grid), 1, 32, 32) and len(grid) == len(tile_grid(90, 130, 32, 8))
    with pytest.raises(ValueError, match="tile_scale"):
        Preprocess(image_size=32, tile_scale=0)
    with pytest.raises(ValueError, match="overlap"):
        Preprocess(image_size=32, tile_scale=1.0, tile_overlap=0.9)
    with pytest.raises(ValueError, match="load_tiles"):
        pre.load_batch([])


def test_tiled_dataset_gives_crops_random_for_training_and_fixed_for_validation(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), rng.integers(0, 256, (64, 96), dtype=np.uint8))
        paths.append(Sample(p))
    pre = Preprocess(image_size=32, channels=1, tile_scale=1.0)
    train = ImageDataset(paths, pre, cache=True, seed=0)
    assert train.crops_per_image == 6 and len(train) == 18  # ceil(64 * 96 / 32^2)
    a, b = train[4]["image"], train[4]["image"]
    assert a.shape == (1, 32, 32) and not np.array_equal(a, b)  # a new place on every read
    val = ImageDataset(paths, pre, cache=True, fixed_crops=True, crops_per_image=2)
    assert len(val) == 6
    np.testing.assert_array_equal(val[5]["image"], val[5]["image"])
    with pytest.raises(IndexError):
        val[6]
    with pytest.raises(ValueError, match="masks of a tiled dataset"):
        ImageDataset(paths, pre, with_masks=True)


# -- a tiled bundle end to end ------------------------------------------------------------------
def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 0.5 + 0.2 * np.sin(2 * np.pi * xx / 12 + rng.uniform(0, 6.3)) * np.cos(2 * np.pi * yy / 12)
    return (np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1) * 255).astype(np.uint8)


def _make_large(root: Path) -> Path:
    """A category of 80x112 px images with 2 px bright scratches (the tiles are 32 px)."""
    rng = np.random.default_rng(0)
    for sub in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(16):
        cv2.imwrite(str(root / "train/good" / f"{i:03d}.png"), _texture(rng, 80, 112))
    for i in range(4):
        cv2.imwrite(str(root / "test/good" / f"{i:03d}.png"), _texture(rng, 80, 112))
        img, mask = _texture(rng, 80, 112), np.zeros((80, 112), np.uint8)
        cv2.line(mask, (10, 10 + 10 * i), (100, 60), 255, 2)
        img[mask > 0] = 250
        cv2.imwrite(str(root / "test/scratch" / f"{i:03d}.png"), img)
        cv2.imwrite(str(root / "ground_truth/scratch" / f"{i:03d}_mask.png"), mask)
    return root


@pytest.fixture(scope="module")
def tiled_bundle(tmp_path_factory):
    pytest.importorskip("torch", reason="training needs torch; the torch-free half of this file runs without it")
    from anomaly.deploy.export import export_run
    from anomaly.training.config import TrainConfig
    from anomaly.training.run import train

    root = tmp_path_factory.mktemp("tiled")
    data = _make_large(root / "cat")
    cfg = TrainConfig(data=str(data), out=str(root / "run"), model="aae", image_size=32, tile_scale=1.0, epochs=2,
                      batch_size=16, model_kwargs={"latent_dim": 16, "base_channels": 8}, seed=0)
    train(cfg, tensorboard=False)
    bundle = export_run(root / "run", root / "bundle")
    return {"data": data, "run": root / "run", "bundle": bundle}


@pytest.mark.torch
def test_tiled_bundle_matches_the_torch_graph_on_the_same_tiles(tiled_bundle):
    """The runtime's stitched map and score equal the torch graph run on the same grid of tiles and
    blended by the same Stitcher: onnxruntime agrees with torch, and nothing else is different."""
    import torch

    from anomaly.data.io import read_image
    from anomaly.deploy.export import build_scoring_graph
    from anomaly.deploy.runtime import Runtime

    meta = json.loads((tiled_bundle["bundle"] / "model.json").read_text())
    assert meta["preprocess"]["tile_scale"] == 1.0 and meta["parity"]["unit"] == "tiles"
    assert meta["scoring"]["latent"] == "none"  # whole-image codes mean nothing for tiles
    rt = Runtime(tiled_bundle["bundle"], device="cpu")
    built = build_scoring_graph(tiled_bundle["run"])
    pre = built.preprocess
    path = tiled_bundle["data"] / "test/scratch/001.png"
    img = read_image(path, raw=True)
    x = pre(img)
    tiles, grid = pre.tiles(x)
    with torch.no_grad():
        ref = built.graph(torch.from_numpy(tiles))
    st = Stitcher(x.shape[1:], pre.image_size, pre.overlap)
    st.add(ref.anomaly_map.numpy(), grid)
    r = rt.score_image(img)
    assert r.anomaly_map.shape == (80, 112) and r.original_size == (80, 112)
    np.testing.assert_allclose(r.anomaly_map, st.result(), atol=2e-3, rtol=1e-3)
    assert r.score == pytest.approx(float(ref.score.max()), abs=2e-3, rel=1e-3)
    # the batched paths give each image what it gets alone
    batch = list(rt.score_paths([path, tiled_bundle["data"] / "test/good/000.png", path], batch_size=5))
    assert [b.score for b in batch][0] == pytest.approx(r.score, rel=1e-5)
    assert batch[2].score == pytest.approx(r.score, rel=1e-5)
    again = rt.score_batch([x, pre(read_image(tiled_bundle["data"] / "test/good/000.png", raw=True))], [(80, 112)] * 2)
    assert again[0].score == pytest.approx(r.score, rel=1e-5)
    np.testing.assert_allclose(again[0].anomaly_map, r.anomaly_map, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="H, W >= 32"):
        rt.score_batch([x[:, :20]], [(20, 112)])


@pytest.mark.torch
def test_tiled_bundle_calibrates_evaluates_and_audits_at_the_image_size(tiled_bundle, tmp_path):
    import shutil

    from anomaly.deploy.calibrate import calibrate_bundle
    from anomaly.deploy.evaluate import evaluate_bundle
    from anomaly.deploy.runtime import Runtime

    bundle = tmp_path / "bundle"
    shutil.copytree(tiled_bundle["bundle"], bundle)
    normal = tmp_path / "normal"
    normal.mkdir()
    rng = np.random.default_rng(5)
    for i in range(6):
        cv2.imwrite(str(normal / f"n{i}.png"), _texture(rng, 80, 112))
    calibrate_bundle(bundle, normal)
    rt = Runtime(bundle, device="cpu")
    assert rt.pixel_threshold is not None
    data = tiled_bundle["data"]
    res = evaluate_bundle(bundle, data)
    # 2 px scratches at 250 on a 32 px tile model at native pixels: found and localized
    assert res["image"]["auroc"] >= 0.9
    assert res["pixel"]["pixel_auroc"] >= 0.9
    r = rt.score_image(cv2.imread(str(data / "test/scratch/002.png"), cv2.IMREAD_GRAYSCALE))
    assert r.regions, "a bright 2 px scratch gives a region"
    mask = cv2.imread(str(data / "ground_truth/scratch/002_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    top = r.regions[0]
    assert mask[top.y:top.y + top.h, top.x:top.x + top.w].any()  # in original pixels, on the scratch


def test_a_sidecar_with_a_bad_tiling_scale_is_refused(trained_bundle):
    from anomaly.deploy.bundle import BundleError, check_sidecar

    meta = json.loads((trained_bundle["bundle"] / "model.json").read_text())
    check_sidecar(meta)
    for key, value, expected in (("tile_scale", 9.0, r"\(0, 4\]"), ("tile_scale", "1", "finite number"),
                                 ("tile_overlap", 0.9, r"\[0, 0.75\]")):
        bad = json.loads(json.dumps(meta))
        bad["preprocess"]["tile_scale"] = 1.0
        bad["preprocess"][key] = value
        with pytest.raises(BundleError, match=expected):
            check_sidecar(bad)

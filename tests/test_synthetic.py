"""Training defects (anomaly.data.synthetic), texture material (anomaly.data.textures), and the benchmarks'
evaluation-only defects and texture data sets (benchmarks/eval_defects.py, benchmarks/texture_data.py)."""
from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomaly.data import synthetic
from anomaly.data.folder import ImageDataset, discover
from anomaly.data.preprocess import Preprocess
from anomaly.data.synthetic import TRAIN_KINDS, DefectSynthesizer, SyntheticDefectDataset, perlin_noise
from anomaly.data.textures import COLOUR_TEXTURES, TEXTURES, load_texture

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:  # the evaluation-only modules live with the benchmarks (not a package)
    sys.path.append(str(REPO / "benchmarks"))

import eval_defects  # noqa: E402
from eval_defects import COLOUR_EVAL_KINDS, EVAL_KINDS, EvalDefectGenerator  # noqa: E402
from texture_data import make_texture_dataset  # noqa: E402


def _image(channels: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """A textured (C, S, S) float32 image in [0.1, 0.9] (away from the range ends)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = 0.5 + 0.2 * np.sin(xx / 3.0) * np.cos(yy / 5.0)
    img = np.stack([base + 0.05 * c for c in range(channels)]) + rng.normal(0, 0.03, (channels, size, size))
    return np.clip(img, 0.1, 0.9).astype(np.float32)


def _check_pair(image: np.ndarray, out: np.ndarray, mask: np.ndarray) -> None:
    c, h, w = image.shape
    assert out.shape == image.shape and out.dtype == np.float32
    assert mask.shape == (1, h, w) and mask.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert set(np.unique(mask)) <= {0.0, 1.0}


# ------------------------------------------------------------------------------ perlin noise

def test_perlin_noise_shape_range_and_determinism():
    a = perlin_noise((40, 56), 4, np.random.default_rng(1))
    b = perlin_noise((40, 56), 4, np.random.default_rng(1))
    c = perlin_noise((40, 56), 4, np.random.default_rng(2))
    assert a.shape == (40, 56) and a.dtype == np.float32
    assert a.min() >= -1.0 and a.max() <= 1.0 and a.std() > 0.05
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # More lattice cells -> rougher noise (larger neighbour differences relative to spread).
    smooth = perlin_noise((64, 64), 1, np.random.default_rng(0), octaves=1)
    rough = perlin_noise((64, 64), 16, np.random.default_rng(0), octaves=1)
    rough_ratio = np.abs(np.diff(rough, axis=1)).mean() / rough.std()
    smooth_ratio = np.abs(np.diff(smooth, axis=1)).mean() / smooth.std()
    assert rough_ratio > 4 * smooth_ratio
    # More cells than pixels and odd shapes still work.
    assert perlin_noise((9, 13), 32, np.random.default_rng(0)).shape == (9, 13)
    with pytest.raises(ValueError):
        perlin_noise((8, 8), 0, np.random.default_rng(0))


# ------------------------------------------------------------------------------ training defects

@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", TRAIN_KINDS)
def test_train_kind_changes_inside_mask_only(kind: str, channels: int):
    synth = DefectSynthesizer(kinds=(kind,), p_defect=1.0)
    for seed in range(6):
        image = _image(channels, seed=seed)
        out, mask = synth(image, np.random.default_rng(seed))
        _check_pair(image, out, mask)
        inside = np.broadcast_to(mask > 0, image.shape)
        assert mask.sum() >= 4, f"{kind}: empty mask"
        diff = np.abs(out - image)
        assert diff[~inside].max() == 0.0, f"{kind}: changed pixels outside the mask"
        assert diff[inside].mean() > 0.02, f"{kind}: mask marks unchanged pixels"


@pytest.mark.parametrize("channels", [1, 3])
def test_train_synthesizer_is_deterministic(channels: int):
    synth = DefectSynthesizer(p_defect=1.0, max_defects=3)
    image = _image(channels)
    a = synth(image, np.random.default_rng(7))
    b = synth(image, np.random.default_rng(7))
    c = synth(image, np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert image.min() >= 0.1  # the input was not modified in place


def test_p_defect_controls_identity():
    image = _image(1, size=32)
    never = DefectSynthesizer(p_defect=0.0)
    out, mask = never(image, np.random.default_rng(0))
    np.testing.assert_array_equal(out, image)
    assert mask.shape == (1, 32, 32) and not mask.any()
    half = DefectSynthesizer(p_defect=0.5, kinds=("stain",))
    rng = np.random.default_rng(0)
    drawn = [half(image, rng)[1].any() for _ in range(100)]
    assert 30 <= sum(drawn) <= 70
    always = DefectSynthesizer(p_defect=1.0)
    assert all(always(image, np.random.default_rng(s))[1].any() for s in range(20))


def test_texture_source_formats():
    rng = np.random.default_rng(0)
    textures = [
        (rng.random((80, 90)) * 255).astype(np.uint8),            # (H, W) uint8
        rng.random((70, 70, 3)).astype(np.float32),               # (H, W, 3) float
        rng.random((3, 50, 60)).astype(np.float32),               # (C, H, W) float
    ]
    synth = DefectSynthesizer(kinds=("perlin",), p_defect=1.0, texture_source=textures)
    for channels in (1, 3):
        image = _image(channels)
        for seed in range(6):
            out, mask = synth(image, np.random.default_rng(seed))
            _check_pair(image, out, mask)
            assert mask.any()


def test_invalid_arguments_are_explained():
    with pytest.raises(ValueError, match="unknown kinds"):
        DefectSynthesizer(kinds=("perlin", "smudge"))
    with pytest.raises(ValueError, match="p_defect"):
        DefectSynthesizer(p_defect=1.5)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        DefectSynthesizer()(np.zeros((32, 32, 3), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown kind"):
        EvalDefectGenerator()(_image(1), np.random.default_rng(0), kind="perlin")


# ------------------------------------------------------------------------------ evaluation defects

@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", EVAL_KINDS)
def test_eval_kind_changes_inside_mask(kind: str, channels: int):
    gen = EvalDefectGenerator()
    for seed in range(6):
        image = _image(channels, seed=seed)
        out, mask = gen(image, np.random.default_rng(seed), kind=kind)
        _check_pair(image, out, mask)
        assert mask.sum() >= 2, f"{kind}: empty mask"
        inside = np.broadcast_to(mask > 0, image.shape)
        diff = np.abs(out - image)
        assert diff[inside].mean() > 0.03, f"{kind}: defect not visible inside its mask"
        if kind == "foreign":  # blurred edges leak a little beyond the alpha = 0.5 contour
            assert diff[~inside].mean() < 0.01 and diff[~inside].max() < 0.5
        else:
            assert diff[~inside].max() == 0.0, f"{kind}: changed pixels outside the mask"


def test_discolour_changes_colour_but_not_luma():
    """What a grayscale model reads (BT.601 luma, as Preprocess converts) is unchanged; the colour is not."""
    gen = EvalDefectGenerator(kinds=COLOUR_EVAL_KINDS)
    ihc = load_texture("ihc")
    for seed in range(6):
        image = (ihc[seed * 60:seed * 60 + 96, :96].astype(np.float32) / 255).transpose(2, 0, 1) if seed % 2 else _image(3, seed=seed)
        out, mask = gen(image, np.random.default_rng(seed))
        _check_pair(image, out, mask)
        inside = mask[0] > 0
        assert inside.sum() >= 20
        diff = np.abs(out - image).max(axis=0)
        assert diff[inside].mean() > 0.03, "discolouration not visible inside its mask"
        assert diff[~inside].max() == 0.0, "changed pixels outside the mask"
        gray = [cv2.cvtColor(np.ascontiguousarray(x.transpose(1, 2, 0)), cv2.COLOR_RGB2GRAY) for x in (image, out)]
        np.testing.assert_allclose(gray[1], gray[0], atol=1e-5)
        # ... and Preprocess(channels=1), the grayscale model's input, sees the same image.
        pre = Preprocess(image_size=96, channels=1)
        np.testing.assert_allclose(pre(out.transpose(1, 2, 0)), pre(image.transpose(1, 2, 0)), atol=1e-5)
    with pytest.raises(ValueError, match="needs an RGB"):
        gen(_image(1), np.random.default_rng(0), kind="discolour")


def test_eval_generator_is_deterministic_and_uses_foreign_textures():
    tex = (np.random.default_rng(3).random((100, 100)) * 255).astype(np.uint8)
    gen = EvalDefectGenerator(foreign_textures=[tex])
    image = _image(1)
    a = gen(image, np.random.default_rng(5))
    b = gen(image, np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    out, mask = gen(image, np.random.default_rng(1), kind="foreign")
    assert mask.any() and np.abs(out - image)[mask > 0].mean() > 0.03


def _ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def test_train_and_eval_generators_are_separate():
    # Different classes, neither derived from the other.
    assert not issubclass(EvalDefectGenerator, DefectSynthesizer)
    assert not issubclass(DefectSynthesizer, EvalDefectGenerator)
    # The evaluation code calls none of the training code paths (names its bytecode refers to).
    def names(code) -> set[str]:
        out = set(code.co_names)
        for const in code.co_consts:
            if inspect.iscode(const):
                out |= names(const)
        return out

    eval_functions = [f for f in vars(EvalDefectGenerator).values() if inspect.isfunction(f)]
    eval_functions += [f for n, f in vars(eval_defects).items() if n.startswith("_eval_")]
    used = set().union(*(names(f.__code__) for f in eval_functions))
    training_names = {"DefectSynthesizer", "perlin_noise", "_perlin_octave", "_fade"}
    training_names |= {n for n in vars(DefectSynthesizer) if n.startswith("_") and not n.startswith("__")}
    assert len(eval_functions) >= 6 and "_eval_random_walk" in used  # the introspection sees the code
    assert not used & training_names, f"EvalDefectGenerator uses training code: {used & training_names}"
    # ... and its module imports nothing of the training side: not even the layout helpers.
    tree = ast.parse(Path(eval_defects.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported and not {m for m in imported if m.startswith("anomaly")}, imported
    assert not hasattr(synthetic, "EvalDefectGenerator") and not hasattr(synthetic, "EVAL_KINDS")
    # And their defects differ in distribution (mask area, number of pieces).
    train, evaluate = DefectSynthesizer(p_defect=1.0), EvalDefectGenerator()
    rng = np.random.default_rng(0)
    areas: dict[str, list[float]] = {"train": [], "eval": []}
    pieces: dict[str, list[int]] = {"train": [], "eval": []}
    for i in range(40):
        image = _image(1, size=48, seed=i)
        for name, gen in (("train", train), ("eval", evaluate)):
            _, mask = gen(image, rng)
            areas[name].append(float(mask.mean()))
            pieces[name].append(cv2.connectedComponents(mask[0].astype(np.uint8))[0] - 1)
    assert _ks_distance(np.array(areas["train"]), np.array(areas["eval"])) > 0.3
    assert np.mean(pieces["train"]) > np.mean(pieces["eval"])


def test_synthetic_module_does_not_import_torch():
    code = ("import sys; import anomaly.data.synthetic, anomaly.data.textures; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'skimage' not in sys.modules, 'scikit-image imported at import time'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=60)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------ dataset wrapper

def test_synthetic_defect_dataset_wraps_image_dataset(mvtec_dir: Path):
    layout = discover(mvtec_dir)
    base = ImageDataset(layout.train, Preprocess(image_size=32, channels=1))
    ds = SyntheticDefectDataset(base, DefectSynthesizer(p_defect=1.0), seed=3)
    assert len(ds) == len(base)
    item = ds[2]
    assert set(item) >= {"image", "target", "mask", "label", "anomalous"}
    clean = base[2]["image"]
    np.testing.assert_array_equal(item["target"], clean)
    assert item["image"].shape == clean.shape == (1, 32, 32)
    assert item["mask"].shape == (1, 32, 32) and item["mask"].any()
    assert item["label"] == base[2]["label"] and item["anomalous"] == 0
    outside = np.broadcast_to(item["mask"] == 0, clean.shape)
    np.testing.assert_array_equal(item["image"][outside], clean[outside])
    # Reproducible across instances; fresh defects on each draw and each epoch.
    again = SyntheticDefectDataset(base, DefectSynthesizer(p_defect=1.0), seed=3)[2]
    np.testing.assert_array_equal(again["image"], item["image"])
    second = ds[2]
    assert not np.array_equal(second["mask"], item["mask"])
    ds.set_epoch(1)
    assert not np.array_equal(ds[2]["mask"], item["mask"])
    # Normals pass through untouched when no defect is drawn.
    ident = SyntheticDefectDataset(base, DefectSynthesizer(p_defect=0.0))[0]
    np.testing.assert_array_equal(ident["image"], ident["target"])
    assert not ident["mask"].any()


# ------------------------------------------------------------------------------ texture data sets

def test_load_defect_sources_bounds_memory_and_feeds_the_perlin_fill(tmp_path: Path, caplog):
    from anomaly.data.synthetic import load_defect_sources

    rng = np.random.default_rng(0)
    src = tmp_path / "sources"
    (src / "sub").mkdir(parents=True)
    stripes = np.zeros((400, 600, 3), np.uint8)
    stripes[:, ::4] = 255  # high-frequency content a copy of a flat image cannot have
    cv2.imwrite(str(src / "stripes.png"), stripes)
    cv2.imwrite(str(src / "sub" / "deep16.png"), (rng.random((50, 40)) * 65535).astype(np.uint16))
    (src / "broken.png").write_bytes(b"not an image")
    with caplog.at_level("WARNING"):
        loaded = load_defect_sources(src, max_side=128)
    assert "broken.png" in caplog.text  # skipped, said so
    assert len(loaded) == 2 and all(a.dtype == np.uint8 for a in loaded)
    assert sorted(a.shape for a in loaded) == [(50, 40), (85, 128, 3)]  # shrunk to the longest side, small kept
    (src / "broken.png").unlink()
    assert len(load_defect_sources(src, max_images=1)) == 1
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_defect_sources(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable images"):
        load_defect_sources(tmp_path / "empty")

    flat = np.full((1, 48, 48), 0.5, np.float32)
    with_sources = DefectSynthesizer(kinds=("perlin",), p_defect=1.0, texture_source=loaded[1:])
    own_copy = DefectSynthesizer(kinds=("perlin",), p_defect=1.0)
    for seed in range(4):
        out, mask = with_sources(flat, np.random.default_rng(seed))
        assert out[0][mask[0] > 0].std() > 0.05  # the stripes are in the defect
        out, mask = own_copy(flat, np.random.default_rng(seed))
        assert out[0][mask[0] > 0].std() < 1e-3  # a transformed copy of a flat image is flat


def test_defect_source_photos_exclude_the_evaluated_textures(tmp_path: Path):
    from anomaly.data.textures import SOURCE_PHOTOS, write_defect_sources

    assert not set(SOURCE_PHOTOS) & set(TEXTURES)
    folder = write_defect_sources(tmp_path / "photos")
    files = sorted(p.stem for p in folder.glob("*.png"))
    assert files == sorted(SOURCE_PHOTOS)
    assert all(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).dtype == np.uint8 for p in folder.glob("*.png"))


def test_textures_load_offline():
    for name in TEXTURES:
        tex = load_texture(name)
        assert tex.dtype == np.uint8 and tex.ndim == 2 and min(tex.shape) >= 256
    with pytest.raises(ValueError, match="brick, grass, gravel"):
        load_texture("marble")


def test_make_texture_dataset_layout(tmp_path: Path):
    root = make_texture_dataset(tmp_path / "gravel", "gravel", image_size=32, n_train=6,
                                n_test_good=3, n_test_bad=8, seed=1)
    layout = discover(root)
    assert layout.kind == "mvtec" and len(layout.train) == 6 and len(layout.test) == 11
    by_type: dict[str, list] = {}
    for s in layout.test:
        by_type.setdefault(s.defect_type, []).append(s)
    assert set(by_type) == {"good", *EVAL_KINDS}
    assert all(s.label == 0 and s.mask is None for s in by_type["good"])
    for kind in EVAL_KINDS:
        assert len(by_type[kind]) == 2
        for s in by_type[kind]:
            assert s.label == 1 and s.mask is not None
            m = cv2.imread(str(s.mask), cv2.IMREAD_UNCHANGED)
            assert m.dtype == np.uint8 and m.shape == (32, 32)
            assert set(np.unique(m)) == {0, 255}
    for s in layout.train + layout.test:
        img = cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED)
        assert img.shape == (32, 32), "grayscale textures must stay single-channel"
    # The loader reads the masks back, aligned with the defects.
    ds = ImageDataset(layout.test, Preprocess(image_size=32, channels=1), with_masks=True)
    for i, s in enumerate(layout.test):
        assert ds[i]["mask"].any() == bool(s.label)


def test_colour_texture_data_set_has_colour_and_discolour_defects(tmp_path: Path):
    assert load_texture("ihc").shape == (512, 512, 3) and set(COLOUR_TEXTURES) == {"ihc"}
    root = make_texture_dataset(tmp_path / "ihc", "ihc", image_size=32, n_train=3, n_test_good=2, n_test_bad=10, seed=0)
    layout = discover(root)
    assert {s.defect_type for s in layout.test} == {"good", *EVAL_KINDS, *COLOUR_EVAL_KINDS}
    for s in layout.train + layout.test:
        img = cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED)
        assert img.shape == (32, 32, 3)
    for s in layout.test:
        if s.defect_type == "discolour":
            img = cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED).astype(np.float32)
            m = cv2.imread(str(s.mask), cv2.IMREAD_GRAYSCALE) > 127
            chroma = np.abs(img - img.mean(axis=2, keepdims=True)).sum(axis=2)
            assert m.any() and chroma[m].mean() > 5  # coloured, not gray
    # A grayscale texture cannot take a colour-only defect; the error says why.
    with pytest.raises(ValueError, match="needs a colour texture"):
        make_texture_dataset(tmp_path / "brick", "brick", image_size=32, n_train=2, n_test_good=1, n_test_bad=1,
                             defect_kinds=("discolour",))


def test_make_texture_dataset_is_reproducible_and_safe(tmp_path: Path):
    kw = dict(image_size=24, n_train=3, n_test_good=1, n_test_bad=2, seed=4)
    a = make_texture_dataset(tmp_path / "a", "brick", **kw)
    b = make_texture_dataset(tmp_path / "b", "brick", **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png")) and len(files) == 3 + 1 + 2 + 2
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    # Same parameters: reused as is. Other parameters: refused unless overwrite.
    stamp = (a / "train/good/000.png").stat().st_mtime_ns
    make_texture_dataset(a, "brick", **kw)
    assert (a / "train/good/000.png").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="overwrite"):
        make_texture_dataset(a, "brick", **{**kw, "n_train": 5})
    make_texture_dataset(a, "brick", **{**kw, "n_train": 5}, overwrite=True)
    assert len(list((a / "train/good").glob("*.png"))) == 5
    # A folder it did not write is never touched; unknown names are explained.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        make_texture_dataset(other, "brick", **kw, overwrite=True)
    assert (other / "keep.txt").read_text() == "x"
    with pytest.raises(ValueError, match="unknown texture 'marble'"):
        make_texture_dataset(tmp_path / "m", "marble")
    assert not (tmp_path / "m").exists()
    assert not list(tmp_path.glob(".*tmp")), "temporary folders left behind"


def test_train_and_test_crops_come_from_disjoint_regions(tmp_path: Path):
    size = 32
    root = make_texture_dataset(tmp_path / "grass", "grass", image_size=size, n_train=12, n_test_good=6,
                                n_test_bad=4, seed=0, max_rotation=0.0, flips=False)
    manifest = json.loads((root / "manifest.json").read_text())
    split = manifest["split_row"]
    for rel, rec in manifest["crops"].items():
        y0, _, y1, _ = rec["box"]
        assert (y1 <= split) if rel.startswith("train/") else (y0 >= split), rel
    # Independently of the manifest: find each crop in the source image by template matching.
    source = load_texture("grass")
    layout = discover(root)
    for s in layout.train + [t for t in layout.test if t.label == 0]:
        crop = cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED)
        score = cv2.matchTemplate(source.astype(np.float32), crop.astype(np.float32), cv2.TM_SQDIFF)
        _, _, (x, y), _ = cv2.minMaxLoc(score)
        assert np.array_equal(source[y:y + size, x:x + size], crop), f"{s.path} is not an unaltered crop of the source"
        if s.defect_type == "good" and "test" in s.path.parts:
            assert y >= split
        else:
            assert y + size <= split

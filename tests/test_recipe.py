"""The recipe ``anomaly train`` picks by itself: the measurements, the rule, the presets and the CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomaly.cli import main
from anomaly.training import recipe as rule
from anomaly.training.presets import PRESET_FIELDS, PRODUCT_PRESETS, TEXTURE_TILE_SIZE, get_preset, get_product_preset
from anomaly.training.recipe import ALIGNED_MIN, choose, measure


def _aligned(root: Path, n: int = 16, size: int = 64, seed: int = 0) -> Path:
    """The same part in every image (two bars and a hole), with gain, a 1-px jitter and noise."""
    rng = np.random.default_rng(seed)
    base = np.full((size, size), 0.35, np.float32)
    base[:, size // 4:size // 4 + 4] = 0.9
    base[:, 3 * size // 4 - 4:3 * size // 4] = 0.9
    base[size // 2 - 6:size // 2 + 6, size // 2 - 6:size // 2 + 6] = 0.1
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.roll(base * rng.uniform(0.8, 1.2), tuple(rng.integers(-1, 2, 2)), axis=(0, 1))
        img = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
        cv2.imwrite(str(root / f"{i:03d}.png"), (img * 255).astype(np.uint8))
    return root


def _texture(root: Path, n: int = 16, size: int = 64, seed: int = 0, shading: float = 0.0) -> Path:
    """Random crops of one stationary texture (smoothed noise), optionally under the same vignetting."""
    rng = np.random.default_rng(seed)
    source = cv2.GaussianBlur(rng.random((3 * size, 3 * size)).astype(np.float32), (0, 0), 2.0)
    source = (source - source.min()) / (source.max() - source.min())
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        y, x = rng.integers(0, 2 * size, 2)
        img = source[y:y + size, x:x + size] * (1 - shading * (xx ** 2 + yy ** 2) / 2)
        cv2.imwrite(str(root / f"{i:03d}.png"), (img * 255).astype(np.uint8))
    return root


def test_measure_separates_aligned_parts_from_textures_at_the_documented_threshold(tmp_path: Path) -> None:
    aligned = measure(sorted(_aligned(tmp_path / "a").glob("*.png")))
    texture = measure(sorted(_texture(tmp_path / "t").glob("*.png")))
    shaded = measure(sorted(_texture(tmp_path / "s", shading=0.6).glob("*.png")))  # shared vignetting is no structure
    assert aligned["alignment"] > 0.5 > ALIGNED_MIN
    assert abs(texture["alignment"]) < 0.05 and shaded["alignment"] < ALIGNED_MIN
    assert aligned["native_side"] == texture["native_side"] == 64 and aligned["images"] == aligned["of"] == 16
    assert aligned["channels"] == texture["channels"] == 1
    a, t = choose(aligned), choose(texture)
    assert a.preset == "aligned" and t.preset == "texture_repair"
    assert f"{aligned['alignment']:.2f} >= {ALIGNED_MIN}" in a.reason  # the numbers and the threshold, in words
    assert f"< {ALIGNED_MIN}" in t.reason and "64 px" in t.reason
    assert a.settings["model"] == "aae" and t.settings["model"] == "cyclegan" and t.settings["channels"] == 1


def test_large_texture_images_are_tiled_at_native_scale(tmp_path: Path) -> None:
    big = measure(sorted(_texture(tmp_path / "big", n=10, size=2 * get_product_preset("texture_repair").image_size)
                         .glob("*.png")))
    chosen = choose(big)
    assert chosen.preset == "texture_tiled" and "256 px (>= 2 x 128)" in chosen.reason
    assert chosen.settings["tile_scale"] == 1.0 and chosen.settings["image_size"] == TEXTURE_TILE_SIZE


def test_colour_is_measured_in_fact_and_too_few_images_keep_the_default(tmp_path: Path) -> None:
    gray_rgb, colour = tmp_path / "gray_rgb", tmp_path / "colour"
    gray_rgb.mkdir(), colour.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        g = rng.integers(0, 256, (40, 40), dtype=np.uint8)
        cv2.imwrite(str(gray_rgb / f"{i}.png"), np.dstack([g, g, g]))  # RGB files of a gray image
        c = np.dstack([g, g // 2, 255 - g])
        cv2.imwrite(str(colour / f"{i}.png"), c)
    m = measure(sorted(gray_rgb.glob("*.png")))
    assert m["channels"] == 1 and m["colourfulness"] == 0.0
    assert measure(sorted(colour.glob("*.png")))["channels"] == 3
    assert m["alignment"] is None  # 3 images: fewer than MIN_IMAGES
    chosen = choose(m)
    assert chosen.preset == "aligned" and f"(< {rule.MIN_IMAGES})" in chosen.reason


def test_measure_errors_name_what_is_wrong(tmp_path: Path) -> None:
    from anomaly.data.io import ImageReadError

    with pytest.raises(ValueError, match="at least one training image"):
        measure([])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="broken.png"):
        measure([tmp_path / "broken.png"])


def test_product_presets_reproduce_the_settings_their_figures_were_measured_with() -> None:
    from anomaly.training.config import train_defaults

    d = train_defaults()
    aligned = get_product_preset("aligned").settings()
    assert aligned == {k: d[k] for k in PRESET_FIELDS}  # the default recipe is the training defaults
    repair = get_product_preset("texture_repair")
    bench = get_preset(repair.benchmark).train_config(data="x", out="y", epochs=60, image_size=128).to_dict()
    settings = repair.settings()
    for k in ("model", "image_size", "epochs", "batch_size", "lr", "lr_decay_from", "augment", "synthetic_defects",
              "model_kwargs", "objective_kwargs"):
        assert settings[k] == bench[k], k
    # the benchmark's "learned+stats" scoring: its overrides, exported without per-pixel normalisation
    overrides, normalize = get_preset(repair.benchmark).scorings["learned+stats"]
    assert {k: settings["scoring"][k] for k in overrides} == overrides and normalize is False
    assert "--no-normalize" in repair.export_args and "flips" in repair.export_args
    for p in PRODUCT_PRESETS.values():  # every figure points at a results file that exists
        assert p.figures == "not measured" or p.results, p.name
        root = Path(__file__).resolve().parents[1]
        assert all((root / r).is_file() for r in p.results), p.results


def test_the_thresholds_link_to_their_measurements() -> None:
    root = Path(__file__).resolve().parents[1]
    doc = rule.__doc__ or ""
    name = next(w.strip("`.") for w in doc.split() if "recipe-properties" in w)
    text = (root / name).read_text(encoding="utf-8")
    assert f"{ALIGNED_MIN}" in text and "ELPV" in text and "brick" in text


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory) -> dict:
    """One run trained with no model options (1 epoch on 16 aligned 64-px images), and its stderr."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("auto")
    data = _aligned(tmp / "data")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", "--data", str(data), "--out", str(tmp / "run"), "--epochs", "1", "--batch-size", "8",
                   "--max-minutes", "1", "--no-tensorboard", "--progress", "none"])
    return {"rc": rc, "err": err.getvalue(), "data": data, "run": tmp / "run", "tmp": tmp}


def test_train_without_model_options_says_and_records_the_recipe(auto_run: dict) -> None:
    assert auto_run["rc"] == 0
    assert "recipe: aligned -- aligned gray images (alignment " in auto_run["err"]
    cfg = json.loads((auto_run["run"] / "config.json").read_text())
    rec = cfg["recipe"]
    assert rec["chosen_by"] == "auto" and rec["preset"] == "aligned" and rec["measured"]["images"] == 16
    assert rec["reason"] in auto_run["err"] and rec["measured"]["alignment"] >= ALIGNED_MIN
    assert (cfg["model"], cfg["image_size"], cfg["tile_scale"], cfg["channels"], cfg["epochs"]) == ("aae", 64, None, 1, 1)


def test_resume_without_options_keeps_the_recorded_recipe(auto_run: dict, monkeypatch, capsys) -> None:
    run = auto_run["tmp"] / "resumed"
    shutil.copytree(auto_run["run"], run)

    def no_measuring(*a, **k):
        raise AssertionError("a resumed run must not be measured again")

    monkeypatch.setattr(rule, "recommend", no_measuring)
    assert main(["train", "--data", str(auto_run["data"]), "--out", str(run), "--epochs", "2", "--batch-size", "8",
                 "--no-tensorboard", "--progress", "none", "--resume"]) == 0
    assert "as recorded in" in capsys.readouterr().err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["epochs"] == 2 and cfg["recipe"] == json.loads((auto_run["run"] / "config.json").read_text())["recipe"]


def _parsed_config(argv: list[str]):
    """The TrainConfig ``anomaly train ARGV`` would train (nothing is trained)."""
    from anomaly.cli import build_parser
    from anomaly.training.cli import _config, _recipe

    args = build_parser().parse_args(["train", "--out", "unused", *argv])
    return _config(args, *_recipe(args)[:2])


def test_preset_applies_its_settings_and_explicit_options_win(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(rule, "recommend", lambda *a, **k: pytest.fail("--preset must not measure"))
    cfg = _parsed_config(["--data", str(tmp_path), "--preset", "texture_repair"])
    assert (cfg.model, cfg.image_size, cfg.epochs, cfg.batch_size, cfg.lr_decay_from, cfg.synthetic_defects) == \
        ("cyclegan", 128, 60, 8, 0.5, 0.5)
    assert cfg.scoring["residual"] == "learned" and cfg.scoring["texture"] == "stats" and cfg.model_kwargs["segmenter"]
    assert cfg.recipe == {"preset": "texture_repair", "reason": "named with --preset", "measured": None,
                          "chosen_by": "preset"}
    cfg = _parsed_config(["--data", str(tmp_path), "--preset", "texture_repair", "--image-size", "64", "--epochs", "3",
                          "--residual", "l1_learned"])
    assert (cfg.model, cfg.image_size, cfg.epochs, cfg.scoring["residual"]) == ("cyclegan", 64, 3, "l1_learned")
    assert "--image-size, --residual given" in cfg.recipe["reason"]
    cfg = _parsed_config(["--data", str(tmp_path), "--preset", "texture_repair", "--model", "aae"])
    assert cfg.model == "aae" and cfg.model_kwargs == {} and cfg.scoring["residual"] == "l1_ssim"  # cyclegan's dropped
    assert cfg.image_size == 128 and cfg.epochs == 60  # size and budget kept
    cfg = _parsed_config(["--data", str(tmp_path), "--preset", "texture_tiled"])
    assert (cfg.model, cfg.image_size, cfg.tile_scale) == ("aae", TEXTURE_TILE_SIZE, 1.0)


def test_explicit_model_options_train_the_defaults_without_a_recipe(tmp_path: Path, monkeypatch) -> None:
    from anomaly.training.config import train_defaults

    monkeypatch.setattr(rule, "recommend", lambda *a, **k: pytest.fail("model options given: nothing to measure"))
    d = train_defaults()
    for option in (["--model", "aae"], ["--image-size", "64"], ["--residual", "l1_ssim"], ["--texture-stats"]):
        cfg = _parsed_config(["--data", str(tmp_path), *option])
        assert cfg.recipe is None and cfg.model == d["model"] and cfg.epochs == d["epochs"], option


def test_unknown_preset_exits_2_listing_the_known_ones(tmp_path: Path, capsys) -> None:
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--preset", "texturetiled"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'texturetiled'" in err and all(name in err for name in PRODUCT_PRESETS)
    assert not (tmp_path / "r").exists()


def test_presets_command_lists_every_preset_with_its_figures(tmp_path: Path, capsys) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for p in PRODUCT_PRESETS.values():
        assert f"{p.name}: {p.describe()}" in out and p.figures in out
    assert "0.918 ± 0.006" in out and "pixel recall at 1 % normal-pixel FPR 0.170" in out and f">= {ALIGNED_MIN}" in out
    assert main(["presets", "--data", str(_texture(tmp_path / "t"))]) == 0
    out = capsys.readouterr().out
    assert "t: texture_repair -- stationary gray texture" in out and "measured: images 16" in out

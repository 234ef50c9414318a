"""The `anomaly` command: the by-hand happy path and the errors a user meets first."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anomaly.cli import main


def test_train_export_calibrate_audit(mvtec_dir: Path, tmp_path: Path, capsys) -> None:
    run, bundle, out = tmp_path / "run", tmp_path / "bundle", tmp_path / "audit"
    assert main(["train", "--data", str(mvtec_dir), "--model", "aae", "--out", str(run), "--image-size", "32",
                 "--epochs", "2", "--batch-size", "4", "--model-kwargs", '{"latent_dim": 8, "base_channels": 8}']) == 0
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "losses.csv").is_file()
    assert main(["export", str(run), "--out", str(bundle)]) == 0
    assert (bundle / "model.onnx").is_file() and (bundle / "model.json").is_file()
    # a colour-space option a grayscale run cannot take: a clear error, no bundle
    assert main(["export", str(run), "--out", str(tmp_path / "ycc"), "--colour", "ycc"]) == 2
    assert "needs an RGB model" in capsys.readouterr().err and not (tmp_path / "ycc").exists()
    # the texture-statistics part: exported, described, and as exact as the rest of the graph
    assert main(["export", str(run), "--out", str(tmp_path / "stats"), "--texture-stats"]) == 0
    assert "texture-statistics centres" in capsys.readouterr().out
    meta = json.loads((tmp_path / "stats" / "model.json").read_text())
    assert meta["scoring"]["texture"] == "stats" and meta["scoring"]["mix"]["parts"][-1] == "stats"
    # the map is a sum of standardised parts; this 2-epoch model's l1_ssim part varies by ~0.008 over
    # its 2 validation images, so float32 noise of ~1e-5 becomes ~1e-3 in map units: the tolerance is
    # stated against the pixel threshold, the unit decisions are made in (0.1 % of it)
    assert meta["parity"]["max_abs_diff_map"] < 1e-3 * abs(meta["calibration"]["pixel"]["threshold"])

    normal = tmp_path / "held_out_normal"
    normal.mkdir()
    for p in sorted((mvtec_dir / "test" / "good").glob("*.png")):
        (normal / p.name).write_bytes(p.read_bytes())
    assert main(["calibrate", str(bundle), "--normal", str(normal), "--target-fpr", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "image threshold" in printed and "false-positive rate" in printed
    cal = json.loads((bundle / "model.json").read_text())["calibration"]
    assert cal["source"]["n_normal"] == 4 and cal["image"]["method"] == "fpr"

    assert main(["audit", str(bundle), str(mvtec_dir / "test"), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 8 and {r["label"] for r in rows} <= {"0", "1"}
    assert all(float(r["threshold"]) == pytest.approx(cal["image"]["threshold"], rel=1e-5) for r in rows)
    assert len(list((out / "heatmaps").glob("*.jpg"))) == 8


def test_train_missing_folder(tmp_path: Path, capsys) -> None:
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_train_empty_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "no training images" in capsys.readouterr().err


def test_train_unreadable_image(plain_dir: Path, tmp_path: Path, capsys) -> None:
    (plain_dir / "broken.png").write_bytes(b"this is not a png")
    assert main(["train", "--data", str(plain_dir), "--out", str(tmp_path / "r"), "--image-size", "32",
                 "--epochs", "1", "--val-fraction", "0"]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "not a decodable image" in err


def test_train_refuses_colour_ycc_on_grayscale_data(mvtec_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--data", str(mvtec_dir), "--out", str(tmp_path / "r"), "--image-size", "32", "--epochs", "1",
                 "--colour", "ycc"]) == 2
    assert "needs an RGB model; the data is grayscale" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()  # refused before any training


def test_train_stores_texture_stats_for_export(mvtec_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert main(["train", "--data", str(mvtec_dir), "--out", str(run), "--image-size", "32", "--epochs", "1",
                 "--batch-size", "4", "--model", "ae", "--texture-stats"]) == 0
    assert json.loads((run / "config.json").read_text())["scoring"]["texture"] == "stats"
    assert main(["export", str(run), "--out", str(tmp_path / "b")]) == 0  # the run's setting
    assert json.loads((tmp_path / "b" / "model.json").read_text())["scoring"]["texture"] == "stats"
    assert main(["export", str(run), "--out", str(tmp_path / "off"), "--no-texture-stats"]) == 0  # overridden
    assert json.loads((tmp_path / "off" / "model.json").read_text())["scoring"]["texture"] == "none"


def test_train_refuses_texture_stats_below_32_px(mvtec_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--data", str(mvtec_dir), "--out", str(tmp_path / "r"), "--image-size", "16", "--epochs", "1",
                 "--texture-stats"]) == 2
    assert "texture statistics need images of at least 32 px" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()  # refused before any training


def test_train_defect_sources_errors(mvtec_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["train", "--data", str(mvtec_dir), "--out", str(tmp_path / "r"), "--image-size", "32", "--epochs", "1"]
    assert main(args + ["--defect-sources", str(tmp_path)]) == 2  # without --synthetic-defects: nothing to fill
    assert "synthetic_defects" in capsys.readouterr().err
    assert main(args + ["--synthetic-defects", "0.5", "--defect-sources", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(args + ["--synthetic-defects", "0.5", "--defect-sources", str(tmp_path / "empty")]) == 2
    assert "no readable images" in capsys.readouterr().err


def test_train_lr_decay_and_augment_options(mvtec_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["train", "--data", str(mvtec_dir), "--out", str(tmp_path / "r"), "--image-size", "32", "--epochs", "2",
            "--batch-size", "4", "--model-kwargs", '{"latent_dim": 8, "base_channels": 8}']
    assert main(args + ["--lr-decay-from", "1.5"]) == 2
    assert "lr_decay_from must be in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args + ["--augment", "rot90"])
    assert "invalid choice: 'rot90'" in capsys.readouterr().err
    assert main(args + ["--lr-decay-from", "0.5", "--augment", "flip_rot90"]) == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["lr_decay_from"] == 0.5 and saved["augment"] == "flip_rot90"


def test_unknown_model(mvtec_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--data", str(mvtec_dir), "--model", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_audit_bad_inputs_do_not_stop_the_batch(trained_bundle: dict, tmp_path: Path, capsys) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = sorted((trained_bundle["data"] / "test" / "good").glob("*.png"))[0]
    (inputs / "ok.png").write_bytes(good.read_bytes())
    (inputs / "zero.png").write_bytes(b"")
    (inputs / "text.png").write_text("hello")
    assert main(["audit", str(trained_bundle["bundle"]), str(inputs), "--out", str(tmp_path / "o")]) == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(tmp_path / "o" / "results.csv"))}
    assert rows["ok.png"]["error"] == "" and rows["ok.png"]["score"] != ""
    assert rows["zero.png"]["error"] and rows["text.png"]["error"]
    assert "3 images" in capsys.readouterr().out


def test_audit_missing_bundle_and_input(trained_bundle: dict, tmp_path: Path, capsys) -> None:
    images = str(trained_bundle["data"] / "test")
    assert main(["audit", str(tmp_path / "nobundle"), images, "--out", str(tmp_path / "o")]) == 2
    assert "no such bundle" in capsys.readouterr().err
    assert main(["audit", str(trained_bundle["bundle"]), str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_user_errors_in_a_fresh_process(trained_bundle: dict, tmp_path: Path) -> None:
    """Each command's own error still exits 2 with its message when nothing else was imported,
    and the audit's path errors come without loading scikit-learn."""
    bundle, data = str(trained_bundle["bundle"]), trained_bundle["data"]
    code = (
        "import sys\n"
        "from anomaly.cli import main\n"
        f"assert main(['audit', {bundle!r}, {str(tmp_path / 'nothing')!r}, '--out', {str(tmp_path / 'o')!r}]) == 2\n"
        "assert not [m for m in sys.modules if m.startswith('sklearn')], 'sklearn imported'\n"
        f"assert main(['calibrate', {bundle!r}, '--normal', {str(data / 'train' / 'good')!r}]) == 2\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "no such file or folder" in proc.stderr and "used to train" in proc.stderr


def test_calibrate_refuses_training_images(trained_bundle: dict, capsys) -> None:
    assert main(["calibrate", str(trained_bundle["bundle"]), "--normal", str(trained_bundle["data"] / "train" / "good")]) == 2
    assert "used to train" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["dcgan", "vae"])
def test_train_generative_writes_sample_grid(model: str, mvtec_dir: Path, tmp_path: Path) -> None:
    import cv2

    run = tmp_path / "run"
    assert main(["train", "--data", str(mvtec_dir), "--model", model, "--out", str(run), "--image-size", "32",
                 "--epochs", "1", "--batch-size", "4", "--generative"]) == 0
    grid = cv2.imread(str(run / "samples.png"))
    assert grid is not None and grid.shape[0] > 32 and grid.shape[1] > 32 and grid.std() > 0


def test_conditional_model_end_to_end(tmp_path: Path, capsys) -> None:
    """Several categories -> cond_aae (label = category) -> bundle with a `label` input -> audit per category."""
    from conftest import make_mvtec

    from anomaly.deploy.bundle import load_sidecar
    from anomaly.deploy.runtime import Runtime

    root = tmp_path / "products"
    make_mvtec(root / "tiles_a", n_train=8, seed=1)
    make_mvtec(root / "tiles_b", n_train=8, seed=2)
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    assert main(["train", "--data", str(root), "--model", "cond_aae", "--out", str(run), "--image-size", "32",
                 "--epochs", "1", "--batch-size", "4", "--model-kwargs", '{"latent_dim": 8, "base_channels": 8}']) == 0
    assert main(["export", str(run), "--out", str(bundle)]) == 0
    meta = load_sidecar(bundle)
    assert meta["inputs"] == ["image", "label"] and meta["model"]["categories"] == ["tiles_a", "tiles_b"]
    # the latent knn score (cond_aae's default) compares each image with its own class's codes
    split = json.loads((run / "split.json").read_text())
    assert sorted(set(split["train_categories"])) == [0, 1]
    assert meta["scoring"]["latent"] == "knn" and meta["scoring"]["latent_bank"]["per_class"]
    assert meta["scoring"]["latent_bank"]["codes"] == len(split["train"])
    assert meta["parity"]["max_abs_diff_score"] < 0.01 * meta["normal_stats"]["std"]
    with pytest.raises(ValueError, match="pass a category"):
        Runtime(bundle)
    x = Runtime(bundle, category="tiles_a").preprocess.load_batch(sorted((root / "tiles_a" / "test" / "good").glob("*.png")))
    a = Runtime(bundle, category="tiles_a").infer(x)["score"]
    b = Runtime(bundle, category="tiles_b").infer(x)["score"]
    assert not np.allclose(a, b)  # the label reaches the graph
    assert main(["audit", str(bundle), str(root / "tiles_b" / "test"), "--out", str(tmp_path / "o"),
                 "--category", "tiles_b"]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "o" / "results.csv")))) == 8

    # calibration per category: each category's thresholds from its own normal images, used when the
    # bundle runs for it; the bundle's own (the export's) stay for the other categories
    exported = load_sidecar(bundle)["calibration"]
    assert main(["calibrate", str(bundle), "--normal", str(root / "tiles_b" / "test" / "good")]) == 2  # which category?
    assert "pass a category" in capsys.readouterr().err
    assert main(["calibrate", str(bundle), "--normal", str(root / "tiles_b" / "test" / "good"),
                 "--category", "tiles_b", "--method", "percentile", "--percentile", "50"]) == 0
    cal = load_sidecar(bundle)["calibration"]
    assert {k: v for k, v in cal.items() if k != "categories"} == exported and list(cal["categories"]) == ["tiles_b"]
    normal_b = sorted((root / "tiles_b" / "test" / "good").glob("*.png"))
    rt_b = Runtime(bundle, category="tiles_b")
    scores_b = [r.score for r in rt_b.score_paths(normal_b)]
    assert rt_b.threshold == pytest.approx(float(np.percentile(scores_b, 50, method="higher")), rel=1e-5)
    # the drift alarm's reference per category: that category's normal calibration scores
    assert cal["categories"]["tiles_b"]["reference_scores"] == pytest.approx(scores_b, rel=1e-6)
    assert len(exported["reference_scores"]) == load_sidecar(bundle)["normal_stats"]["n"]
    assert Runtime(bundle, category="tiles_a").threshold == exported["image"]["threshold"]
    # a reviewer's false alarm raises that category's threshold alone
    alarm = max(scores_b) + 1.0
    decisions = tmp_path / "decisions.json"
    decisions.write_text(json.dumps({"bundle_sha256": load_sidecar(bundle)["onnx"]["sha256"],
                                     "decisions": [{"path": "x.png", "score": alarm, "decision": "false_alarm"}]}))
    assert main(["calibrate", str(bundle), "--reviews", str(decisions), "--category", "tiles_b"]) == 0
    assert alarm < Runtime(bundle, category="tiles_b").threshold < alarm + 1e-3
    assert Runtime(bundle, category="tiles_a").threshold == exported["image"]["threshold"]
    assert main(["evaluate", str(bundle), "--data", str(root / "tiles_a"), "--category", "tiles_a"]) == 0
    assert main(["evaluate", str(bundle), "--data", str(root / "tiles_a"), "--category", "tiles_c"]) == 2
    assert "unknown category 'tiles_c'" in capsys.readouterr().err
    assert main(["audit", str(bundle), str(root / "tiles_a" / "test"), "--out", str(tmp_path / "o2")]) == 2
    assert "pass a category" in capsys.readouterr().err  # an error message, not a traceback
    assert json.loads((tmp_path / "o" / "audit.json").read_text())["category"] == "tiles_b"
    assert main(["audit", str(bundle), str(root / "tiles_b" / "test"), "--out", str(tmp_path / "o"),
                 "--category", "tiles_a"]) == 2  # resuming as another category would mix scores
    assert "as category 'tiles_b'" in capsys.readouterr().err


def test_train_defaults_have_one_definition() -> None:
    """`anomaly train`'s options, AnomalyDetector's parameters, `anomaly demo` and the presets take
    their defaults from TrainConfig's fields."""
    import inspect

    from anomaly.cli import build_parser
    from anomaly.demo import run_demo
    from anomaly.detector import AnomalyDetector
    from anomaly.training.presets import Preset
    from anomaly.training.config import TrainConfig, train_defaults

    from anomaly.training.cli import _config
    from anomaly.training.presets import PRESET_FIELDS

    d = train_defaults()
    assert d == {k: v for k, v in TrainConfig(data="x").to_dict().items() if k != "data"}
    args = vars(build_parser().parse_args(["train", "--data", "x", "--out", "y"]))
    shared = [k for k in d if k in args and k != "out"]  # --out is required
    # the options a recipe sets parse to None ("not given"), the rest to the defaults
    chosen = [k for k in shared if k in PRESET_FIELDS]
    assert all(args[k] is None for k in chosen), {k: args[k] for k in chosen}
    fixed = [k for k in shared if k not in PRESET_FIELDS]
    assert len(shared) >= 16 and all(args[k] == d[k] for k in fixed), {k: (args[k], d[k]) for k in fixed}
    # with a model option (no recipe), every field not given is the default
    cfg = _config(build_parser().parse_args(["train", "--data", "x", "--out", "y", "--model", d["model"]]), {}, None)
    assert {k: v for k, v in cfg.to_dict().items() if k not in ("data", "out")} == \
        {k: v for k, v in d.items() if k != "out"}
    params = inspect.signature(AnomalyDetector).parameters
    for k in ("model", "image_size", "channels", "epochs", "max_minutes", "batch_size", "lr", "val_fraction", "seed",
              "device", "augment"):
        assert params[k].default == d[k], k
    demo = vars(build_parser().parse_args(["demo"]))
    demo_params = inspect.signature(run_demo).parameters
    for k in ("model", "image_size", "epochs", "seed"):
        assert demo[k] == demo_params[k].default == d[k], k
    fields = {f.name: f.default for f in __import__("dataclasses").fields(Preset)}
    assert (fields["batch_size"], fields["augment"], fields["lr_decay_from"]) == (d["batch_size"], d["augment"],
                                                                               d["lr_decay_from"])
    assert inspect.signature(Preset.train_config).parameters["image_size"].default == d["image_size"]

"""Export parity (onnxruntime vs torch), the self-checking bundle, and the torch-free runtime."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploy.bundle import BundleError, load_sidecar

# fp32 graph, same preprocessed batch: observed max differences are ~1e-6 (see the sidecar's
# "parity" entry); 1e-4 leaves room for other CPUs while catching any real divergence.
PARITY_ATOL = 1e-4


def test_export_matches_torch(trained_bundle: dict) -> None:
    import torch

    from anomaly.scoring import ReconstructionScorer, Scorer
    from data.folder import discover
    from data.preprocess import Preprocess
    from deploy.export import load_run
    from deploy.runtime import Runtime

    model, ckpt, cfg = load_run(trained_bundle["run"])
    meta = load_sidecar(trained_bundle["bundle"])
    sc = meta["scoring"]
    scorer = Scorer(residual=sc["residual"], smoothing_sigma=sc["smoothing_sigma"], aggregate=sc["aggregate"],
                    topk_fraction=sc["topk_fraction"], image_size=(cfg.image_size, cfg.image_size))
    graph = ReconstructionScorer(model, scorer).eval()
    pre = Preprocess(cfg.image_size, cfg.channels)
    x = pre.load_batch([s.path for s in discover(trained_bundle["data"]).test])  # 8 images: batch axis is dynamic
    with torch.no_grad():
        ref = graph(torch.from_numpy(x))
    out = Runtime(trained_bundle["bundle"], device="cpu").infer(x)
    assert out["anomaly_map"].shape == (8, 1, 32, 32) and out["score"].shape == (8,)
    assert np.abs(out["score"] - ref.score.numpy()).max() < PARITY_ATOL
    assert np.abs(out["anomaly_map"] - ref.anomaly_map.numpy()).max() < PARITY_ATOL
    assert np.abs(out["reconstruction"] - ref.reconstruction.numpy()).max() < PARITY_ATOL
    assert meta["parity"]["max_abs_diff_score"] < PARITY_ATOL


def test_sidecar_contents(trained_bundle: dict) -> None:
    meta = load_sidecar(trained_bundle["bundle"])
    assert meta["schema_version"] == 1
    assert meta["preprocess"]["image_size"] == 32 and meta["preprocess"]["channels"] == 1
    assert meta["model"]["name"] == "aae" and meta["inputs"] == ["image"]
    assert meta["outputs"] == ["anomaly_map", "score", "reconstruction"]
    assert meta["calibration"]["image"]["threshold"] > 0
    assert meta["normal_stats"]["n"] >= 1 and len(meta["onnx"]["sha256"]) == 64
    assert "onnxruntime" in meta["versions"]


def test_modified_model_is_refused(trained_bundle: dict, tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(trained_bundle["bundle"], b)
    with open(b / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        load_sidecar(b)


def test_other_schema_version_is_refused(trained_bundle: dict, tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(trained_bundle["bundle"], b)
    meta = json.loads((b / "model.json").read_text())
    meta["schema_version"] = 99
    (b / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="schema version 99"):
        load_sidecar(b)
    with pytest.raises(BundleError, match="no such bundle"):
        load_sidecar(tmp_path / "missing")


def test_runtime_keeps_order_and_reports_bad_files(trained_bundle: dict, tmp_path: Path) -> None:
    from deploy.runtime import Runtime

    good = sorted((trained_bundle["data"] / "test" / "good").glob("*.png"))
    bad = tmp_path / "zero.png"
    bad.write_bytes(b"")
    paths = [good[0], bad, good[1]]
    res = list(Runtime(trained_bundle["bundle"]).score_paths(paths, batch_size=2))
    assert [r.path for r in res] == [str(p) for p in paths]
    assert res[1].error and "empty" in res[1].error and np.isnan(res[1].score)
    assert res[0].error is None and res[0].label in (0, 1) and res[0].original_size == (48, 48)


def test_runtime_rejects_unknown_device(trained_bundle: dict) -> None:
    from deploy.runtime import Runtime

    with pytest.raises(ValueError, match="unknown device"):
        Runtime(trained_bundle["bundle"], device="tpu")
    with pytest.raises(ValueError, match="unknown pipeline 'threads'"):
        Runtime(trained_bundle["bundle"], device="cpu", pipeline="threads")
    assert Runtime(trained_bundle["bundle"], device="cpu").pipeline == "batch"  # CPU default


def test_runtime_is_torch_free(trained_bundle: dict, tmp_path: Path) -> None:
    """The deployed side (runtime, calibrate, audit, and the CLI's audit path) never imports torch."""
    code = (
        "import sys\n"
        "from anomaly.cli import main\n"
        "import deploy.runtime, deploy.audit, deploy.calibrate, anomaly.calibration, anomaly.metrics\n"
        f"rc = main(['audit', {str(trained_bundle['bundle'])!r}, {str(trained_bundle['data'] / 'test')!r}, '--out', {str(tmp_path / 'o')!r}])\n"
        "assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('torch-free ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "torch-free ok" in proc.stdout


def test_runtime_loads_a_calibrated_bundle_without_scikit_learn(trained_bundle: dict) -> None:
    """Loading and scoring a calibrated bundle imports neither scikit-learn nor SciPy (that import
    took longer than the model load), and the labels are the training-side calibrator's."""
    code = (
        "import sys, numpy as np\n"
        "from deploy.runtime import Runtime\n"
        f"rt = Runtime({str(trained_bundle['bundle'])!r}, device='cpu')\n"
        f"rs = list(rt.score_paths(sorted(str(p) for p in __import__('pathlib').Path({str(trained_bundle['data'] / 'test')!r}).rglob('*.png'))))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy', 'torch'))\n"
        "assert not bad, bad[:5]\n"
        "assert rt.threshold is not None and all(r.error is None for r in rs) and len(rs) > 0\n"
        "print(rt.threshold, *(r.score for r in rs))\n"
        "print(*(r.label for r in rs))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.strip().splitlines()[-2:]
    threshold, *scores = map(float, first.split())
    from anomaly.calibration import ThresholdCalibrator

    cal = ThresholdCalibrator.from_dict(load_sidecar(trained_bundle["bundle"])["calibration"]["image"])
    assert threshold == cal.threshold_
    assert [int(v) for v in second.split()] == cal.predict(scores).tolist()


def test_segmenter_run_exports_learned_and_mixed_maps(tmp_path: Path) -> None:
    """A CycleGAN with a segmenter, trained briefly on synthetic defects, exports its learned map and
    the l1 + learned mix; the runtime matches torch, and the mix's standardisation is in the sidecar."""
    import torch

    from conftest import make_mvtec
    from anomaly.scoring import ReconstructionScorer, Scorer
    from data.folder import discover
    from data.preprocess import Preprocess
    from deploy.export import export_run, load_run
    from deploy.runtime import Runtime
    from training.config import TrainConfig
    from training.run import train

    data = make_mvtec(tmp_path / "tiles", n_train=16)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="cyclegan", image_size=32, epochs=1,
                      batch_size=4, synthetic_defects=0.5, val_fraction=0.25,
                      model_kwargs={"generator": "unet", "base_channels": 8, "disc_channels": 8,
                                    "segmenter": True, "segmenter_channels": 8})
    train(cfg)
    model, _, _ = load_run(tmp_path / "run")
    x = Preprocess(32, 1).load_batch([s.path for s in discover(data).test])
    for residual in ("learned", "l1_learned"):
        bundle = export_run(tmp_path / "run", tmp_path / residual, scoring={"residual": residual}, normalize=True)
        sc = load_sidecar(bundle)["scoring"]
        assert sc["residual"] == residual and sc["normalized"]
        scorer = Scorer(residual=residual, smoothing_sigma=sc["smoothing_sigma"], aggregate=sc["aggregate"],
                        topk_fraction=sc["topk_fraction"], image_size=(32, 32))
        val = Preprocess(32, 1).load_batch(json.loads((tmp_path / "run" / "split.json").read_text())["val"])
        with torch.no_grad():
            r = scorer.raw_residual(torch.from_numpy(val), model(torch.from_numpy(val)), model)
        scorer.set_normalization(r.mean(0, keepdim=True), r.std(0, keepdim=True))
        if residual == "l1_learned":
            assert sc["mix"]["parts"] == ["l1", "learned"] and min(sc["mix"]["std"]) > 0
            scorer.set_mix_statistics(torch.tensor(sc["mix"]["mean"]), torch.tensor(sc["mix"]["std"]))
        else:
            assert "mix" not in sc
        with torch.no_grad():
            ref = ReconstructionScorer(model, scorer).eval()(torch.from_numpy(x))
        out = Runtime(bundle, device="cpu").infer(x)
        scale = max(1.0, float(np.abs(ref.score.numpy()).max()))
        assert np.abs(out["score"] - ref.score.numpy()).max() < PARITY_ATOL * scale
        assert np.abs(out["anomaly_map"] - ref.anomaly_map.numpy()).max() < PARITY_ATOL * scale
    # the mix needs normal validation images to standardise its parts
    cfg0 = TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "run0"), "val_fraction": 0.0})
    train(cfg0)
    with pytest.raises(ValueError, match="validation images"):
        export_run(tmp_path / "run0", tmp_path / "b0", scoring={"residual": "l1_learned"}, normalize=False)


def test_flip_tta_bundle_averages_the_flipped_maps(trained_bundle: dict, tmp_path: Path, capsys) -> None:
    """``anomaly export --tta flips``: the bundle's map is the mean of the plain bundle's maps of the
    image and its three flips (each flipped back), its score that map's aggregate, and onnxruntime
    matches the torch graph; an unknown mode is refused."""
    import torch

    from anomaly.cli import main
    from anomaly.scoring import FlipAveraged, Scorer
    from data.folder import discover
    from data.preprocess import Preprocess
    from deploy.export import export_run, load_run
    from deploy.runtime import Runtime

    tta = tmp_path / "tta"
    assert main(["export", str(trained_bundle["run"]), "--out", str(tta), "--tta", "flips"]) == 0
    assert "its 3 flips" in capsys.readouterr().out
    meta = load_sidecar(tta)
    sc = meta["scoring"]
    assert sc["tta"] == "flips" and load_sidecar(trained_bundle["bundle"])["scoring"]["tta"] == "none"
    assert meta["parity"]["max_abs_diff_score"] < PARITY_ATOL

    x = Preprocess(32, 1).load_batch([s.path for s in discover(trained_bundle["data"]).test])
    plain, flipped = Runtime(trained_bundle["bundle"], device="cpu"), Runtime(tta, device="cpu")
    out = flipped.infer(x)
    views = [(), (-1,), (-2,), (-2, -1)]
    maps = [np.flip(plain.infer(np.ascontiguousarray(np.flip(x, d) if d else x))["anomaly_map"], d) if d
            else plain.infer(x)["anomaly_map"] for d in views]
    expected = np.mean(maps, axis=0)
    assert np.abs(out["anomaly_map"] - expected).max() < PARITY_ATOL
    model, _, cfg = load_run(trained_bundle["run"])
    scorer = Scorer(residual=sc["residual"], smoothing_sigma=sc["smoothing_sigma"], aggregate=sc["aggregate"],
                    topk_fraction=sc["topk_fraction"], image_size=(32, 32))
    assert np.abs(out["score"] - scorer.image_score(torch.from_numpy(expected)).numpy()).max() < PARITY_ATOL
    assert np.abs(out["reconstruction"] - plain.infer(x)["reconstruction"]).max() < PARITY_ATOL
    with torch.no_grad():
        ref = FlipAveraged(model, scorer).eval()(torch.from_numpy(x))
    assert np.abs(out["anomaly_map"] - ref.anomaly_map.numpy()).max() < PARITY_ATOL
    # a flipped image gets the flipped map and the same score
    out_f = flipped.infer(np.ascontiguousarray(x[..., ::-1]))
    assert np.abs(out_f["anomaly_map"][..., ::-1] - out["anomaly_map"]).max() < PARITY_ATOL
    assert np.abs(out_f["score"] - out["score"]).max() < PARITY_ATOL

    with pytest.raises(ValueError, match="unknown test-time augmentation 'rot90'"):
        export_run(trained_bundle["run"], tmp_path / "bad", tta="rot90")
    assert not (tmp_path / "bad").exists()

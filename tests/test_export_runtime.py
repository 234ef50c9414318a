"""Export parity (onnxruntime vs torch), the self-checking bundle, and the torch-free runtime."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anomaly.deploy.bundle import BundleError, load_sidecar

# fp32 graph, same preprocessed batch: observed max differences are ~1e-6 (see the sidecar's
# "parity" entry); 1e-4 leaves room for other CPUs while catching any real divergence.
PARITY_ATOL = 1e-4
# standardised scores (latent knn): tolerance as a fraction of the normal scores' std
PARITY_SIGMA = 0.01


def reference_scorer(run: Path, meta: dict):
    """The torch :class:`Scorer` of an un-normalised bundle, rebuilt independently of the export
    code: settings from the sidecar and, for a ``knn`` latent score, a bank re-encoded here from
    the run's training images (its standardisation from the sidecar)."""
    import torch

    from anomaly.scoring import Scorer
    from anomaly.data.preprocess import Preprocess
    from anomaly.deploy.export import load_run

    model, _, cfg = load_run(run)
    sc = meta["scoring"]
    assert not sc["normalized"]
    scorer = Scorer(residual=sc["residual"], smoothing_sigma=sc["smoothing_sigma"], aggregate=sc["aggregate"],
                    topk_fraction=sc["topk_fraction"], image_size=(cfg.image_size, cfg.image_size),
                    latent=sc["latent"], latent_k=sc.get("latent_k", 5))
    if sc["latent"] == "knn":
        train = json.loads((run / "split.json").read_text())["train"]
        with torch.no_grad():
            scorer.set_latent_bank(model.encode(torch.from_numpy(Preprocess(cfg.image_size, cfg.channels).load_batch(train))))
        scorer.set_score_mix(torch.tensor(sc["score_mix"]["mean"]), torch.tensor(sc["score_mix"]["std"]))
    return model, scorer


@pytest.mark.parametrize("latent", ["none", "auto"])
def test_export_matches_torch(trained_bundle: dict, tmp_path: Path, latent: str) -> None:
    """onnxruntime matches a torch graph rebuilt here, for the map's aggregate alone (the shared
    fixture's bundle) and for the default export of an AAE (``auto``: plus the latent knn distance)."""
    import torch

    from anomaly.scoring import ReconstructionScorer
    from anomaly.data.folder import discover
    from anomaly.data.preprocess import Preprocess
    from anomaly.deploy.export import export_run
    from anomaly.deploy.runtime import Runtime

    bundle = trained_bundle["bundle"] if latent == "none" else export_run(trained_bundle["run"], tmp_path / "default")
    meta = load_sidecar(bundle)
    assert meta["scoring"]["latent"] == ("none" if latent == "none" else "knn")
    model, scorer = reference_scorer(trained_bundle["run"], meta)
    graph = ReconstructionScorer(model, scorer).eval()
    pre = Preprocess(32, 1)
    x = pre.load_batch([s.path for s in discover(trained_bundle["data"]).test])  # 8 images: batch axis is dynamic
    with torch.no_grad():
        ref = graph(torch.from_numpy(x))
    out = Runtime(bundle, device="cpu").infer(x)
    assert out["anomaly_map"].shape == (8, 1, 32, 32) and out["score"].shape == (8,)
    assert np.abs(out["anomaly_map"] - ref.anomaly_map.numpy()).max() < PARITY_ATOL
    assert np.abs(out["reconstruction"] - ref.reconstruction.numpy()).max() < PARITY_ATOL
    if latent == "none":
        assert np.abs(out["score"] - ref.score.numpy()).max() < PARITY_ATOL
        assert meta["parity"]["max_abs_diff_score"] < PARITY_ATOL
        return
    # The knn score is a sum of two parts, each divided by its std over 4 validation images. This
    # 3-epoch model's normal scores and codes barely vary (std 0.003 and 5e-4), so float32 noise of
    # ~5e-6 comes out as ~2e-3 in those units. Decisions compare scores with a threshold among the
    # normal scores, so the tolerance is stated in their spread: 1 % of it.
    spread = meta["normal_stats"]["std"]
    assert np.abs(out["score"] - ref.score.numpy()).max() < PARITY_SIGMA * spread
    assert meta["parity"]["max_abs_diff_score"] < PARITY_SIGMA * spread


def test_sidecar_contents(trained_bundle: dict) -> None:
    meta = load_sidecar(trained_bundle["bundle"])
    assert meta["schema_version"] == 1
    assert meta["preprocess"]["image_size"] == 32 and meta["preprocess"]["channels"] == 1
    assert meta["model"]["name"] == "aae" and meta["inputs"] == ["image"]
    assert meta["outputs"] == ["anomaly_map", "score", "reconstruction"]
    assert meta["calibration"]["image"]["threshold"] > 0
    assert meta["normal_stats"]["n"] >= 1 and len(meta["onnx"]["sha256"]) == 64
    assert "onnxruntime" in meta["versions"]


def test_provisional_threshold_records_the_rate_it_can_keep(trained_bundle: dict, tmp_path: Path, caplog) -> None:
    """Under 100 validation images the export's 1 % threshold cannot be resolved: the threshold is
    their largest score, and the sidecar records its rate (1 / n) instead of 1 %, with no warning."""
    import logging

    from anomaly.deploy.export import export_run

    with caplog.at_level(logging.INFO):
        export_run(trained_bundle["run"], tmp_path / "b", latent="none")
    meta = load_sidecar(tmp_path / "b")
    n = meta["normal_stats"]["n"]
    image = meta["calibration"]["image"]
    assert 1 <= n < 100 and image["n_normal"] == n
    assert image["params"]["target_fpr"] == pytest.approx(1.0 / n)
    assert image["threshold"] == pytest.approx(meta["normal_stats"]["max"])
    assert meta["calibration"]["pixel"]["params"]["target_fpr"] == pytest.approx(0.001)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "too few to resolve" in m]
    assert any("provisional image threshold" in m for m in messages)


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
    from anomaly.deploy.runtime import Runtime

    good = sorted((trained_bundle["data"] / "test" / "good").glob("*.png"))
    bad = tmp_path / "zero.png"
    bad.write_bytes(b"")
    paths = [good[0], bad, good[1]]
    res = list(Runtime(trained_bundle["bundle"]).score_paths(paths, batch_size=2))
    assert [r.path for r in res] == [str(p) for p in paths]
    assert res[1].error and "empty" in res[1].error and np.isnan(res[1].score)
    assert res[0].error is None and res[0].label in (0, 1) and res[0].original_size == (48, 48)


def test_score_images_is_score_paths_for_arrays(trained_bundle: dict) -> None:
    """A batch of numpy arrays gives the typed results of the same files, in order; a bad image
    becomes an error result naming its index, and the others are scored."""
    import cv2

    from anomaly.deploy.runtime import Runtime

    rt = Runtime(trained_bundle["bundle"], device="cpu")
    files = sorted(str(p) for p in (trained_bundle["data"] / "test").rglob("*.png"))
    arrays = [cv2.imread(f, cv2.IMREAD_UNCHANGED) for f in files]
    ref = list(rt.score_paths(files))
    for images in (arrays, np.stack(arrays), (a for a in arrays)):  # list, one array, a lazy stream
        res = list(rt.score_images(images, batch_size=3, keep_reconstruction=True))
        assert [r.path for r in res] == [None] * len(files)
        assert [r.label for r in res] == [r.label for r in ref]
        assert np.allclose([r.score for r in res], [r.score for r in ref], rtol=1e-5, atol=1e-6)
        assert [r.regions for r in res] == [r.regions for r in ref] and res[0].original_size == (48, 48)
        assert res[0].reconstruction.shape == (1, 32, 32) and res[0].anomaly_map.shape == (32, 32)
    mixed = list(rt.score_images([arrays[0], np.zeros((48, 48, 2), np.uint8), np.zeros((0, 5), np.uint8), arrays[1]]))
    assert [r.error is None for r in mixed] == [True, False, False, True]
    assert mixed[1].error.startswith("image 1: expected an image of shape (H, W)") and np.isnan(mixed[1].score)
    assert mixed[2].error == "image 2: empty image of shape (0, 5)"
    assert mixed[3].score == pytest.approx(ref[1].score, rel=1e-5)
    with pytest.raises(ValueError, match=r"\(N, H, W\).*score_image"):
        list(rt.score_images(arrays[0]))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        list(rt.score_images(arrays, batch_size=0))


def test_results_carry_regions(trained_bundle: dict, tmp_path: Path) -> None:
    """Every result carries its defect regions: those of find_regions with the bundle's pixel
    threshold at the original size; None without a pixel threshold or for an unreadable file."""
    from anomaly.data.io import read_image
    from anomaly.deploy.regions import find_regions
    from anomaly.deploy.runtime import Runtime

    paths = sorted((trained_bundle["data"] / "test").rglob("*.png"))
    rt = Runtime(trained_bundle["bundle"], device="cpu")
    assert rt.pixel_threshold is not None
    res = list(rt.score_paths(paths, batch_size=3))
    for r in res:
        expected = find_regions(r.anomaly_map, rt.pixel_threshold, original_size=r.original_size, min_area=16)[1]
        assert r.regions == expected
    assert sum(bool(r.regions) for r in res) >= 2 and any(r.regions == [] for r in res)
    one = rt.score_image(read_image(paths[-1], raw=True))
    assert one.regions == res[-1].regions
    # min_area is the runtime's: nothing survives an area larger than the image
    assert all(r.regions == [] for r in Runtime(trained_bundle["bundle"], device="cpu", min_area=48 * 48 + 1)
               .score_paths(paths))
    with pytest.raises(ValueError, match="min_area"):
        Runtime(trained_bundle["bundle"], device="cpu", min_area=-1)
    # a broken map is that image's problem (no regions), not an exception that stops a whole run
    for bad_value in (np.nan, np.inf):
        broken = np.zeros((32, 32), np.float32)
        broken[3, 4] = bad_value
        assert rt.regions(broken, (48, 48)) is None
    assert rt.regions(np.zeros((32, 32), np.float32), (48, 48)) == []

    plain = tmp_path / "no_pixel_threshold"
    shutil.copytree(trained_bundle["bundle"], plain)
    meta = json.loads((plain / "model.json").read_text())
    meta["calibration"].pop("pixel")
    (plain / "model.json").write_text(json.dumps(meta))
    bad = tmp_path / "zero.png"
    bad.write_bytes(b"")
    got = list(Runtime(plain, device="cpu").score_paths([paths[-1], bad]))
    assert got[0].error is None and got[0].regions is None
    assert got[1].error and got[1].regions is None


def test_keep_image_whole_or_shrunk(trained_bundle: dict, tmp_path: Path) -> None:
    """keep_image=True hands back the decoded original; a number, a copy no larger than that
    (aspect and pixel type kept) with the same scores; anything else is refused."""
    import cv2

    from anomaly.data.io import read_image
    from anomaly.deploy.runtime import Runtime

    src = sorted((trained_bundle["data"] / "test").rglob("*.png"))[0]
    big = tmp_path / "big.png"
    img16 = (cv2.resize(cv2.imread(str(src), cv2.IMREAD_GRAYSCALE), (200, 120)).astype(np.uint16) * 257)
    cv2.imwrite(str(big), img16)
    rt = Runtime(trained_bundle["bundle"], device="cpu")
    (whole,) = rt.score_paths([big], keep_image=True)
    (small,) = rt.score_paths([big], keep_image=50)
    (none,) = rt.score_paths([big])
    assert np.array_equal(whole.image, read_image(big, raw=True)) and whole.image.dtype == np.uint16
    assert small.image.shape == (30, 50) and small.image.dtype == np.uint16 and none.image is None
    assert small.score == whole.score == none.score and small.original_size == (120, 200)
    (fits,) = rt.score_paths([big], keep_image=500)
    assert np.array_equal(fits.image, whole.image)
    for bad in (0, -5, 2.5, "256"):
        with pytest.raises(ValueError, match="keep_image"):
            list(rt.score_paths([big], keep_image=bad))


def test_runtime_rejects_unknown_device(trained_bundle: dict) -> None:
    from anomaly.deploy.runtime import Runtime

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
        "import anomaly.deploy.runtime, anomaly.deploy.audit, anomaly.deploy.calibrate, anomaly.calibration, anomaly.metrics\n"
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
        "from anomaly.deploy.runtime import Runtime\n"
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
    from anomaly.data.folder import discover
    from anomaly.data.preprocess import Preprocess
    from anomaly.deploy.export import export_run, load_run
    from anomaly.deploy.runtime import Runtime
    from anomaly.training.config import TrainConfig
    from anomaly.training.run import train

    data = make_mvtec(tmp_path / "tiles", n_train=16)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="cyclegan", image_size=32, epochs=1,
                      batch_size=4, synthetic_defects=0.5, val_fraction=0.25,
                      model_kwargs={"generator": "unet", "base_channels": 8, "disc_channels": 8,
                                    "segmenter": True, "segmenter_channels": 8})
    train(cfg)
    model, _, _ = load_run(tmp_path / "run")
    x = Preprocess(32, 1).load_batch([s.path for s in discover(data).test])
    # a repair generator has no code: no latent score by default, and a clear error when asked for one
    with pytest.raises(ValueError, match="needs a model with an encoder and a decoder"):
        export_run(tmp_path / "run", tmp_path / "knn", latent="knn")
    assert not (tmp_path / "knn").exists()
    for residual in ("learned", "l1_learned"):
        bundle = export_run(tmp_path / "run", tmp_path / residual, scoring={"residual": residual}, normalize=True)
        sc = load_sidecar(bundle)["scoring"]
        assert sc["residual"] == residual and sc["normalized"] and sc["latent"] == "none"
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
    from anomaly.data.folder import discover
    from anomaly.data.preprocess import Preprocess
    from anomaly.deploy.export import export_run, load_run
    from anomaly.deploy.runtime import Runtime

    tta = tmp_path / "tta"
    # the map's aggregate alone (--latent none), so that the score below is the averaged map's
    assert main(["export", str(trained_bundle["run"]), "--out", str(tta), "--tta", "flips", "--latent", "none"]) == 0
    assert "its 3 flips" in capsys.readouterr().out
    meta = load_sidecar(tta)
    sc = meta["scoring"]
    assert sc["tta"] == "flips" and sc["latent"] == "none" and load_sidecar(trained_bundle["bundle"])["scoring"]["tta"] == "none"
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


def test_latent_knn_is_the_aae_default_and_can_be_chosen(trained_bundle: dict, tmp_path: Path, capsys) -> None:
    """An AAE's bundle adds the latent knn distance by default (`--latent auto`); `--latent none`
    keeps the map's aggregate alone with the same maps; knn that cannot work is refused before any
    folder is written, and `auto` then falls back to the map alone."""
    from anomaly.cli import main
    from anomaly.data.folder import discover
    from anomaly.data.preprocess import Preprocess
    from anomaly.deploy.export import export_run
    from anomaly.deploy.runtime import Runtime

    run = trained_bundle["run"]
    split = json.loads((run / "split.json").read_text())
    default = export_run(run, tmp_path / "default")
    sc = load_sidecar(default)["scoring"]
    assert sc["latent"] == "knn" and sc["latent_k"] == 5
    assert sc["latent_bank"] == {"codes": len(split["train"]), "dim": 16, "per_class": False}
    assert sc["score_mix"]["parts"] == ["map", "latent"] and min(sc["score_mix"]["std"]) > 0

    plain = tmp_path / "plain"
    assert main(["export", str(run), "--out", str(plain), "--latent", "none"]) == 0
    assert "nearest of" not in capsys.readouterr().out
    assert load_sidecar(plain)["scoring"]["latent"] == "none"
    assert main(["export", str(run), "--out", str(tmp_path / "knn"), "--latent", "knn"]) == 0
    printed = capsys.readouterr().out
    assert f"5 nearest of {len(split['train'])} normal training codes" in printed
    # the parity line says how large the float differences are in the units decisions are made in
    meta = load_sidecar(tmp_path / "knn")
    share = 100 * meta["parity"]["max_abs_diff_score"] / meta["normal_stats"]["std"]
    assert f"({share:.2g} % of the normal scores' spread)" in printed and "% of the pixel threshold)" in printed
    x = Preprocess(32, 1).load_batch([s.path for s in discover(trained_bundle["data"]).test])
    a, b = Runtime(default, device="cpu").infer(x), Runtime(plain, device="cpu").infer(x)
    assert np.abs(a["anomaly_map"] - b["anomaly_map"]).max() < PARITY_ATOL
    assert not np.allclose(a["score"], b["score"])

    with pytest.raises(ValueError, match="unknown latent score 'pca'"):
        export_run(run, tmp_path / "bad", latent="pca")
    no_val = tmp_path / "run_no_val"
    shutil.copytree(run, no_val)
    (no_val / "split.json").write_text(json.dumps({**split, "val": [], "val_categories": []}))
    with pytest.raises(ValueError, match="at least 2 normal validation images"):
        export_run(no_val, tmp_path / "bad", latent="knn")
    assert not (tmp_path / "bad").exists()
    assert load_sidecar(export_run(no_val, tmp_path / "auto"))["scoring"]["latent"] == "none"

    # auto stops at 64x64: a 128x128 AAE's codes measured nearly uninformative (ELPV poly 0.773 -> 0.725)
    from anomaly.deploy.export import LATENT_AUTO_MAX_SIZE, _resolve_latent, load_run

    model = load_run(run)[0]
    assert LATENT_AUTO_MAX_SIZE == 64
    assert [_resolve_latent("auto", "aae", model, split, False, 5, size) for size in (32, 64, 128)] == ["knn", "knn", "none"]
    assert _resolve_latent("knn", "aae", model, split, False, 5, 128) == "knn"  # asked for: given
    assert _resolve_latent("auto", "ae", model, split, False, 5, 64) == "none"


@pytest.mark.parametrize("path, value, message", [
    (("calibration", "image", "threshold"), float("nan"), r"calibration\.image\.threshold must be a finite number"),
    (("calibration", "image", "threshold"), float("inf"), r"calibration\.image\.threshold must be a finite number"),
    (("calibration", "image", "threshold"), -0.5, r"threshold must be >= 0 \(this bundle's scores cannot be negative\)"),
    (("calibration", "pixel", "threshold"), "0.3", r"calibration\.pixel\.threshold must be a finite number"),
    (("calibration", "reference_scores"), [0.1, None], r"reference_scores\[1\] must be a finite number"),
    (("preprocess", "image_size"), 0, r"preprocess\.image_size must be in \[8, 8192\], found 0"),
    (("preprocess", "image_size"), 1 << 20, r"preprocess\.image_size must be in \[8, 8192\]"),
    (("preprocess", "image_size"), "32", r"preprocess\.image_size must be an integer"),
    (("preprocess", "channels"), 2, r"preprocess\.channels must be 1 or 3, found 2"),
    (("schema_version",), "1", r"schema version '1'"),
    (("inputs",), "image", r"inputs must be \['image'\] or \['image', 'label'\]"),
])
def test_sidecar_fields_out_of_range_are_refused(trained_bundle: dict, tmp_path: Path, path: tuple, value,
                                                 message: str) -> None:
    b = tmp_path / "b"
    shutil.copytree(trained_bundle["bundle"], b)
    meta = json.loads((b / "model.json").read_text())
    node = meta
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (b / "model.json").write_text(json.dumps(meta))  # NaN / Infinity as Python's json writes them
    with pytest.raises(BundleError, match=message):
        load_sidecar(b)


def test_a_size_the_graph_cannot_take_is_refused(trained_bundle: dict, tmp_path: Path) -> None:
    from anomaly.deploy.runtime import Runtime

    b = tmp_path / "b"
    shutil.copytree(trained_bundle["bundle"], b)
    meta = json.loads((b / "model.json").read_text())
    meta["preprocess"]["image_size"] = 64  # in range, but the graph takes 32 x 32
    (b / "model.json").write_text(json.dumps(meta))
    load_sidecar(b)
    with pytest.raises(BundleError, match=r"the graph takes images of shape \[.*, 1, 32, 32\].*\(N, 1, 64, 64\)"):
        Runtime(b, device="cpu")


def test_sidecar_records_training_hashes_and_the_validation_scores(trained_bundle: dict) -> None:
    from anomaly.data.preprocess import Preprocess
    from anomaly.deploy.bundle import MAX_REFERENCE_SCORES, reference_scores, sha256_file
    from anomaly.deploy.runtime import Runtime

    meta = load_sidecar(trained_bundle["bundle"])
    split = json.loads((trained_bundle["run"] / "split.json").read_text())
    assert meta["training_split"]["train"] == sorted(sha256_file(p) for p in split["train"])
    assert meta["training_split"]["n_train"] == len(split["train"]) == 20
    ref = meta["calibration"]["reference_scores"]
    scores = Runtime(trained_bundle["bundle"], device="cpu").infer(Preprocess(32, 1).load_batch(split["val"]))["score"]
    assert ref == pytest.approx(scores.tolist(), rel=1e-6) and len(ref) == meta["normal_stats"]["n"]
    many = reference_scores(np.arange(12_000.0))  # capped: a fixed subsample, the same every time
    assert len(many) == MAX_REFERENCE_SCORES and many == reference_scores(np.arange(12_000.0))
    assert len(set(many)) == MAX_REFERENCE_SCORES and many == sorted(many)


def test_export_statistics_run_batch_by_batch(monkeypatch) -> None:
    """The validation passes never feed the model more than ``EXPORT_BATCH`` images, and the
    per-pixel normalisation and score mixing equal their one-batch values."""
    import torch

    from anomaly.deploy import export
    from anomaly.registry import create_model
    from anomaly.scoring import Scorer, encode_decode

    torch.manual_seed(0)
    model = create_model("aae", in_channels=1, image_size=32, latent_dim=8, base_channels=8).eval()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    model.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    val = np.random.default_rng(0).random((10, 1, 32, 32), dtype=np.float32)
    monkeypatch.setattr(export, "EXPORT_BATCH", 3)
    scorer = Scorer(residual="l1", image_size=(32, 32), latent="knn")
    export._normalization(model, scorer, val, None)
    assert seen and max(seen) == 3
    with torch.no_grad():
        x = torch.from_numpy(val)
        r = scorer.raw_residual(x, model(x), model)
        torch.testing.assert_close(scorer.pixel_std, r.std(0, keepdim=True).clamp_min(1e-3), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(scorer.pixel_mean, r.mean(0, keepdim=True), rtol=1e-4, atol=1e-6)
        scorer.set_latent_bank(model.encode(x))
        seen.clear()
        export._score_mix(model, scorer, val, None)
        assert seen and max(seen) == 3
        z, x_hat = encode_decode(model, x, None)
        parts = torch.stack([scorer.image_score(scorer.anomaly_map(x, x_hat, model)), scorer.latent_distance(z)])
        torch.testing.assert_close(scorer.score_mean, parts.mean(1), rtol=1e-4, atol=1e-6)

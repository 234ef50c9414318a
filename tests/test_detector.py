"""The training-side AnomalyDetector: scikit-learn conventions, the same scores and labels as the
deployed runtime on the same files, and clear errors for bad input."""
from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from anomaly.detector import AnomalyDetector
from test_export_runtime import PARITY_ATOL

TINY = {"image_size": 32, "batch_size": 8, "model_kwargs": {"latent_dim": 16, "base_channels": 8}}


def _files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.png"))


def test_detector_and_runtime_agree_on_the_same_image_files(trained_bundle: dict, tmp_path: Path) -> None:
    """The issue's end-to-end check: image files through the torch detector and through the
    exported bundle's onnxruntime give the same scores (fp32 tolerance), maps and labels."""
    from anomaly.deploy.bundle import load_sidecar
    from anomaly.deploy.runtime import Runtime

    det = AnomalyDetector.from_run(trained_bundle["run"], latent="none")
    assert det.get_params()["image_size"] == 32 and det.calibration_source_ == {"kind": "validation", "images": 4}
    files = _files(trained_bundle["data"] / "test")
    scores, maps, labels = det.decision_function(files), det.anomaly_map(files), det.predict(files)
    assert scores.shape == (8,) and scores.dtype == np.float64 and maps.shape == (8, 32, 32)

    bundle = det.save(tmp_path / "bundle")
    meta = load_sidecar(bundle)
    assert meta["calibration"]["image"]["threshold"] == det.threshold_
    assert meta["calibration"]["source"] == {"kind": "validation", "images": 4}
    rt = Runtime(bundle, device="cpu")
    results = list(rt.score_paths(files))
    assert [r.error for r in results] == [None] * 8
    assert np.abs(np.array([r.score for r in results]) - scores).max() < PARITY_ATOL
    assert np.abs(np.stack([r.anomaly_map for r in results]) - maps).max() < PARITY_ATOL
    # labels can only disagree for a score within float noise of the threshold: none is here, and
    # both labels occur, so the comparison decides something
    assert np.abs(scores - det.threshold_).min() > PARITY_ATOL
    assert set(labels.tolist()) == {0, 1}
    assert [r.label for r in results] == labels.tolist()


def test_images_as_folder_files_arrays_and_one_array_score_alike(trained_bundle: dict) -> None:
    det = AnomalyDetector.from_run(trained_bundle["run"], latent="none")
    folder = trained_bundle["data"] / "test"
    files = _files(folder)
    arrays = [cv2.imread(f, cv2.IMREAD_UNCHANGED) for f in files]
    ref = det.decision_function(files)
    assert np.array_equal(det.decision_function(folder), ref)
    assert np.array_equal(det.decision_function(arrays, batch_size=3), ref)  # batching does not matter
    assert np.array_equal(det.decision_function(np.stack(arrays)), ref)
    assert np.array_equal(det.decision_function([a.astype(np.float32) / 255.0 for a in arrays]), ref)
    assert np.array_equal(pickle.loads(pickle.dumps(det)).decision_function(files), ref)  # as estimators are kept


def test_fit_on_arrays_equals_fit_on_the_same_files(trained_bundle: dict, tmp_path: Path) -> None:
    """Arrays are written losslessly for training, in order, so the same seed trains the same model."""
    files = _files(trained_bundle["data"] / "train")
    arrays = np.stack([cv2.imread(f, cv2.IMREAD_UNCHANGED) for f in files])
    test = _files(trained_bundle["data"] / "test")
    a = AnomalyDetector(epochs=1, work_dir=tmp_path / "a", **TINY)
    assert a.fit(files, y=np.zeros(len(files))) is a
    b = clone(a).set_params(work_dir=tmp_path / "b").fit(arrays)
    assert len(list((tmp_path / "b" / "data").glob("*.png"))) == len(files)
    assert (tmp_path / "a" / "data" / "0000000.png").is_symlink()
    assert a.threshold_ is not None and a.predict(test).shape == (8,)
    assert np.array_equal(a.decision_function(test), b.decision_function(test))
    # a refit in the same folder starts over (the loss log holds one run's epochs)
    assert a.fit(files[:12]) is a and len((tmp_path / "a" / "run" / "losses.csv").read_text().splitlines()) == 2
    assert len(list((tmp_path / "a" / "data").iterdir())) == 12


def test_fit_on_a_category_folder_with_a_budget(trained_bundle: dict, tmp_path: Path) -> None:
    events: list[dict] = []
    det = AnomalyDetector(epochs=2, max_minutes=5, work_dir=tmp_path, **TINY).fit(trained_bundle["data"],
                                                                               progress=events.append)
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    assert det.run_dir_ == tmp_path / "run" and (tmp_path / "run" / "checkpoints" / "best.pt").exists()
    assert not (tmp_path / "data").exists()  # a folder is trained on where it is
    scores = det.decision_function(trained_bundle["data"] / "test")
    assert np.isfinite(scores).all()
    # calibrate() moves the threshold to held-out normals
    det.calibrate(trained_bundle["data"] / "test" / "good")
    assert det.calibration_source_ == {"kind": "normal images", "images": 4, "n_normal": 4, "n_defects": 0}
    assert det.threshold_ == pytest.approx(det.decision_function(trained_bundle["data"] / "test" / "good").max())
    with pytest.raises(ValueError, match="needs a probability model"):
        det.predict_proba(trained_bundle["data"] / "test")


def test_calibrate_with_labelled_defects_gives_f1_threshold_and_probabilities(trained_bundle: dict, tmp_path: Path) -> None:
    """Labelled held-out images: F1-max threshold and a probability model, as `anomaly calibrate
    --defects --probability` fits them, carried into the saved bundle."""
    from anomaly.calibration import ThresholdCalibrator
    from anomaly.deploy.runtime import Runtime

    det = AnomalyDetector.from_run(trained_bundle["run"], latent="none")
    files = _files(trained_bundle["data"] / "test")
    y = np.array([0 if "/good/" in f else 1 for f in files])
    scores = det.decision_function(files)
    det.calibrate(files, y, probability="isotonic")
    ref = ThresholdCalibrator(method="f1", probability="isotonic").fit(scores, y)
    assert det.calibrator_.method_ == "f1" and det.threshold_ == ref.threshold_
    assert det.calibration_source_ == {"kind": "labelled images", "images": 8, "n_normal": 4, "n_defects": 4}
    p = det.predict_proba(files)
    assert p.shape == (8,) and np.array_equal(p, ref.predict_proba(scores))
    assert p[y == 1].mean() > p[y == 0].mean()
    rt = Runtime(det.save(tmp_path / "bundle"), device="cpu")
    assert rt.threshold == det.threshold_
    # the isotonic curve climbs ~6 per unit of score between these knots, so fp32 score noise of
    # ~5e-6 moves a probability by ~3e-5
    assert np.allclose([r.probability for r in rt.score_paths(files)], p, atol=1e-3)
    with pytest.raises(ValueError, match="one 0/1 label per image \\(8\\)"):
        det.calibrate(files, [0, 1])
    with pytest.raises(ValueError, match="one 0/1 label per image"):
        det.calibrate(files, y * 2)


def test_bad_input_gives_the_stated_errors(trained_bundle: dict, tmp_path: Path) -> None:
    fresh = AnomalyDetector(**TINY)
    for call in (lambda: fresh.decision_function([np.zeros((8, 8))]), lambda: fresh.predict([np.zeros((8, 8))]),
                 lambda: fresh.save(tmp_path / "b"), lambda: fresh.calibrate([np.zeros((8, 8))])):
        with pytest.raises(NotFittedError, match="not fitted"):
            call()
    with pytest.raises(ValueError, match="normal images only.*2 as defective"):
        fresh.fit(_files(trained_bundle["data"] / "train")[:4], y=[0, 1, 0, 1])
    with pytest.raises(ValueError, match="float image must hold values in \\[0, 1\\]"):
        AnomalyDetector(work_dir=tmp_path / "w", **TINY).fit(np.full((3, 8, 8), 2.0, np.float32))
    det = AnomalyDetector.from_run(trained_bundle["run"], latent="none")
    with pytest.raises(ValueError, match="empty"):
        det.decision_function([])
    with pytest.raises(ValueError, match=r"\(N, H, W\).*pass one image as \[image\]"):
        det.decision_function(np.zeros((32, 32)))
    with pytest.raises(TypeError, match="sequence of files"):
        det.decision_function([np.zeros((32, 32)), "a.png"])
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        det.decision_function(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"image 1: expected an image of shape \(H, W\)"):
        det.decision_function([np.zeros((32, 32)), np.zeros((32, 32, 2))])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        det.decision_function([np.zeros((32, 32))], batch_size=0)


def test_conditional_detector_needs_and_uses_labels(tmp_path: Path) -> None:
    from conftest import make_mvtec

    root = tmp_path / "products"
    make_mvtec(root / "tiles_a", n_train=8, seed=1)
    make_mvtec(root / "tiles_b", n_train=8, seed=2)
    det = AnomalyDetector(model="cond_aae", epochs=1, work_dir=tmp_path / "w",
                          **{**TINY, "batch_size": 4, "model_kwargs": {"latent_dim": 8, "base_channels": 8}}).fit(root)
    assert det.categories_ == ["tiles_a", "tiles_b"]
    images = _files(root / "tiles_a" / "test" / "good")
    with pytest.raises(ValueError, match="conditional: pass labels="):
        det.decision_function(images)
    with pytest.raises(ValueError, match="unknown category 'tiles_c'"):
        det.decision_function(images, labels="tiles_c")
    with pytest.raises(ValueError, match="one per image \\(4\\), got 3"):
        det.decision_function(images, labels=[0, 1, 0])
    a = det.decision_function(images, labels="tiles_a")
    assert np.array_equal(a, det.decision_function(images, labels=[0, 0, 0, 0]))
    assert not np.allclose(a, det.decision_function(images, labels=1))  # the label reaches the graph


def test_a_temporary_work_folder_is_removed_at_refit_and_with_the_detector(trained_bundle: dict) -> None:
    """``work_dir=None``: the run and the copies of the training images live in a temporary folder
    that the next fit, or the detector's end, removes."""
    import gc

    files = _files(trained_bundle["data"] / "train")[:8]
    det = AnomalyDetector(epochs=1, val_fraction=0.25, **TINY).fit(files)
    first = det.run_dir_.parent
    assert (first / "data").is_dir() and first.name.startswith("anomaly-detector-")
    copy = pickle.loads(pickle.dumps(det))  # a copy does not own the folder
    del copy
    gc.collect()
    assert first.is_dir()
    det.fit(files)
    second = det.run_dir_.parent
    assert not first.exists() and second.is_dir()
    del det
    gc.collect()
    assert not second.exists()

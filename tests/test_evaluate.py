"""`anomaly evaluate`: metrics of a bundle on a labelled MVTec-style test set, and split discipline."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from anomaly.cli import main
from anomaly.deploy.evaluate import EvaluationError, evaluate_bundle


def test_evaluate_reports_standard_metrics(trained_bundle: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ev.json"
    assert main(["evaluate", str(trained_bundle["bundle"]), "--data", str(trained_bundle["data"]), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 8 and res["n_defective"] == 4
    for v in (res["image"]["auroc"], res["image"]["ap"], res["pixel"]["pixel_auroc"], res["pixel"]["aupro"]):
        assert 0.0 <= v <= 1.0
    c = res["confusion"]
    assert c["tp"] + c["fp"] + c["tn"] + c["fn"] == 8
    # the generated blobs are saturated white discs on a mid-grey texture: even a 3-epoch model
    # must localize them far better than chance
    assert res["pixel"]["pixel_auroc"] > 0.8
    printed = capsys.readouterr().out
    assert "image  AUROC" in printed and "AUPRO@30%" in printed


def test_evaluate_refuses_calibration_images(trained_bundle: dict, tmp_path: Path) -> None:
    from anomaly.deploy.calibrate import calibrate_bundle

    bundle = tmp_path / "b"
    shutil.copytree(trained_bundle["bundle"], bundle)
    calibrate_bundle(bundle, trained_bundle["data"] / "test" / "good")
    with pytest.raises(EvaluationError, match="used to calibrate this bundle"):
        evaluate_bundle(bundle, trained_bundle["data"])


def test_evaluate_needs_both_classes(trained_bundle: dict, tmp_path: Path) -> None:
    data = tmp_path / "one_class"
    shutil.copytree(trained_bundle["data"] / "train", data / "train")
    shutil.copytree(trained_bundle["data"] / "test" / "good", data / "test" / "good")
    with pytest.raises(EvaluationError, match="both normal and defective"):
        evaluate_bundle(trained_bundle["bundle"], data)


def _line_pc_bundle(trained_bundle: dict, dst: Path) -> Path:
    """A copy of the bundle as a line PC holds it: the run folder it names does not exist there."""
    shutil.copytree(trained_bundle["bundle"], dst)
    meta = json.loads((dst / "model.json").read_text())
    meta["model"]["run"] = str(dst.parent / "no-such-run")
    (dst / "model.json").write_text(json.dumps(meta))
    return dst


def test_training_images_are_refused_by_content_without_the_run_folder(trained_bundle: dict, tmp_path: Path) -> None:
    """calibrate and evaluate recognise a training image by its sha256 in the sidecar: renamed,
    copied elsewhere, with the run folder gone."""
    from anomaly.deploy.calibrate import CalibrationError, calibrate_bundle

    bundle = _line_pc_bundle(trained_bundle, tmp_path / "bundle")
    trained = json.loads((trained_bundle["run"] / "split.json").read_text())["train"]
    normal = tmp_path / "normal"
    shutil.copytree(trained_bundle["data"] / "test" / "good", normal)
    shutil.copy(trained[3], normal / "renamed_cell.png")
    with pytest.raises(CalibrationError, match=r"1 calibration image\(s\) were used to train this model .*renamed_cell\.png"):
        calibrate_bundle(bundle, normal)
    data = tmp_path / "cat"
    shutil.copytree(trained_bundle["data"], data)
    shutil.copy(trained[0], data / "test" / "good" / "copy_a.png")
    shutil.copy(trained[1], data / "test" / "blob" / "copy_b.png")
    with pytest.raises(EvaluationError, match=r"2 test image\(s\) were used to train this model .*copy_b\.png.*copy_a\.png"):
        evaluate_bundle(bundle, data)


def test_calibrate_stores_the_normal_scores_as_the_drift_reference(trained_bundle: dict, tmp_path: Path) -> None:
    from anomaly.deploy.bundle import load_sidecar
    from anomaly.deploy.calibrate import calibrate_bundle
    from anomaly.deploy.runtime import Runtime

    bundle = _line_pc_bundle(trained_bundle, tmp_path / "bundle")
    good, blob = trained_bundle["data"] / "test" / "good", trained_bundle["data"] / "test" / "blob"
    calibrate_bundle(bundle, good, defects=blob, method="f1")
    ref = load_sidecar(bundle)["calibration"]["reference_scores"]
    normal_scores = [r.score for r in Runtime(bundle, device="cpu").score_paths(sorted(good.glob("*.png")))]
    assert ref == pytest.approx(normal_scores, rel=1e-6) and len(ref) == 4  # the defects' scores are not in it

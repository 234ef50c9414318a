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
    with pytest.raises(EvaluationError, match="used to train or calibrate"):
        evaluate_bundle(bundle, trained_bundle["data"])


def test_evaluate_needs_both_classes(trained_bundle: dict, tmp_path: Path) -> None:
    data = tmp_path / "one_class"
    shutil.copytree(trained_bundle["data"] / "train", data / "train")
    shutil.copytree(trained_bundle["data"] / "test" / "good", data / "test" / "good")
    with pytest.raises(EvaluationError, match="both normal and defective"):
        evaluate_bundle(trained_bundle["bundle"], data)

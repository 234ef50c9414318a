"""``benchmarks/quality.py``'s per-defect-kind breakdown: each kind is scored against the normal images only."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from anomaly.metrics import aupro, image_metrics, pixel_metrics


def _quality():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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

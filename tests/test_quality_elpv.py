"""End-to-end quality gate on real data: train briefly on ELPV mono cells, export, score with ONNX.

This is the CI-sized version of ``benchmarks/quality.py``: the default reconstructor (``aae``,
``anomaly train`` defaults except the budget) is trained on a deterministic subset of the
functional cells of ``prepare_elpv(..., "mono", seed=0)/train/good`` at 64x64, exported with
:func:`anomaly.deploy.export.export_run`, and a held-out, class-balanced subset of ``test/good`` and
``test/defective`` is scored through :class:`anomaly.deploy.runtime.Runtime` (the deployed path).

Settings: seed 0, N_TRAIN training images, EPOCHS epochs, N_TEST images per test class.
Measured on 2 heavily shared CPU cores, 1 torch thread, seed 0: image AUROC 0.745 (60 good vs 60
defective test cells; 20 CPU s for train + export + scoring). The bar ``AUROC_BAR`` = 0.70 sits
clearly above chance (0.5) and 0.045 below the measurement. (Per-pixel normalisation at export
raises the trained score, but also lifts an *untrained* model to ~0.74-0.79, so this gate uses the
default, un-normalised scoring, where training is what makes the difference.)

Negative control (``test_untrained_model_fails_bar``): the identical pipeline with the learning
rate set to 0 (weights stay at their random initialisation; only BatchNorm statistics adapt)
must score below the bar, which shows the bar discriminates a working model from a broken one.
Measured: image AUROC 0.665 (15 CPU s). ``TrainConfig.lr`` overrides every step's learning rate,
and 0 is honoured (the weights keep their initialisation).

The AAE's default bundle adds the latent knn distance to the score (``anomaly.deploy.export``,
``latent="auto"``); both bundles are exported from the same run. Measured, seed 0: trained 0.786
with knn against 0.745 without; the test asserts the bar and that knn beats the map alone. At this
budget knn does *not* separate trained from untrained weights (the lr=0 model reaches 0.773 with
it: the distance between random convolutional codes already says something), so the negative
control stays on the map alone. At full budget training matters: ELPV poly 0.831 trained against
0.721-0.755 untrained (``benchmarks/results/2026-11-22-quality-latent-knn.md``).

Runtime: both tests together took 40 CPU s (user + sys, 1 thread) — about 45-60 s wall on an idle
2-core machine; 316 s wall here under a load average of ~10.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import torch  # the [train] and [dev] extras (installed by `make test`) provide torch and elpv-dataset

SEED = 0
N_TRAIN = 200
N_TEST = 60
EPOCHS = 10
IMAGE_SIZE = 64
AUROC_BAR = 0.70
MODEL = "aae"
NORMALIZE = False
MEASURED = {"trained": 0.745, "untrained (lr=0)": 0.665,  # seed 0, see the module docstring
            "trained, latent knn": 0.786, "untrained (lr=0), latent knn": 0.773}


def _run_pipeline(tmp: Path, lr: float, model: str = MODEL, normalize: bool = NORMALIZE) -> dict[str, float]:
    """Image AUROC of the trained run's bundles, by latent score (``none``, ``knn``)."""
    from anomaly.metrics import image_metrics
    from anomaly.data.elpv import prepare_elpv
    from anomaly.data.folder import discover
    from anomaly.deploy.export import export_run
    from anomaly.deploy.runtime import Runtime
    from anomaly.training.config import TrainConfig
    from anomaly.training.run import train

    torch.set_num_threads(1)
    root = prepare_elpv(tmp / "elpv", "mono", seed=SEED)
    rng = np.random.default_rng(SEED)
    files = sorted((root / "train" / "good").iterdir())
    data = tmp / "subset"
    (data / "train" / "good").mkdir(parents=True)
    for i in sorted(rng.permutation(len(files))[:N_TRAIN]):
        shutil.copyfile(files[i], data / "train" / "good" / files[i].name)

    cfg = TrainConfig(data=str(data), out=str(tmp / "run"), model=model, image_size=IMAGE_SIZE, epochs=EPOCHS,
                      seed=SEED, device="cpu", lr=lr)
    train(cfg)
    test = discover(root).test
    picked = []
    for label in (0, 1):
        items = [s for s in test if s.label == label]
        picked += [items[i] for i in sorted(rng.permutation(len(items))[:N_TEST])]
    labels = np.array([s.label for s in picked])
    out = {}
    for latent in ("none", "knn"):
        bundle = export_run(tmp / "run", tmp / f"bundle_{latent}", normalize=normalize, latent=latent)
        results = list(Runtime(bundle, device="cpu", threads=1).score_paths([str(s.path) for s in picked]))
        assert not any(r.error for r in results)
        out[latent] = image_metrics(labels, np.array([r.score for r in results]))["auroc"]
    return out


@pytest.mark.slow
def test_trained_aae_separates_defective_elpv_cells(tmp_path):
    auroc = _run_pipeline(tmp_path, lr=2e-4)
    assert auroc["none"] >= AUROC_BAR, \
        f"image AUROC {auroc['none']:.3f} below the bar {AUROC_BAR} (measured {MEASURED['trained']})"
    # the AAE's default bundle adds the latent knn distance: it must clear the bar and beat the map alone
    assert auroc["knn"] >= AUROC_BAR and auroc["knn"] > auroc["none"], (auroc, MEASURED)


@pytest.mark.slow
def test_untrained_model_fails_bar(tmp_path):
    auroc = _run_pipeline(tmp_path, lr=0.0)["none"]
    assert auroc < AUROC_BAR, f"untrained model reached {auroc:.3f} >= bar {AUROC_BAR}: the bar does not discriminate"

"""The benchmark's and the product's presets (``anomaly.training.presets``) must build what they name.

A preset is only trained inside ``benchmarks/quality.py``, tens of minutes into a run; a typo in a
model keyword or a scoring that its model cannot produce would surface only there. These tests
build every preset's config, model and export scorers at a small size instead.
"""
from __future__ import annotations

import pytest
import torch

from anomaly.training.presets import PRESETS, PRODUCT_PRESETS, get_preset, get_product_preset
from anomaly.scoring import ReconstructionScorer, Scorer
from anomaly.training.run import build_model


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_its_model_and_each_export_scorer(name: str) -> None:
    preset = get_preset(name)
    assert preset.name == name
    cfg = preset.train_config(data="unused", out="unused", epochs=4, image_size=32)  # TrainConfig validates
    assert cfg.model == preset.model and cfg.lr_decay_from == preset.lr_decay_from and cfg.augment == preset.augment
    from anomaly.registry import get_spec

    conditional = get_spec(cfg.model).conditional
    model = build_model(cfg.model, in_channels=1, image_size=32, num_classes=2 if conditional else 1,
                        **cfg.model_kwargs).eval()
    x = torch.rand(2, 1, 32, 32)
    cond = torch.tensor([0, 1]) if conditional else None  # a conditional model's category, as export passes it
    for label, (overrides, _normalize) in preset.scorings.items():
        settings = {**cfg.scoring, **overrides}
        scorer = Scorer(residual=settings["residual"], smoothing_sigma=settings["smoothing_sigma"],
                        aggregate=settings["aggregate"], topk_fraction=settings.get("topk_fraction", 0.01),
                        image_size=(32, 32))
        if len(scorer.parts) > 1:  # export measures these on validation images
            scorer.set_mix_statistics(torch.zeros(len(scorer.parts)), torch.ones(len(scorer.parts)))
        with torch.no_grad():  # "learned" raises here unless the model has a segmenter
            out = ReconstructionScorer(model, scorer)(x, cond)
        assert out.anomaly_map.shape == (2, 1, 32, 32) and out.score.shape == (2,), label
        assert torch.isfinite(out.score).all(), label


def test_the_wide_segmenter_preset_doubles_only_the_segmenter() -> None:
    narrow, wide = get_preset("cyclegan_repair_segdiff_decay"), get_preset("cyclegan_repair_segdiff32_decay")
    assert wide.model_kwargs == {**narrow.model_kwargs, "segmenter_channels": 32}
    assert wide.lr_decay_from == narrow.lr_decay_from == 0.5 and wide.scorings == narrow.scorings


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="cyclegan_repair_segdiff_decay"):
        get_preset("cyclegan_repair_segdif")


@pytest.mark.parametrize("name", sorted(PRODUCT_PRESETS))
def test_every_product_preset_makes_a_valid_config_model_and_scorer(name: str) -> None:
    """`anomaly train --preset NAME` (or the automatic choice) must train and export what it names."""
    from anomaly.training.config import TrainConfig

    preset = get_product_preset(name)
    cfg = TrainConfig(data="unused", out="unused", **preset.settings())  # TrainConfig validates
    assert cfg.model == preset.model and cfg.tile_scale == preset.tile_scale
    model = build_model(cfg.model, in_channels=1, image_size=32, num_classes=1, **cfg.model_kwargs).eval()
    scorer = Scorer(residual=cfg.scoring["residual"], smoothing_sigma=cfg.scoring["smoothing_sigma"],
                    aggregate=cfg.scoring["aggregate"], topk_fraction=cfg.scoring["topk_fraction"], image_size=(32, 32))
    with torch.no_grad():  # "learned" raises here unless the model has a segmenter
        out = ReconstructionScorer(model, scorer)(torch.rand(2, 1, 32, 32), None)
    assert out.anomaly_map.shape == (2, 1, 32, 32) and torch.isfinite(out.score).all()
    assert preset.figures == "not measured" or preset.results

"""Presets: the benchmark's named trials, and the few product recipes ``anomaly train`` offers.

**Benchmark presets** (:data:`PRESETS`): a model from the zoo plus the objective/model keyword
arguments, the synthetic-defect ("repair") setting and one or more scorings to export with.
``benchmarks/quality.py`` trains and evaluates them; ``get_preset(name).train_config(data=..., out=...)``
returns the :class:`anomaly.training.config.TrainConfig` to pass to :func:`anomaly.training.run.train`.

**Product presets** (:data:`PRODUCT_PRESETS`): what ``anomaly train --preset NAME`` applies and what
``anomaly train --data DIR`` chooses from when it is given no model options
(:mod:`anomaly.training.recipe` measures the images and picks one). Each is one setting of every
model field (model, input size, tiling, repair training, scoring, budget), tied to the benchmark
preset whose figures it reproduces and to those figures; ``anomaly presets`` lists them.

Example::

    from anomaly.training.presets import get_preset, get_product_preset
    from anomaly.training.run import train
    cfg = get_preset("aae_repair").train_config(data="cache/elpv_mono", out="runs/mono", epochs=15)
    train(cfg)
    settings = get_product_preset("texture_repair").settings()   # TrainConfig fields, by name
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from anomaly.training.config import DEFAULT_SCORING, TrainConfig, train_defaults

__all__ = ["Preset", "PRESETS", "get_preset", "ProductPreset", "PRODUCT_PRESETS", "get_product_preset",
           "TEXTURE_TILE_SIZE", "TEXTURE_LINE_LENGTH", "PRESET_FIELDS"]

Scoring = tuple[dict[str, Any], bool]  # (scoring overrides, per-pixel normalisation at export)

#: the training defaults (TrainConfig's fields), which a preset keeps unless it names its own
_D = train_defaults()
#: the learning rate every preset is benchmarked with (whatever the objective's own default)
PRESET_LR = 2e-4
#: the benchmark's epoch budget when ``train_config`` is not given one
PRESET_EPOCHS = 15


@dataclass(frozen=True)
class Preset:
    """A named recipe. ``scorings`` maps a label to (scoring overrides, normalize) for export."""

    name: str
    model: str
    description: str
    synthetic_defects: float = 0.0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    objective_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = _D["batch_size"]
    lr: float = PRESET_LR
    lr_decay_from: float | None = _D["lr_decay_from"]
    augment: str = _D["augment"]
    scorings: dict[str, Scoring] = field(default_factory=lambda: {"default": ({}, False)})
    fixed_epochs: int | None = None  # a reference that ignores the epoch budget (untrained control)

    def train_config(self, *, data: str, out: str, epochs: int = PRESET_EPOCHS, image_size: int = _D["image_size"],
                     seed: int = _D["seed"], **overrides: Any) -> TrainConfig:
        """The :class:`anomaly.training.config.TrainConfig` of this preset (``overrides`` win)."""
        kw: dict[str, Any] = dict(data=data, out=out, model=self.model, epochs=self.fixed_epochs or epochs, image_size=image_size,
                                  seed=seed, batch_size=self.batch_size, lr=self.lr,
                                  lr_decay_from=self.lr_decay_from, augment=self.augment,
                                  synthetic_defects=self.synthetic_defects, model_kwargs=dict(self.model_kwargs),
                                  objective_kwargs=dict(self.objective_kwargs), device="cpu")
        kw.update(overrides)
        return TrainConfig(**kw)


_RESIDUALS: dict[str, Scoring] = {
    "l1_ssim": ({"residual": "l1_ssim"}, False),
    "l1": ({"residual": "l1"}, False),
    "ssim": ({"residual": "ssim"}, False),
    "ms": ({"residual": "ms"}, False),
    "l1_ssim+norm": ({"residual": "l1_ssim"}, True),
    "l1+norm": ({"residual": "l1"}, True),
    "ssim+norm": ({"residual": "ssim"}, True),
    "ms+norm": ({"residual": "ms"}, True),
    "mean": ({"residual": "l1_ssim", "aggregate": "mean"}, False),
}

# Image score plus the latent knn distance (anomaly.scoring, latent="knn"): for the encoder-decoder
# presets only (a CycleGAN repair generator has no code to measure).
_LATENT_SCORINGS: dict[str, Scoring] = {"l1_ssim+norm+knn": ({"residual": "l1_ssim", "latent": "knn"}, True),
                                        # plus the texture statistics' map part (2026-12-04-quality-texture-stats.md)
                                        "l1_ssim+norm+knn+stats": ({"residual": "l1_ssim", "latent": "knn",
                                                                    "texture": "stats"}, True)}


def _cyclegan(name: str, description: str, *, synthetic_defects: float = 0.5,
              scorings: dict[str, Scoring] | None = None, objective_kwargs: dict[str, Any] | None = None,
              lr_decay_from: float | None = _D["lr_decay_from"], augment: str = _D["augment"],
              **model_kwargs: Any) -> Preset:
    """A CycleGAN repair preset: U-Net generators of base 16, discriminators of 16, batch 8, synthetic
    defects p=0.5, every residual kind exported; ``model_kwargs`` override the network settings."""
    return Preset(name, "cyclegan", description, synthetic_defects=synthetic_defects, batch_size=8,
                  model_kwargs={"generator": "unet", "base_channels": 16, "disc_channels": 16, **model_kwargs},
                  objective_kwargs=dict(objective_kwargs or {}), lr_decay_from=lr_decay_from, augment=augment,
                  scorings=dict(_RESIDUALS) if scorings is None else scorings)


# The segmenter presets' exports: its learned map alone, the residuals alone, and their standardised sums.
_SEGMENTER_SCORINGS: dict[str, Scoring] = {
    "learned": ({"residual": "learned"}, False),
    "l1_learned+norm": ({"residual": "l1_learned"}, True),
    "l1_ssim_learned+norm": ({"residual": "l1_ssim_learned"}, True),
    "l1+norm": _RESIDUALS["l1+norm"], "l1_ssim+norm": _RESIDUALS["l1_ssim+norm"],
    # plus the texture statistics' distance (anomaly.texture_stats), measured 2026-12-04
    "learned+stats": ({"residual": "learned", "texture": "stats"}, False),
    "l1_learned+norm+stats": ({"residual": "l1_learned", "texture": "stats"}, True)}


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("ae", "ae", "floor: plain convolutional autoencoder (exported with every residual kind)",
           scorings={**_RESIDUALS, **_LATENT_SCORINGS}),
    Preset("aae", "aae", "adversarial autoencoder (latent discriminator), defaults as `anomaly train`; "
           "exported with every residual kind and with per-pixel normalisation (one training run)",
           scorings={**_RESIDUALS, **_LATENT_SCORINGS}),
    Preset("cond_aae", "cond_aae", "conditional AAE: one model for several categories, each category its label "
           "(benchmarks/quality.py's elpv_types: the cell type); exported as the aae default and its neighbours",
           scorings={"l1_ssim+norm": _RESIDUALS["l1_ssim+norm"], **_LATENT_SCORINGS}),
    # Negative control: learning rate 0 (random weights; only BatchNorm statistics see the data).
    # Shows how much of a score comes from training rather than from the scoring pipeline.
    Preset("untrained_aae", "aae", "negative control: aae with lr=0 (random init), 1 epoch",
           lr=0.0, objective_kwargs={"lr": 0.0}, fixed_epochs=1,
           scorings={"l1_ssim": _RESIDUALS["l1_ssim"], "l1_ssim+norm": _RESIDUALS["l1_ssim+norm"], **_LATENT_SCORINGS}),
    Preset("aae_norm", "aae", "aae, per-pixel residual normalisation from validation images at export",
           scorings={"l1_ssim+norm": _RESIDUALS["l1_ssim+norm"]}),
    Preset("aae_residuals", "aae", "aae, exported with every residual kind (one training run)",
           scorings=dict(_RESIDUALS)),
    Preset("aae_repair", "aae", "aae trained to repair DRAEM-style synthetic defects (p=0.5)",
           synthetic_defects=0.5, scorings=dict(_RESIDUALS)),
    Preset("aae_deconv2", "aae", "aae whose decoder upsamples with 2x2 stride-2 transposed convolutions "
           "(a quarter of deconv4's multiply-adds; fast in onnxruntime)",
           model_kwargs={"upsample": "deconv2"}, scorings=dict(_RESIDUALS)),
    Preset("aae_repair_deconv2", "aae", "aae_repair with the deconv2 decoder",
           synthetic_defects=0.5, model_kwargs={"upsample": "deconv2"}, scorings=dict(_RESIDUALS)),
    Preset("aae_patchgan", "aae", "aae plus a PatchGAN image discriminator on reconstructions (sharper outputs)",
           model_kwargs={"image_discriminator": True}, scorings=dict(_RESIDUALS)),
    Preset("aae_z16", "aae", "aae with a 16-d latent (tighter bottleneck: defects harder to reproduce)",
           model_kwargs={"latent_dim": 16}, scorings={**_RESIDUALS, **_LATENT_SCORINGS}),
    Preset("aae_z128", "aae", "aae with a 128-d latent (more room for the latent knn score to tell codes apart)",
           model_kwargs={"latent_dim": 128}, scorings={"l1_ssim+norm": _RESIDUALS["l1_ssim+norm"], **_LATENT_SCORINGS}),
    Preset("aae_w16", "aae", "aae at half the width (base 16 channels, at most 128): less capacity to reproduce defects",
           model_kwargs={"base_channels": 16, "max_channels": 128},
           scorings={"l1_ssim+norm": _RESIDUALS["l1_ssim+norm"], **_LATENT_SCORINGS}),
    Preset("aae_w64", "aae", "aae at twice the width (base 64 channels, at most 512): sharper reconstructions of grain",
           model_kwargs={"base_channels": 64, "max_channels": 512},
           scorings={"l1_ssim+norm": _RESIDUALS["l1_ssim+norm"], **_LATENT_SCORINGS}),
    Preset("aae_aggregate", "aae", "aae exported with l1_ssim+norm / ssim+norm maps and other image scores "
           "(the default: mean of the top 1 % of pixels of the map smoothed at sigma 2): max, top 10 %, mean, "
           "and sigma 1 / 4 / 8",
           scorings={f"{res}+norm/{agg}": ({"residual": res, "smoothing_sigma": 2.0, "aggregate": "topk",
                                            "topk_fraction": 0.01, **kw}, True)
                     for res in ("l1_ssim", "ssim")
                     for agg, kw in (("top1", {}), ("max", {"aggregate": "max"}), ("top10", {"topk_fraction": 0.1}),
                                     ("mean", {"aggregate": "mean"}), ("top1_s1", {"smoothing_sigma": 1.0}),
                                     ("top1_s4", {"smoothing_sigma": 4.0}), ("top1_s8", {"smoothing_sigma": 8.0}))}),
    Preset("ae_repair", "ae", "plain AE trained to repair synthetic defects (p=0.5)",
           synthetic_defects=0.5, scorings=dict(_RESIDUALS)),
    _cyclegan("cyclegan_repair", "CycleGAN-style repair generator (small U-Net), synthetic defects p=0.5"),
    _cyclegan("cyclegan_repair_wide", "cyclegan_repair with twice the channels (U-Net base 32, discriminator 32): "
              "more capacity for irregular textures", base_channels=32, disc_channels=32),
    _cyclegan("cyclegan_repair_p08", "cyclegan_repair with synthetic defects on 80% of training images "
              "(more repair examples per epoch)", synthetic_defects=0.8),
    _cyclegan("cyclegan_repair_smooth", "cyclegan_repair exported with the l1+norm map smoothed at sigma 1, 2 "
              "(the default), 4 and 8 px: grass / gravel residuals are noisy at the texture's grain",
              scorings={f"l1+norm+s{s:g}": ({"residual": "l1", "smoothing_sigma": float(s)}, True) for s in (1, 2, 4, 8)}),
    _cyclegan("cyclegan_repair_seg", "cyclegan_repair plus DRAEM's segmenter (U-Net base 16 on (input, repair), focal "
              "loss on the synthetic masks); exported with its learned map, with the residuals, and with their "
              "sum (each standardised on normal validation images)",
              segmenter=True, scorings=_SEGMENTER_SCORINGS),
    _cyclegan("cyclegan_repair_seg32", "cyclegan_repair_seg with a segmenter twice as wide (U-Net base 32)",
              segmenter=True, segmenter_channels=32, scorings=_SEGMENTER_SCORINGS),
    _cyclegan("cyclegan_repair_segdiff", "cyclegan_repair_seg whose segmenter also reads |input - repair|",
              segmenter=True, segmenter_input="pair_diff", scorings=_SEGMENTER_SCORINGS),
    _cyclegan("cyclegan_repair_segdiff_decay", "cyclegan_repair_segdiff with CycleGAN's learning-rate schedule: "
              "constant for the first half of the epochs, then linear decay towards 0", segmenter=True,
              segmenter_input="pair_diff", lr_decay_from=0.5, scorings=_SEGMENTER_SCORINGS),
    _cyclegan("cyclegan_repair_segdiff_decay_rot", "cyclegan_repair_segdiff_decay trained on all 8 orientations "
              "(flips and 90-degree rotations, --augment flip_rot90): grass and gravel have no preferred direction, "
              "and their 200 training crops overlap heavily (2026-11-22: worse on grass over 3 seeds)", segmenter=True,
              segmenter_input="pair_diff", lr_decay_from=0.5, augment="flip_rot90", scorings=_SEGMENTER_SCORINGS),
    _cyclegan("cyclegan_repair_segdiff32_decay", "cyclegan_repair_segdiff_decay with a segmenter twice as wide "
              "(U-Net base 32): on grass the segmenter's map carries the detection", segmenter=True,
              segmenter_input="pair_diff", segmenter_channels=32, lr_decay_from=0.5, scorings=_SEGMENTER_SCORINGS),
    _cyclegan("cyclegan_repair_seg_long", "cyclegan_repair_seg whose generators and discriminators stop after 30 "
              "epochs; the remaining epochs (--epochs minus 30) train the segmenter alone on the finished repair",
              segmenter=True, objective_kwargs={"repair_epochs": 30}, scorings=_SEGMENTER_SCORINGS),
    _cyclegan("cyclegan_repair_segdiff_long", "cyclegan_repair_segdiff with cyclegan_repair_seg_long's schedule "
              "(generators and discriminators 30 epochs, the segmenter all --epochs)", segmenter=True,
              segmenter_input="pair_diff", objective_kwargs={"repair_epochs": 30}, scorings=_SEGMENTER_SCORINGS),
    _cyclegan("cyclegan_repair_segjoint", "cyclegan_repair_seg trained jointly as DRAEM: the segmenter's focal "
              "loss (weight 10) also trains the repair generator", segmenter=True,
              objective_kwargs={"lambda_seg": 10.0}, scorings=_SEGMENTER_SCORINGS),
    _cyclegan("cyclegan_repair_resnet", "cyclegan_repair with ResNet generators (base 16, 6 blocks): "
              "full-resolution residual path instead of the U-Net's skips", generator="resnet", n_blocks=6),
]}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a clear error lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown reconstructor preset {name!r}; expected one of {sorted(PRESETS)}") from None


# -- product presets ------------------------------------------------------------------------------

#: Tile side (px, at native scale) of the ``texture_tiled`` recipe: the one place to change it.
#: On 1024-px brick, 64 px tiles found more of the thin and faint defects' pixels than 128 px ones
#: within the same CPU budget (``benchmarks/results/2026-12-08-tiling-thin-defects.md``).
TEXTURE_TILE_SIZE = 64
#: Length (px) of the line part the ``texture_tiled`` recipe exports with: 1.7x the defect pixels
#: found at 1 % normal-pixel FPR on 1024-px brick against none, for +72 % scoring time
#: (``benchmarks/results/2026-12-08-tiling-trials.md``)
TEXTURE_LINE_LENGTH = 31

#: the TrainConfig fields a product preset sets (every other field keeps its default or the user's option)
PRESET_FIELDS = ("model", "image_size", "tile_scale", "epochs", "batch_size", "lr", "lr_decay_from", "augment",
                 "synthetic_defects", "model_kwargs", "objective_kwargs", "scoring")


@dataclass(frozen=True)
class ProductPreset:
    """A product recipe: one value for each of :data:`PRESET_FIELDS`, and what it was measured to do.

    Attributes:
        name: what ``--preset`` takes.
        summary: what it is for, one line.
        model ... objective_kwargs: the :class:`anomaly.training.config.TrainConfig` fields it sets
            (defaults: the training defaults, :func:`anomaly.training.config.train_defaults`).
        scoring: overrides of :data:`anomaly.training.config.DEFAULT_SCORING`, stored in the run for export.
        export_args: the ``anomaly export`` options its figures were measured with, beyond the
            run's own settings (export does not read them from the run: ``anomaly train`` prints
            the export line to use).
        benchmark: the benchmark preset (:data:`PRESETS`) whose runs gave the figures, or ``None``.
        figures: the measured figures, one line, or ``"not measured"``.
        results: the results files (``benchmarks/results/...``) that hold them.
    """

    name: str
    summary: str
    model: str = _D["model"]
    image_size: int = _D["image_size"]
    tile_scale: float | None = _D["tile_scale"]
    epochs: int = _D["epochs"]
    batch_size: int = _D["batch_size"]
    lr: float | None = _D["lr"]
    lr_decay_from: float | None = _D["lr_decay_from"]
    augment: str = _D["augment"]
    synthetic_defects: float = _D["synthetic_defects"]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    objective_kwargs: dict[str, Any] = field(default_factory=dict)
    scoring: dict[str, Any] = field(default_factory=dict)
    export_args: tuple[str, ...] = ()
    benchmark: str | None = None
    figures: str = "not measured"
    results: tuple[str, ...] = ()

    def settings(self) -> dict[str, Any]:
        """The :data:`PRESET_FIELDS` values, by name (fresh copies of the dicts): what ``--preset``
        puts into the :class:`anomaly.training.config.TrainConfig` before explicit options win."""
        return {"model": self.model, "image_size": self.image_size, "tile_scale": self.tile_scale,
                "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "lr_decay_from": self.lr_decay_from, "augment": self.augment,
                "synthetic_defects": self.synthetic_defects, "model_kwargs": dict(self.model_kwargs),
                "objective_kwargs": dict(self.objective_kwargs), "scoring": {**DEFAULT_SCORING, **self.scoring}}

    def describe(self) -> str:
        """The settings in a few words, e.g. ``aae, 64 px tiles at native scale, 100 epochs``."""
        seg = " + segmenter" if self.model_kwargs.get("segmenter") else ""
        if self.tile_scale is None:
            where = f"{self.image_size} px whole image"
        else:
            scale = "native scale" if self.tile_scale == 1 else f"scale {self.tile_scale:g}"
            where = f"{self.image_size} px tiles at {scale}"
        extra = [f"repair of synthetic defects p={self.synthetic_defects:g}"] if self.synthetic_defects else []
        extra += [f"{k} {v}" for k, v in self.scoring.items()]
        if self.export_args:
            extra.append("export " + " ".join(self.export_args))
        return ", ".join([f"{self.model}{seg}", where, f"{self.epochs} epochs", *extra])


def _from_benchmark(benchmark: str, name: str, summary: str, **kw: Any) -> ProductPreset:
    """A product preset with the model, repair and optimiser settings of the benchmark preset ``benchmark``."""
    b = PRESETS[benchmark]
    return ProductPreset(name, summary, model=b.model, batch_size=b.batch_size, lr=b.lr, lr_decay_from=b.lr_decay_from,
                         augment=b.augment, synthetic_defects=b.synthetic_defects, model_kwargs=dict(b.model_kwargs),
                         objective_kwargs=dict(b.objective_kwargs), benchmark=benchmark, **kw)


PRODUCT_PRESETS: dict[str, ProductPreset] = {p.name: p for p in [
    ProductPreset(
        "aligned", "products at the same place in every image (cells, parts in a fixture): the default AAE on the "
        "whole image", benchmark="aae",
        figures="image AUROC ELPV mono 0.918 ± 0.006, poly 0.831 ± 0.000 (3 seeds, 64², 100 epochs; exported with "
                "per-pixel normalisation and the latent knn term)",
        results=("benchmarks/results/2026-11-22-quality-latent-knn.md",)),
    ProductPreset(
        "texture_tiled", "stationary textures on large images: the AAE on tiles at native scale, so thin and small "
        "defects keep their pixels, with a line part for scratches and cracks", image_size=TEXTURE_TILE_SIZE,
        tile_scale=1.0, epochs=10, scoring={"line_length": TEXTURE_LINE_LENGTH},
        figures="1024-px brick mosaics, faint defects (1-3 px scratches and cracks, haze, dust, smear), seed 0, "
                "4 CPU-minutes: pixel recall at 1 % normal-pixel FPR 0.170 (whole image at 128 px: 0.026), "
                "image AUROC 0.549 (0.498): the pixels are found, the image score is not yet",
        results=("benchmarks/results/2026-12-08-tiling-thin-defects.md", "benchmarks/results/2026-12-08-tiling-trials.md")),
    _from_benchmark(
        "cyclegan_repair_segdiff_decay", "texture_repair", "stationary textures on small images: CycleGAN repair of "
        "synthetic defects with a DRAEM-style segmenter, the texture statistics and flip TTA",
        image_size=128, epochs=60, scoring={"residual": "learned", "texture": "stats"},
        export_args=("--tta", "flips", "--no-normalize"),  # the benchmark's "learned+stats" scoring, with flips
        figures="image AUROC / pixel AUROC / AUPRO, 3 seeds, 128-px native crops, 60 epochs: brick 0.914 / 0.996 / "
                "0.983, grass 0.844 / 0.947 / 0.823, gravel 0.922 / 0.977 / 0.905; 1,158-1,170 CPU s of training "
                "on brick's 200 crops",
        results=("benchmarks/results/2026-12-04-quality-texture-stats.md",
                 "benchmarks/results/2026-12-04-quality-texture-stats-tta-brick.md")),
]}


def get_product_preset(name: str) -> ProductPreset:
    """The product preset called ``name``; a clear error lists the known ones (``anomaly presets``)."""
    try:
        return PRODUCT_PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; expected one of {', '.join(PRODUCT_PRESETS)} "
                       "(anomaly presets lists them with their figures)") from None

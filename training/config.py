"""Training configuration: one dataclass, saved resolved next to the checkpoints (``config.json``).

The library sees explicit fields; option parsing stays in :mod:`anomaly.training.cli`. The field
defaults here are the project's one definition of the training defaults (:func:`train_defaults`).
"""
from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "DEFAULT_SCORING", "AUGMENTS", "train_defaults"]

#: training augmentations (see ``TrainConfig.augment``)
AUGMENTS = ("none", "flip", "flip_rot90")

DEFAULT_SCORING: dict[str, Any] = {"residual": "l1_ssim", "smoothing_sigma": 2.0, "aggregate": "topk", "topk_fraction": 0.01}


@dataclass
class TrainConfig:
    """Everything a training run needs; ``config.json`` in the run folder is this, resolved.

    Attributes:
        data: MVTec-style category folder, a folder of categories, or a plain folder of normals.
        out: run folder (checkpoints, config, loss log, split).
        model: registry name (``anomaly models`` lists them).
        image_size: model input side S (power of two); the tile side when tiled.
        tile_scale: ``None`` (default): every image is resized whole to ``S x S``. A number: native-
            resolution tiling at that pixel scale (1 = native pixels, 0.5 = half): the model trains on
            random ``S x S`` crops of the scaled images, and the bundle scores overlapping tiles
            stitched into one map at that scale (:mod:`anomaly.data.tiling`). For thin or small
            defects on images much larger than ``S``.
        tile_overlap: fraction of a tile its neighbours share in the inference grid (0 to 0.75).
        channels: 1 or 3; ``None`` = detect from the first training image.
        epochs, max_minutes: the budget (whichever ends first).
        batch_size: optimisation batch size.
        lr: learning rate of every step; ``None`` keeps the objective's own default (e.g. 2e-4 for
            adversarial families, 1e-3 for AE/VAE).
        lr_decay_from: fraction of ``epochs`` after which every learning rate falls linearly
            towards 0 (CycleGAN's schedule, :class:`anomaly.training.trainer.Trainer`); ``None``: constant.
        val_fraction: share of normal training images held out for validation (checkpoint choice,
            default threshold, score statistics); never trained on.
        seed: seeds the split, the initialisation and the data order.
        device: ``auto``, ``cpu`` or ``cuda``.
        augment: ``none``, ``flip`` (random horizontal/vertical flips, which keep normal normal
            for symmetric parts; switch off for oriented products) or ``flip_rot90`` (the flips and
            a random transposition: all 8 orientations of the square, for surfaces with no preferred
            direction; not for brick rows or busbars). On the grass benchmark ``flip_rot90`` was
            worse than ``flip`` over 3 seeds (``benchmarks/results/2026-11-22-quality-grass-trials.md``).
        synthetic_defects: probability that a training image carries a synthetic defect
            (:class:`anomaly.data.synthetic.DefectSynthesizer`); the batch then holds the clean image as
            ``target`` and the model learns to *repair* (DRAEM-style). 0 disables.
        defect_sources: folder of images that fill the synthetic Perlin-shaped defects (DRAEM's
            DTD textures; :func:`anomaly.data.synthetic.load_defect_sources`). ``None``: transformed
            copies of the training image itself. Must not hold the defects you evaluate on.
        model_kwargs / objective_kwargs: passed to the model factory / the objective.
        scoring: residual and map settings used by export (see :mod:`anomaly.scoring`).
        recipe: how the settings were chosen when ``anomaly train`` picked them itself (the preset's
            name, the measured properties of the training images and the reason); ``None`` when the
            user named the model and its settings. Copied into the bundle's sidecar by export.
    """

    data: str
    out: str = "runs/default"
    model: str = "aae"
    image_size: int = 64
    tile_scale: float | None = None
    tile_overlap: float = 0.25
    channels: int | None = None
    epochs: int = 100
    max_minutes: float | None = None
    batch_size: int = 32
    lr: float | None = None
    lr_decay_from: float | None = None
    val_fraction: float = 0.15
    seed: int = 0
    device: str = "auto"
    augment: str = "flip"
    synthetic_defects: float = 0.0
    defect_sources: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    objective_kwargs: dict[str, Any] = field(default_factory=dict)
    scoring: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCORING))
    recipe: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0.0 <= self.synthetic_defects <= 1.0:
            raise ValueError(f"synthetic_defects must be in [0, 1], got {self.synthetic_defects}")
        if self.defect_sources is not None and not self.synthetic_defects:
            raise ValueError("defect_sources fill synthetic defects: set synthetic_defects > 0 as well")
        if self.lr_decay_from is not None and not 0.0 <= self.lr_decay_from < 1.0:
            raise ValueError(f"lr_decay_from must be in [0, 1), got {self.lr_decay_from}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.tile_scale is not None and not 0.0 < float(self.tile_scale) <= 4.0:
            raise ValueError(f"tile_scale must be in (0, 4] (1 = native pixels), got {self.tile_scale}")
        if not 0.0 <= float(self.tile_overlap) <= 0.75:
            raise ValueError(f"tile_overlap must be in [0, 0.75], got {self.tile_overlap}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | os.PathLike) -> None:
        from anomaly.data.io import atomic_write

        with atomic_write(path) as fh:
            json.dump(self.to_dict(), fh, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def train_defaults() -> dict[str, Any]:
    """Every :class:`TrainConfig` field's default, by name (fresh copies of the dict defaults;
    ``data`` has none). The one definition of the training defaults: ``anomaly train``'s options,
    :class:`anomaly.detector.AnomalyDetector`'s parameters, ``anomaly demo`` and the presets
    (:mod:`anomaly.training.presets`) read them from here."""
    out: dict[str, Any] = {}
    for f in fields(TrainConfig):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out

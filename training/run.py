"""A whole training run from a :class:`TrainConfig`: data -> split -> model -> objective -> trainer.

Writes into ``config.out``: ``config.json`` (resolved), ``split.json`` (which images trained and
which were held out for validation), ``losses.csv`` and ``checkpoints/{best,last}.pt``.

Example::

    from anomaly.training.config import TrainConfig
    from anomaly.training.run import train
    result = train(TrainConfig(data="data/tiles", out="runs/tiles", epochs=5))
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from anomaly.registry import create_model, get_spec
from anomaly.texture_stats import MIN_SIDE as TEXTURE_MIN_SIDE
from anomaly.data.folder import DatasetLayout, ImageDataset, Sample, discover
from anomaly.data.io import atomic_write, read_image
from anomaly.data.preprocess import Preprocess
from anomaly.training.config import TrainConfig
from anomaly.training.objectives import create_objective
from anomaly.training.distributed import is_main_process
from anomaly.training.trainer import Trainer, TrainResult, load_checkpoint

__all__ = ["train", "split_normals", "resume_split", "ResumeError", "RESUMABLE_FIELDS", "detect_channels", "build_model",
           "load_run", "save_samples"]

log = logging.getLogger(__name__)


def split_normals(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic shuffle-split of normal training images into (train, validation).

    At least one image stays for training; validation is empty only when ``val_fraction`` is 0
    or there is a single image.
    """
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = int(round(val_fraction * len(samples)))
    n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(samples) - 1)
    val = [samples[i] for i in sorted(order[:n_val])]
    train = [samples[i] for i in sorted(order[n_val:])]
    return train, val


def detect_channels(path: Path) -> int:
    """1 when the image is grayscale (or RGB with equal channels), else 3."""
    img = read_image(path)
    if img.ndim == 2:
        return 1
    rgb = img[:, :, :3]
    return 1 if np.allclose(rgb[:, :, 0], rgb[:, :, 1]) and np.allclose(rgb[:, :, 1], rgb[:, :, 2]) else 3


def flip_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal and vertical flips of a ``(C, H, W)`` image."""
    if rng.random() < 0.5:
        image = image[:, :, ::-1]
    if rng.random() < 0.5:
        image = image[:, ::-1, :]
    return image


def flip_rot90_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flips, then a random transposition of a square ``(C, S, S)`` image: each of the 8
    orientations of the square (flips and 90-degree rotations) with probability 1/8."""
    image = flip_augment(image, rng)
    if image.shape[1] != image.shape[2]:
        raise ValueError(f"flip_rot90 needs square images, got {image.shape[1]}x{image.shape[2]}")
    if rng.random() < 0.5:
        image = image.transpose(0, 2, 1)
    return image


_AUGMENT_FNS = {"none": None, "flip": flip_augment, "flip_rot90": flip_rot90_augment}


def build_model(name: str, *, in_channels: int, image_size: int, num_classes: int, **kwargs: Any) -> torch.nn.Module:
    """Create a registry model with the data-derived arguments (conditional models get ``num_classes``)."""
    spec = get_spec(name)
    extra = {"num_classes": max(num_classes, 1)} if spec.conditional else {}
    return create_model(name, in_channels=in_channels, image_size=image_size, **extra, **kwargs)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ResumeError(ValueError):
    """``resume`` of a run folder whose recorded settings or split the request does not match."""


#: settings a resumed run may change: the budget, and where it runs
RESUMABLE_FIELDS = ("epochs", "max_minutes", "device", "out")


def resume_split(out: Path, config: TrainConfig, layout: DatasetLayout) -> tuple[list[Sample], list[Sample]]:
    """The ``(train, validation)`` samples recorded in ``out/split.json``, after checking that
    ``config`` is the run's recorded ``config.json`` up to :data:`RESUMABLE_FIELDS`.

    Resuming must continue the run that was started: a split recomputed from what the folder
    holds now (images added or removed) would train on validation images, and other settings would
    train another model under the same name. ``config.channels`` ``None`` takes the recorded value;
    ``layout.categories`` becomes the recorded categories.

    Raises:
        ResumeError: missing ``config.json`` / ``split.json``, or settings that differ (the message
            lists each changed field, recorded and requested value).
        anomaly.data.folder.DatasetError: an image of the recorded split is gone.
    """
    from anomaly.data.folder import DatasetError

    cfg_path, split_path = out / "config.json", out / "split.json"
    for f in (cfg_path, split_path):
        if not f.is_file():
            raise ResumeError(f"cannot resume {out}: {f.name} is missing (a run folder of `anomaly train` has "
                              "config.json and split.json beside checkpoints/)")
    recorded = TrainConfig.load(cfg_path)
    if config.channels is None:
        config.channels = recorded.channels
    now, then = config.to_dict(), recorded.to_dict()
    changed = [f"{k} {then.get(k)!r} -> {now[k]!r}" for k in now if k not in RESUMABLE_FIELDS and now[k] != then.get(k)]
    if changed:
        raise ResumeError(f"cannot resume {out}: its recorded settings differ from this request: {'; '.join(changed)}. "
                          f"Only {', '.join(RESUMABLE_FIELDS[:3])} may change on resume; start a new --out for other "
                          "settings")
    split = json.loads(split_path.read_text())
    train_s = [Sample(Path(p), 0, "good", None, int(c))
               for p, c in zip(split["train"], split.get("train_categories") or [0] * len(split["train"]))]
    val_s = [Sample(Path(p), 0, "good", None, int(c))
             for p, c in zip(split["val"], split.get("val_categories") or [0] * len(split["val"]))]
    missing = [str(s.path) for s in train_s + val_s if not s.path.is_file()]
    if missing:
        raise DatasetError(f"cannot resume {out}: {len(missing)} image(s) of its recorded split are gone "
                           f"(e.g. {missing[0]}); restore them, or start a new run")
    if split.get("categories"):
        layout.categories = list(split["categories"])
    log.info("resuming %s with its recorded split: %d training and %d validation images", out, len(train_s), len(val_s))
    return train_s, val_s


def train(config: TrainConfig, *, resume: bool = False,
          progress: Callable[[dict[str, Any]], None] | None = None,
          tensorboard: bool = True, logdir: str | Path | None = None) -> TrainResult:
    """Run training as configured; returns the :class:`TrainResult`.

    ``tensorboard``: write TensorBoard event files to ``logdir`` (default ``config.out/tensorboard``).
    Under torchrun every rank runs this; rank 0 alone writes the run folder's files.

    ``resume``: continue from ``out/checkpoints/last.pt`` when it exists, with the recorded split
    and random states; ``config`` must match the recorded ``config.json`` except for
    :data:`RESUMABLE_FIELDS` (:func:`resume_split`).

    Raises:
        anomaly.data.folder.DatasetError: missing folder or no training images; on resume, a
            recorded image that is gone.
        ResumeError: resuming with other settings than the run's recorded ones.
        anomaly.registry.UnknownModelError: unknown model name.
        FileNotFoundError, ValueError: ``defect_sources`` is not a folder of images.
    """
    spec = get_spec(config.model)  # fail fast on a bad name, before touching data
    layout: DatasetLayout = discover(config.data)
    sources = None
    if config.synthetic_defects > 0 and config.defect_sources:  # a bad folder fails here, before the run folder
        from anomaly.data.synthetic import load_defect_sources

        sources = load_defect_sources(config.defect_sources)
    out = Path(config.out)
    resuming = resume and (out / "checkpoints" / "last.pt").exists()
    if resuming:  # the recorded split and settings, before anything is written
        train_s, val_s = resume_split(out, config, layout)
    out.mkdir(parents=True, exist_ok=True)
    _seed_everything(config.seed)

    if not resuming:
        train_s, val_s = split_normals(layout.train, config.val_fraction, config.seed)
    if config.channels is None:
        config.channels = detect_channels(train_s[0].path)
    if config.scoring.get("colour", "rgb") != "rgb" and config.channels != 3:
        # refuse now, not after the training, when the export would
        raise ValueError(f"scoring colour {config.scoring['colour']!r} needs an RGB model; the data "
                         f"{'is grayscale' if config.channels == 1 else f'has {config.channels} channels'} "
                         "(train with --channels 3 on colour images, or drop --colour)")
    if config.scoring.get("texture", "none") == "stats" and config.image_size < TEXTURE_MIN_SIDE:
        raise ValueError(f"texture statistics need images of at least {TEXTURE_MIN_SIDE} px a side; "
                         f"--image-size is {config.image_size}")
    pre = Preprocess(image_size=config.image_size, channels=config.channels, tile_scale=config.tile_scale,
                     tile_overlap=config.tile_overlap)
    num_classes = len(layout.categories)
    model_kwargs = dict(config.model_kwargs)
    model = build_model(config.model, in_channels=config.channels, image_size=config.image_size,
                        num_classes=num_classes, **model_kwargs)
    objective_kwargs = dict(config.objective_kwargs)
    if config.lr is not None:
        objective_kwargs.setdefault("lr", config.lr)
    objective = create_objective(spec.objective, model, **objective_kwargs)
    log.info("%s: %d training and %d validation images (%s layout, %d categor%s), model %s with %.2fM parameters",
             layout.root, len(train_s), len(val_s), layout.kind, num_classes, "y" if num_classes == 1 else "ies",
             config.model, sum(p.numel() for p in model.parameters()) / 1e6)

    if is_main_process():  # under torchrun, rank 0 alone writes the run folder
        config.save(out / "config.json")  # on resume: the recorded settings with the new budget
    if is_main_process() and not resuming:
        with atomic_write(out / "split.json") as fh:
            json.dump({"layout": layout.kind, "root": str(layout.root), "categories": layout.categories,
                       "train": [str(s.path) for s in train_s], "val": [str(s.path) for s in val_s],
                       "train_categories": [s.category for s in train_s],
                       "val_categories": [s.category for s in val_s]}, fh, indent=1)

    train_ds = ImageDataset(train_s, pre, augment=_AUGMENT_FNS[config.augment], seed=config.seed, cache=True)
    if config.synthetic_defects > 0:
        from anomaly.data.synthetic import DefectSynthesizer, SyntheticDefectDataset

        synth = DefectSynthesizer(p_defect=config.synthetic_defects, texture_source=sources)
        train_ds = SyntheticDefectDataset(train_ds, synth, seed=config.seed)
    val_ds = ImageDataset(val_s, pre, cache=True, fixed_crops=True) if val_s else None
    g = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(train_ds, batch_size=min(config.batch_size, len(train_ds)), shuffle=True,
                              drop_last=len(train_ds) > config.batch_size, generator=g)
    val_loader = DataLoader(val_ds, batch_size=config.batch_size) if val_ds else None

    trainer = Trainer(
        objective, out_dir=out, epochs=config.epochs, max_minutes=config.max_minutes, lr=config.lr if config.lr is not None else 2e-4,
        lr_decay_from=config.lr_decay_from, device=config.device, progress=progress, seed=config.seed,
        logdir=(Path(logdir) if logdir is not None else out / "tensorboard") if tensorboard else None,
        extra_state={"config": config.to_dict(), "model_name": config.model, "model_kwargs": model_kwargs,
                     "num_classes": num_classes, "categories": layout.categories, "preprocess": pre.to_dict()},
        generators={"loader": g},
    )
    if resuming:
        trainer.resume()
    return trainer.fit(train_loader, val_loader)


def load_run(run_dir: str | Path, checkpoint: str = "best") -> tuple[torch.nn.Module, dict[str, Any], TrainConfig]:
    """Rebuild the trained model of a run folder, in ``eval()`` mode.

    Returns:
        ``(model, checkpoint_dict, config)``.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder (expected the --out folder of `anomaly train`)")
    ckpt = load_checkpoint(run / "checkpoints" / f"{checkpoint}.pt")
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(ckpt["model_name"], in_channels=cfg.channels, image_size=cfg.image_size,
                        num_classes=ckpt.get("num_classes", 1), **ckpt.get("model_kwargs", {}))
    model.load_state_dict(ckpt["model_state"])
    return model.eval(), ckpt, cfg


def save_samples(run_dir: str | Path, n: int = 64, checkpoint: str = "best") -> Path:
    """Write ``RUN/samples.png``: a grid of what the trained model generates (GANs: G(z); VAE/AAE:
    decoded prior samples; AE/CycleGAN: outputs for validation images), one column per class
    for conditional models."""
    from anomaly.training.generative import save_sample_grid

    model, ckpt, cfg = load_run(run_dir, checkpoint)
    split = json.loads((Path(run_dir) / "split.json").read_text())
    paths = (split.get("val") or split.get("train", []))[: max(1, n // 2)]
    pre = Preprocess(image_size=cfg.image_size, channels=cfg.channels, tile_scale=cfg.tile_scale,
                     tile_overlap=cfg.tile_overlap)
    batch = (pre.load_tiles(paths, max_tiles_per_image=1)[0] if pre.tiled else pre.load_batch(paths)) if paths else None
    images = torch.from_numpy(batch) if batch is not None else None
    with torch.no_grad():
        return save_sample_grid(model, Path(run_dir) / "samples.png", n=n, images=images)

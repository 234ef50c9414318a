"""Sample grids of any zoo family: a quick look at what a generative model has learned.

What is drawn depends on the family:

- GANs (``gan``, ``dcgan``, ``cgan``, ``infogan``): ``G(z)`` for ``z`` from the prior.
- VAEs (``vae``, ``cvae``): ``decoder(z)``, ``z ~ N(0, I)``.
- AAEs (``aae``, ``cond_aae``): ``decoder(z)``, ``z`` from the AAE's chosen prior.
- plain AE (``ae``): it has no prior, so a diagonal Gaussian is fitted to the codes of ``images``
  and decoded samples of it are drawn (``images`` required).
- CycleGAN: translations of ``images`` into the normal domain, shown next to the inputs
  (``images`` required).

Conditional models draw labels ``0, 1, …, K-1, 0, 1, …`` (one class per column with ``n`` a
multiple of K) unless ``cond`` is given.

Example::

    from anomaly.training.generative import save_sample_grid
    save_sample_grid(model, "runs/x/samples.png", n=64)
    save_sample_grid(cyclegan, "runs/y/repairs.png", images=batch["image"][:16])
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["generate_samples", "save_sample_grid"]

log = logging.getLogger(__name__)


def _labels(cond: torch.Tensor | int | None, n: int, num_classes: int, device: torch.device) -> torch.Tensor | None:
    if num_classes == 0:
        return None
    if cond is None:
        return torch.arange(n, device=device) % num_classes
    if isinstance(cond, int):
        return torch.full((n,), cond, dtype=torch.long, device=device)
    return cond.long().to(device).reshape(-1)[:n]


@torch.no_grad()
def generate_samples(
    model: nn.Module,
    n: int = 64,
    cond: torch.Tensor | int | None = None,
    images: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images ``(M, C, S, S)`` in [0, 1] that show what ``model`` generates (see module docstring).

    Args:
        model: a zoo model.
        n: number of samples (for CycleGAN: at most ``n`` inputs, so ``2 * n`` tiles).
        cond: label(s) for conditional models: an int or an ``(n,)`` tensor.
        images: ``(N, C, S, S)`` inputs, needed by ``ae`` and ``cyclegan``.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        num_classes = int(getattr(model, "num_classes", 0))
        y = _labels(cond, n, num_classes, device)
        if hasattr(model, "generator_repair"):  # CycleGAN: inputs, then their repairs
            if images is None:
                raise ValueError("a CycleGAN translates images: pass images=(N, C, H, W) to sample from it")
            x = images[:n].to(device)
            return torch.cat([x, model.generator_repair(x)], 0)
        if hasattr(model, "generator") and hasattr(model, "sample_code"):  # GAN families
            return model.generate(model.sample_code(n, device).code, y)
        if getattr(model, "variational", False):  # VAE / CVAE
            return model.decode(torch.randn(n, model.latent_dim, device=device), y)
        if hasattr(model, "sample_prior"):  # AAE: the chosen prior (per-class cluster when conditional)
            return model.decode(model.sample_prior(n, y, device=device), y)
        if hasattr(model, "encode") and hasattr(model, "decode"):  # plain AE: Gaussian fitted to codes
            if images is None:
                raise ValueError("a plain autoencoder has no prior: pass images=(N, C, H, W) "
                                 "to fit its code distribution")
            x = images.to(device)
            codes = model.encode(x, _labels(None, x.shape[0], num_classes, device))
            mean = codes.mean(0)
            std = codes.std(0, unbiased=False) if codes.shape[0] > 1 else torch.ones_like(mean)
            return model.decode(mean + std * torch.randn(n, codes.shape[1], device=device), y)
        raise TypeError(f"don't know how to sample from {type(model).__name__}")
    finally:
        model.train(was_training)


def save_sample_grid(
    model: nn.Module,
    path: str | os.PathLike,
    n: int = 64,
    cond: torch.Tensor | int | None = None,
    images: torch.Tensor | None = None,
    nrow: int | None = None,
) -> Path:
    """Write a PNG grid (``torchvision.utils.make_grid``) of :func:`generate_samples`.

    Args:
        model, n, cond, images: as :func:`generate_samples`.
        path: the PNG to write (parent folders are created; written to a temp file, then renamed).
        nrow: tiles per row. Default: ``ceil(sqrt(n))``; the class count for conditional models
            (one class per column); for CycleGAN the number of inputs, so each repair sits under
            its input.

    Returns:
        The path written.
    """
    from torchvision.utils import make_grid, save_image

    samples = generate_samples(model, n=n, cond=cond, images=images).float().clamp(0, 1).cpu()
    if nrow is None:
        if hasattr(model, "generator_repair"):
            nrow = samples.shape[0] // 2
        elif int(getattr(model, "num_classes", 0)) > 0 and cond is None:
            nrow = int(model.num_classes)
        else:
            nrow = max(1, math.ceil(math.sqrt(samples.shape[0])))
    grid = make_grid(samples, nrow=nrow, padding=2, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    save_image(grid, tmp)
    os.replace(tmp, path)
    log.info("wrote %d samples to %s", samples.shape[0], path)
    return path


def train_in_memory(name: str, images: torch.Tensor, labels: torch.Tensor | None = None, *, epochs: int,
                    model_kwargs: dict | None = None, objective_kwargs: dict | None = None, batch_size: int = 64,
                    seed: int = 0) -> nn.Module:
    """Train registry model ``name`` on in-memory tensors through the project's :class:`Trainer`.

    For small generative experiments (the digits behaviour tests and benchmark) that need no
    folder, split or checkpoint. Args: ``images`` ``(N, C, S, S)`` in [0, 1]; ``labels`` ``(N,)``
    int64 for conditional models. Returns the model in ``eval()``.
    """
    from anomaly.registry import create_model, get_spec
    from anomaly.training.objectives import create_objective
    from anomaly.training.trainer import Trainer

    torch.manual_seed(seed)
    model = create_model(name, in_channels=images.shape[1], image_size=images.shape[-1], **(model_kwargs or {}))
    objective = create_objective(get_spec(name).objective, model, **(objective_kwargs or {}))
    trainer = Trainer(objective, out_dir="unused", device="cpu")  # train_batch only: nothing is written
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(images), generator=g)
        for i in range(0, len(images) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            batch = {"image": images[idx]}
            if labels is not None:
                batch["label"] = labels[idx]
            trainer.train_batch(batch)
        objective.on_epoch_end(epoch + 1)
    return model.eval()


def mmd2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Unbiased squared MMD between samples ``a`` ``(n, d)`` and ``b`` ``(m, d)``, RBF kernel with
    the median distance within ``b`` as bandwidth (how far encoder codes are from the prior)."""
    s = torch.cdist(b, b).median()

    def k(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(u, v) ** 2 / (2 * s * s))

    n, m = len(a), len(b)
    kaa, kbb = k(a, a), k(b, b)
    return float((kaa.sum() - kaa.trace()) / (n * (n - 1)) + (kbb.sum() - kbb.trace()) / (m * (m - 1))
                 - 2 * k(a, b).mean())

"""The objective contract.

An :class:`Objective` wraps a model and declares its training *steps* (``"recon"``,
``"D_latent"``, ``"G"``, …). For each step it names the sub-modules whose parameters that step
updates, and returns ``(loss, logs)`` from :meth:`Objective.loss`. The trainer owns the rest:
it freezes every parameter outside the step's group (as pytorch-CycleGAN-and-pix2pix's
``set_requires_grad``), calls ``backward()``, clips, and steps that step's optimizer. Writing the
update once gives every family AMP, clipping, checkpoints, resume and logging.

A batch is a dict: ``"image"`` ``(N, C, H, W)`` float in [0, 1]; optional ``"label"`` ``(N,)``
int64 (condition); optional ``"target"`` ``(N, C, H, W)`` (the clean image when ``image`` carries a
synthetic defect) and ``"mask"`` ``(N, 1, H, W)``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict

import torch
from torch import nn

__all__ = ["Batch", "Step", "Objective", "register_objective", "create_objective", "list_objectives"]

Batch = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Step:
    """One update of an alternating optimisation.

    Attributes:
        name: the step's name, used in logs and optimizer state (``"D_latent"``).
        modules: attribute names of the model's sub-modules this step updates.
        lr: learning rate of this step's Adam optimizer (``None``: the trainer's default).
        betas: Adam betas (GANs use (0.5, 0.999), as DCGAN).
        every: run this step once every ``every`` batches (e.g. generator steps under WGAN).
        until_epoch: run this step only in the first ``until_epoch`` epochs (``None``: always); later
            epochs train the other steps alone (e.g. a segmenter reading a finished generator).
    """

    name: str
    modules: tuple[str, ...]
    lr: float | None = None
    betas: tuple[float, float] = (0.5, 0.999)
    every: int = 1
    until_epoch: int | None = None


class Objective:
    """Base class. Subclasses set :attr:`steps` in ``__init__`` and implement :meth:`loss`.

    Args:
        model: the zoo module being trained.
    """

    name: str = ""

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        self.model = model
        self.hparams = hparams
        self.steps: tuple[Step, ...] = ()

    def parameters(self, step: Step) -> list[nn.Parameter]:
        """Parameters updated by ``step`` (from its named sub-modules, deduplicated)."""
        seen: set[int] = set()
        params: list[nn.Parameter] = []
        for attr in step.modules:
            module = self.model.get_submodule(attr)
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def loss(self, step: str, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of ``step`` on ``batch`` and a dict of floats to log."""
        raise NotImplementedError

    @torch.no_grad()
    def validation_error(self, batch: Batch) -> torch.Tensor:
        """Per-image reconstruction error ``(N,)`` used to pick the best checkpoint.

        Default: mean absolute error of ``model(image, label)`` against ``target`` (or ``image``).
        """
        x = batch["image"]
        x_hat = self.model(x, batch.get("label"))
        target = batch.get("target", x)
        return (x_hat - target).abs().flatten(1).mean(1)

    def on_epoch_end(self, epoch: int) -> None:
        """Hook for schedules (e.g. KL warm-up). Default: nothing."""


_OBJECTIVES: dict[str, Callable[..., Objective]] = {}
_OBJECTIVE_MODULES = ("anomaly.training.objectives.aae", "anomaly.training.objectives.autoencoder", "anomaly.training.objectives.gan", "anomaly.training.objectives.cyclegan")


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator registering an :class:`Objective` under ``name``."""

    def wrap(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        _OBJECTIVES[name] = cls
        return cls

    return wrap


def _load() -> None:
    for module in _OBJECTIVE_MODULES:
        importlib.import_module(module)


def list_objectives() -> list[str]:
    """Registered objective names."""
    _load()
    return sorted(_OBJECTIVES)


def create_objective(name: str, model: nn.Module, **hparams: Any) -> Objective:
    """Build the objective ``name`` for ``model``; unknown names list the choices."""
    _load()
    if name not in _OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; expected one of {sorted(_OBJECTIVES)}")
    return _OBJECTIVES[name](model, **hparams)

"""The one training loop. It is the only place that calls ``backward()`` and ``step()``.

For every batch it runs the objective's steps in order (``recon``, ``D_latent``, ``G_latent``…):
it enables gradients only for that step's parameter group (the rest are frozen, as in
pytorch-CycleGAN-and-pix2pix's ``set_requires_grad``), computes ``(loss, logs)`` from the
objective, back-propagates, clips and steps that group's optimizer. Written once, this gives
every family the same budget handling, checkpoints, resume, progress and loss log.

A budget is ``epochs`` and/or ``max_minutes``: when time runs out the loop stops after the
current batch, validates, and writes a checkpoint that export can use.

Example::

    trainer = Trainer(objective, out_dir="runs/x", epochs=20, max_minutes=5)
    result = trainer.fit(train_loader, val_loader)
"""
from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from anomaly.training.objectives.base import Objective, Step

__all__ = ["Trainer", "TrainResult", "save_checkpoint", "load_checkpoint"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did."""

    epochs_done: int
    steps_done: int
    best_val: float
    last_val: float
    stopped: str  # "epochs" or "time"
    best_checkpoint: Path
    last_checkpoint: Path
    seconds: float


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; a clear error when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here (expected a file written by `anomaly train`)")
    return torch.load(path, map_location=map_location, weights_only=False)


def _to_device(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class Trainer:
    """Runs an :class:`Objective` over a data loader within a budget.

    Args:
        objective: what to optimise (owns the model).
        out_dir: run folder; checkpoints go to ``out_dir/checkpoints/{last,best}.pt`` and the
            per-epoch loss log to ``out_dir/losses.csv``.
        epochs: maximum number of epochs.
        max_minutes: wall-clock budget (``None``: unlimited).
        lr: default learning rate for steps that do not set their own.
        grad_clip: max gradient norm per step (``None``/0 disables).
        lr_decay_from: CycleGAN's schedule: every step keeps its learning rate for this fraction of
            ``epochs``, then it falls linearly, epoch by epoch, to ``1 / (n + 1)`` of it in the last
            of the ``n`` decay epochs. ``None``: constant. Set by epochs, so a run that
            ``max_minutes`` stops early may not reach the decay.
        device: ``cpu``, ``cuda`` or ``auto``.
        extra_state: saved into every checkpoint (the resolved config, the model's name/kwargs).
        progress: called with event dicts (``{"event": "batch"|"epoch", ...}``) for a CLI display.
    """

    def __init__(
        self,
        objective: Objective,
        *,
        out_dir: str | os.PathLike,
        epochs: int = 10,
        max_minutes: float | None = None,
        lr: float = 2e-4,
        grad_clip: float | None = 5.0,
        lr_decay_from: float | None = None,
        device: str = "auto",
        extra_state: dict[str, Any] | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.objective = objective
        self.model = objective.model.to(self.device)
        self.out_dir = Path(out_dir)
        self.epochs = epochs
        self.max_minutes = max_minutes
        self.grad_clip = grad_clip
        self.extra_state = extra_state or {}
        self.progress = progress
        self.steps: tuple[Step, ...] = objective.steps
        if not self.steps:
            raise ValueError(f"objective {objective.name!r} declares no steps")
        self.params = {s.name: objective.parameters(s) for s in self.steps}
        self.optimizers = {
            s.name: torch.optim.Adam(self.params[s.name], lr=s.lr if s.lr is not None else lr, betas=s.betas) for s in self.steps
        }
        if lr_decay_from is not None and not 0.0 <= lr_decay_from < 1.0:
            raise ValueError(f"lr_decay_from must be in [0, 1), got {lr_decay_from}")
        self.lr_decay_from = lr_decay_from
        # the constructed rates, not a resumed optimizer's (whose saved rate is already decayed)
        self._base_lrs = {k: [g["lr"] for g in o.param_groups] for k, o in self.optimizers.items()}
        self._all_params = list(self.model.parameters())
        self.epoch = 0
        self.global_step = 0
        self.best_val = math.inf

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def state(self, val: float) -> dict[str, Any]:
        return {
            **self.extra_state,
            "model_state": self.model.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_val": self.best_val,
            "val": val,
        }

    def resume(self, path: str | os.PathLike | None = None) -> None:
        """Continue from ``path`` (default: this run's ``last.pt``): weights, optimizers, counters."""
        ckpt = load_checkpoint(path or self.checkpoint_dir / "last.pt", self.device)
        self.model.load_state_dict(ckpt["model_state"])
        for k, o in self.optimizers.items():
            if k in ckpt.get("optimizers", {}):
                o.load_state_dict(ckpt["optimizers"][k])
        self.epoch = int(ckpt["epoch"])
        self.global_step = int(ckpt["global_step"])
        self.best_val = float(ckpt.get("best_val", math.inf))
        log.info("resumed from epoch %d (best validation error %.5f)", self.epoch, self.best_val)

    def lr_factor(self, epoch: int) -> float:
        """Learning-rate multiplier of 0-based ``epoch`` (see ``lr_decay_from``)."""
        if self.lr_decay_from is None:
            return 1.0
        start = int(round(self.lr_decay_from * self.epochs))
        if epoch < start:
            return 1.0
        return max(0.0, 1.0 - (epoch - start + 1) / (self.epochs - start + 1))

    def _apply_lr(self) -> None:
        factor = self.lr_factor(self.epoch)
        for k, o in self.optimizers.items():
            for g, base in zip(o.param_groups, self._base_lrs[k]):
                g["lr"] = base * factor

    # -- one step ------------------------------------------------------------------------------
    def _set_trainable(self, step: Step) -> None:
        for p in self._all_params:
            p.requires_grad_(False)
        for p in self.params[step.name]:
            p.requires_grad_(True)

    def train_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Run every due step of the objective on one batch; returns the merged logs."""
        self.model.train()
        logs: dict[str, float] = {}
        for step in self.steps:
            if self.global_step % step.every or (step.until_epoch is not None and self.epoch >= step.until_epoch):
                continue
            self._set_trainable(step)
            opt = self.optimizers[step.name]
            opt.zero_grad(set_to_none=True)
            loss, step_logs = self.objective.loss(step.name, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step.name!r} produced a non-finite loss at global step {self.global_step}")
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params[step.name], self.grad_clip)
            opt.step()
            logs.update(step_logs)
        for p in self._all_params:
            p.requires_grad_(True)
        self.global_step += 1
        return logs

    @torch.no_grad()
    def validate(self, loader: Iterable[dict] | None) -> float:
        """Mean per-image reconstruction error on ``loader`` (``nan`` without one)."""
        if loader is None:
            return math.nan
        self.model.eval()
        total, n = 0.0, 0
        for batch in loader:
            err = self.objective.validation_error(_to_device(batch, self.device))
            total += float(err.sum())
            n += err.numel()
        return total / max(n, 1)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, train_loader: Iterable[dict], val_loader: Iterable[dict] | None = None) -> TrainResult:
        """Train until ``epochs`` or ``max_minutes``; always leaves ``last.pt`` and ``best.pt``."""
        start = time.monotonic()
        deadline = start + self.max_minutes * 60 if self.max_minutes else math.inf
        n_batches = len(train_loader) if hasattr(train_loader, "__len__") else None
        stopped = "epochs"
        val = math.nan
        log_path = self.out_dir / "losses.csv"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        while self.epoch < self.epochs:
            sums: dict[str, float] = {}
            count = 0
            t_epoch = time.monotonic()
            self._apply_lr()
            for i, batch in enumerate(train_loader):
                logs = self.train_batch(_to_device(batch, self.device))
                count += 1
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                if self.progress:
                    self.progress({"event": "batch", "epoch": self.epoch + 1, "epochs": self.epochs, "batch": i + 1,
                                   "batches": n_batches, "logs": logs, "elapsed": time.monotonic() - start})
                if time.monotonic() > deadline:
                    stopped = "time"
                    break
            self.epoch += 1
            means = {k: v / max(count, 1) for k, v in sums.items()}
            val = self.validate(val_loader)
            improved = not math.isnan(val) and val < self.best_val
            # Once a step has stopped (Step.until_epoch), the validation error measures a frozen part and
            # cannot rank the steps still training: best.pt follows last.pt from then on, so the exported
            # model is the finished part plus the latest state of the rest.
            if any(s.until_epoch is not None and self.epoch > s.until_epoch for s in self.steps):
                improved = not math.isnan(val)
            if improved:
                self.best_val = val
            row = {"epoch": self.epoch, "seconds": round(time.monotonic() - t_epoch, 3), **means, "val_error": val}
            self._append_log(log_path, row)
            save_checkpoint(self.checkpoint_dir / "last.pt", self.state(val))
            if improved or math.isnan(val) or not (self.checkpoint_dir / "best.pt").exists():
                save_checkpoint(self.checkpoint_dir / "best.pt", self.state(val))
            log.info("epoch %d/%d %s val_error=%.5f%s", self.epoch, self.epochs,
                     " ".join(f"{k}={v:.4f}" for k, v in means.items()), val, " *" if improved else "")
            if self.progress:
                self.progress({"event": "epoch", "epoch": self.epoch, "epochs": self.epochs, "logs": means,
                               "val_error": val, "improved": improved, "elapsed": time.monotonic() - start})
            self.objective.on_epoch_end(self.epoch)
            if stopped == "time":
                log.info("time budget of %.1f min reached after epoch %d", self.max_minutes, self.epoch)
                break
        return TrainResult(self.epoch, self.global_step, self.best_val, val, stopped,
                           self.checkpoint_dir / "best.pt", self.checkpoint_dir / "last.pt", time.monotonic() - start)

    @staticmethod
    def _append_log(path: Path, row: dict[str, Any]) -> None:
        # The header grows if a later epoch logs a new key (e.g. a step that runs every k batches).
        rows: list[dict[str, Any]] = []
        fields: list[str] = []
        if path.exists():
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                fields = list(reader.fieldnames or [])
                rows = list(reader)
        for k in row:
            if k not in fields:
                fields.append(k)
        rows.append(row)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)

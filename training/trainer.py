"""The one training loop. It is the only place that calls ``backward()`` and ``step()``.

For every batch it runs the objective's steps in order (``recon``, ``D_latent``, ``G_latent``…):
it enables gradients only for that step's parameter group (the rest are frozen, as in
pytorch-CycleGAN-and-pix2pix's ``set_requires_grad``), computes ``(loss, logs)`` from the
objective, back-propagates, clips and steps that group's optimizer. Written once, this gives
every family the same budget handling, checkpoints, resume, progress and loss log.

A budget is ``epochs`` and/or ``max_minutes``: when time runs out the loop stops after the
current batch, validates, and writes a checkpoint that export can use.

Under ``torchrun`` the same loop is data-parallel (:mod:`anomaly.training.distributed`): each
rank reads its share of every global batch, each step's gradients are averaged over the ranks
before that step's optimizer moves, rank 0 decides when the time budget is spent, and rank 0
alone writes checkpoints, ``losses.csv`` and TensorBoard events.

With a ``logdir`` the loop writes TensorBoard event files: every step's logged losses under
``<step>/<name>`` (``D/D_real``, ``recon/recon``, ``D_latent/D_latent`` …) at each global step;
per epoch the means (``epoch/<name>``), ``val/error``, each step's learning rate (``lr/<step>``)
and ``val/reconstructions``, a grid of validation inputs (top row), their reconstructions and
residual maps ``|x - x_hat|`` (bottom row, scaled by the grid's largest residual).

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

from anomaly.training import distributed as ddp
from anomaly.training.objectives.base import Objective, Step

__all__ = ["Trainer", "TrainResult", "CheckpointError", "save_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state", "reconstruction_grid"]

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


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely: damaged, or holding objects other than tensors and
    plain Python values (unpickling those could run code from the file)."""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, with ``torch.load(weights_only=True)``:
    only tensors and plain Python values (dicts, lists, tuples, numbers, strings) are unpickled, so a
    checkpoint from elsewhere cannot run code. Every checkpoint ``anomaly train`` writes is of that kind.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is damaged or holds other objects (the message names them).
    """
    import pickle
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here (expected a file written by `anomaly train`)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged or foreign
        raise CheckpointError(f"{path}: not a readable checkpoint (not the zip archive torch.save writes); expected a "
                              "file written by `anomaly train`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).strip().splitlines()
        found = next((line.strip() for line in detail if "GLOBAL" in line or "Unsupported" in line), detail[0] if detail else "")
        raise CheckpointError(f"{path}: not loadable as tensors and plain values (torch.load weights_only=True): {found}. "
                              "Checkpoints written by `anomaly train` are; this one holds other objects, and unpickling "
                              "them could run code from the file — it is refused") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                              "expected a file written by `anomaly train`") from exc
    if not isinstance(ckpt, dict) or "model_state" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of `anomaly train` (expected a dict with 'model_state', "
                              f"found {type(ckpt).__name__})")
    return ckpt


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The random generators' states as tensors and plain values (what ``weights_only`` loads):
    Python's ``random``, NumPy's global generator, torch's CPU (and CUDA) generators, and
    ``generators`` (e.g. a data loader's shuffling generator) by name."""
    import random

    import numpy as np

    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": [int(k) for k in np_state["state"]["key"]],
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`rng_state` saved (a generator it did not save keeps its state)."""
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "state": {"key": np.asarray(n["key"], dtype=np.uint32),
                         "pos": n["pos"]}, "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    for name, g in (generators or {}).items():
        if name in state.get("generators", {}):
            g.set_state(state["generators"][name].cpu())


def reconstruction_grid(x: torch.Tensor, x_hat: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """One image ``(C', 3H + 4 pad, N W + (N + 1) pad)`` in [0, 1]: inputs ``x`` ``(N, C, H, W)`` on
    the top row, reconstructions ``x_hat`` below, residual maps ``|x - x_hat|`` (channel mean,
    divided by the largest residual of the grid, so rows compare) at the bottom. ``C'`` is ``C``
    (1 or 3), white padding between tiles."""
    x, x_hat = x.detach().float().cpu().clamp(0, 1), x_hat.detach().float().cpu().clamp(0, 1)
    n, c, h, w = x.shape
    residual = (x - x_hat).abs().mean(1, keepdim=True)
    residual = (residual / residual.max().clamp_min(1e-8)).expand(n, c, h, w)
    grid = torch.ones(c, 3 * h + 4 * pad, n * w + (n + 1) * pad)
    for row, images in enumerate((x, x_hat, residual)):
        top = pad + row * (h + pad)
        for i in range(n):
            left = pad + i * (w + pad)
            grid[:, top:top + h, left:left + w] = images[i]
    return grid


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
        generators: torch generators whose state goes into every checkpoint with the global random
            states (:func:`rng_state`) and comes back on :meth:`resume` (e.g. the data loader's
            shuffling generator), so a resumed run draws what the uninterrupted one would have.
        progress: called with event dicts (``{"event": "batch"|"epoch", ...}``) for a CLI display
            (on rank 0 only under torchrun).
        logdir: folder for TensorBoard event files (``None``: none).
        seed: seed of the distributed sampler's shuffling (torchrun only; epoch ``e`` uses
            ``seed + e``, so a resumed run reads what an uninterrupted one would).
        clock: the time source of the ``max_minutes`` budget.
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
        generators: dict[str, torch.Generator] | None = None,
        logdir: str | os.PathLike | None = None,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if ddp.torchrun_env() and self.device.type == "cuda":  # one GPU per process
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(self.device)
        self.dist = ddp.init_from_env(self.device)  # the process group lives until the process exits
        self.logdir = Path(logdir) if logdir is not None else None
        self.seed = seed
        self.clock = clock
        self._writer = None
        self.objective = objective
        self.model = objective.model.to(self.device)
        self.out_dir = Path(out_dir)
        self.epochs = epochs
        self.max_minutes = max_minutes
        self.grad_clip = grad_clip
        self.extra_state = extra_state or {}
        self.generators = dict(generators or {})
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
            "rng": rng_state(self.generators),
        }

    def resume(self, path: str | os.PathLike | None = None) -> None:
        """Continue from ``path`` (default: this run's ``last.pt``): weights, optimizers, counters and
        random states."""
        ckpt = load_checkpoint(path or self.checkpoint_dir / "last.pt", self.device)
        self.model.load_state_dict(ckpt["model_state"])
        for k, o in self.optimizers.items():
            if k in ckpt.get("optimizers", {}):
                o.load_state_dict(ckpt["optimizers"][k])
        self.epoch = int(ckpt["epoch"])
        self.global_step = int(ckpt["global_step"])
        self.best_val = float(ckpt.get("best_val", math.inf))
        if "rng" in ckpt:  # checkpoints written before random states were saved resume with fresh ones
            set_rng_state(ckpt["rng"], self.generators)
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
        """Run every due step of the objective on one batch; returns the merged logs.

        Under torchrun the logs are the means over the ranks (they travel with the gradients).
        """
        self.model.train()
        logs: dict[str, float] = {}
        for step in self.steps:
            if self.global_step % step.every or (step.until_epoch is not None and self.epoch >= step.until_epoch):
                continue
            self._set_trainable(step)
            opt = self.optimizers[step.name]
            opt.zero_grad(set_to_none=True)
            loss, step_logs = self.objective.loss(step.name, batch)
            if not self.dist.enabled and not torch.isfinite(loss):
                raise FloatingPointError(f"step {step.name!r} produced a non-finite loss at global step {self.global_step}")
            loss.backward()
            if self.dist.enabled:
                # average this group's gradients over the ranks (what DDP does), the logs and the
                # loss with them: every rank then takes the same optimizer step, or every rank raises
                grads = [p.grad for p in self.params[step.name] if p.grad is not None]
                keys = list(step_logs)
                values = ddp.all_reduce_mean(grads, self.dist, [float(loss.detach()), *(step_logs[k] for k in keys)])
                if not math.isfinite(values[0]):
                    raise FloatingPointError(f"step {step.name!r} produced a non-finite loss at global step "
                                             f"{self.global_step} (on at least one of {self.dist.world_size} ranks)")
                step_logs = dict(zip(keys, values[1:]))
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params[step.name], self.grad_clip)
            opt.step()
            logs.update(step_logs)
            if self._writer is not None:
                for k, v in step_logs.items():
                    self._writer.add_scalar(f"{step.name}/{k}", v, self.global_step)
        for p in self._all_params:
            p.requires_grad_(True)
        self.global_step += 1
        return logs

    @torch.no_grad()
    def validate(self, loader: Iterable[dict] | None) -> float:
        """Mean per-image reconstruction error on ``loader`` (``nan`` without one).

        Under torchrun each rank passes its share; the sums and counts are combined over the ranks.
        """
        if loader is None:
            return math.nan
        self.model.eval()
        total, n = 0.0, 0
        for batch in loader:
            err = self.objective.validation_error(_to_device(batch, self.device))
            total += float(err.sum())
            n += err.numel()
        total, n = ddp.all_reduce_mean([], self.dist, [total, n])  # means of both: the ratio is the sum's
        return total / n if n > 0 else 0.0

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, train_loader: Iterable[dict], val_loader: Iterable[dict] | None = None) -> TrainResult:
        """Train until ``epochs`` or ``max_minutes``; always leaves ``last.pt`` and ``best.pt``.

        Under torchrun both loaders must be :class:`~torch.utils.data.DataLoader` s: each rank
        reads its share (``train_loader.batch_size`` is the global batch).
        """
        start = time.monotonic()
        deadline = self.clock() + self.max_minutes * 60 if self.max_minutes else math.inf
        ctx = self.dist
        main = ctx.is_main
        preview = self._preview_batch(val_loader) if main and self.logdir is not None else None
        if ctx.enabled:
            train_loader = ddp.shard_loader(train_loader, ctx, seed=self.seed)
            if val_loader is not None:
                val_loader = ddp.shard_loader(val_loader, ctx, seed=self.seed, train=False)
            ddp.broadcast_module(self.model, ctx)  # every rank starts from rank 0's weights
            if ctx.rank > 0:  # its own noise (GAN codes, priors), the same weights; not the same
                # noise again after a resume (every rank restores rank 0's saved random state)
                torch.manual_seed(torch.initial_seed() + 1_000_003 * ctx.rank + self.global_step)
        n_batches = len(train_loader) if hasattr(train_loader, "__len__") else None
        stopped = "epochs"
        val = math.nan
        log_path = self.out_dir / "losses.csv"
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._open_writer()
        try:
            while self.epoch < self.epochs:
                sums: dict[str, float] = {}
                count = 0
                t_epoch = time.monotonic()
                self._apply_lr()
                if ctx.enabled:
                    train_loader.sampler.set_epoch(self.epoch)
                for i, batch in enumerate(train_loader):
                    logs = self.train_batch(_to_device(batch, self.device))
                    count += 1
                    for k, v in logs.items():
                        sums[k] = sums.get(k, 0.0) + v
                    if self.progress and main:
                        self.progress({"event": "batch", "epoch": self.epoch + 1, "epochs": self.epochs, "batch": i + 1,
                                       "batches": n_batches, "logs": logs, "elapsed": time.monotonic() - start})
                    # rank 0's clock decides for all: every rank stops after the same step
                    if ddp.agree(self.clock() > deadline, ctx, self.device):
                        stopped = "time"
                        break
                self.epoch += 1
                means = {k: v / max(count, 1) for k, v in sums.items()}
                ddp.sync_buffers(self.model, ctx)  # one set of batch-norm statistics for validation and checkpoints
                val = self.validate(val_loader)
                improved = not math.isnan(val) and val < self.best_val
                # Once a step has stopped (Step.until_epoch), the validation error measures a frozen part and
                # cannot rank the steps still training: best.pt follows last.pt from then on, so the exported
                # model is the finished part plus the latest state of the rest.
                if any(s.until_epoch is not None and self.epoch > s.until_epoch for s in self.steps):
                    improved = not math.isnan(val)
                if improved:
                    self.best_val = val
                if main:
                    row = {"epoch": self.epoch, "seconds": round(time.monotonic() - t_epoch, 3), **means, "val_error": val}
                    self._append_log(log_path, row)
                    save_checkpoint(self.checkpoint_dir / "last.pt", self.state(val))
                    if improved or math.isnan(val) or not (self.checkpoint_dir / "best.pt").exists():
                        save_checkpoint(self.checkpoint_dir / "best.pt", self.state(val))
                    self._log_epoch(means, val, preview)
                    log.info("epoch %d/%d %s val_error=%.5f%s", self.epoch, self.epochs,
                             " ".join(f"{k}={v:.4f}" for k, v in means.items()), val, " *" if improved else "")
                    if self.progress:
                        self.progress({"event": "epoch", "epoch": self.epoch, "epochs": self.epochs, "logs": means,
                                       "val_error": val, "improved": improved, "elapsed": time.monotonic() - start})
                self.objective.on_epoch_end(self.epoch)
                if stopped == "time":
                    if main:
                        log.info("time budget of %.1f min reached after epoch %d", self.max_minutes, self.epoch)
                    break
            ddp.barrier(ctx)  # rank 0's last files are complete before any rank returns
        finally:
            self._close_writer()
        return TrainResult(self.epoch, self.global_step, self.best_val, val, stopped,
                           self.checkpoint_dir / "best.pt", self.checkpoint_dir / "last.pt", time.monotonic() - start)

    # -- TensorBoard ---------------------------------------------------------------------------
    def _open_writer(self) -> None:
        if self.logdir is None or self._writer is not None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard comes with the train extra
            raise ImportError("TensorBoard logging needs the tensorboard package (pip install 'anomaly[train]'); "
                              "or train with --no-tensorboard") from exc
        # a resumed run drops events a crashed run wrote after its last checkpoint
        self._writer = SummaryWriter(str(self.logdir), purge_step=self.global_step or None)

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    @staticmethod
    def _preview_batch(val_loader: Iterable[dict] | None, n: int = 8) -> dict[str, Any] | None:
        """Up to ``n`` validation images for the epoch grid (reading validation has no side effects)."""
        if val_loader is None:
            return None
        # a DataLoader's iterator draws its base seed from torch's global generator: drawn here it
        # would shift every later random number, so runs with and without TensorBoard (and resumed
        # ones) would train differently
        with torch.random.fork_rng(devices=[]):
            for batch in val_loader:
                return {k: (v[:n] if torch.is_tensor(v) else v) for k, v in batch.items()}
        return None

    @torch.no_grad()
    def _log_epoch(self, means: dict[str, float], val: float, preview: dict[str, Any] | None) -> None:
        w = self._writer
        if w is None:
            return
        for k, v in means.items():
            w.add_scalar(f"epoch/{k}", v, self.epoch)
        if not math.isnan(val):
            w.add_scalar("val/error", val, self.epoch)
        for k, o in self.optimizers.items():
            w.add_scalar(f"lr/{k}", o.param_groups[0]["lr"], self.epoch)
        if preview is not None:
            batch = _to_device(preview, self.device)
            self.model.eval()
            x = batch["image"].float()
            x_hat = self.model(x, batch.get("label")).float().clamp(0, 1)
            w.add_image("val/reconstructions", reconstruction_grid(x, x_hat), self.epoch)
        w.flush()

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

"""Data-parallel training across the processes that ``torchrun`` starts (DDP inside the one loop).

``torchrun --nproc-per-node N -m anomaly train ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``) in their
environment. :class:`~anomaly.training.trainer.Trainer` sees them and becomes data-parallel:

- one process group from that environment (``gloo`` on CPU, ``nccl`` on CUDA, one GPU per process:
  ``cuda:LOCAL_RANK``);
- every process starts from rank 0's weights (:func:`broadcast_module`);
- each rank reads its share of every global batch (:func:`shard_loader`: a
  :class:`~torch.utils.data.DistributedSampler` whose epoch is set every epoch), so
  ``--batch-size`` is the *global* batch: N processes see the same global batches as one;
- after each objective step's ``backward()`` the gradients of that step's parameter group are
  averaged over the ranks before the step's own optimizer moves (:func:`all_reduce_mean`). This is
  what DDP does, written for several optimizers and alternating steps (D, G, E, recon, D_latent …)
  where wrapping every sub-module in ``DistributedDataParallel`` would not fit: objectives call
  sub-module methods (``model.discriminate``, ``model.generate``), not a wrapped ``forward``. With
  identical starting weights, identical averaged gradients and identical optimizer states, the
  weights stay identical on every rank. The step's logged losses travel in the same message, so
  what rank 0 logs is the mean over all ranks;
- batch-norm running statistics (computed per rank, as DDP without ``SyncBatchNorm`` does) are
  averaged at every epoch's end (:func:`sync_buffers`), so checkpoints and validation see one model;
- the time budget is decided by rank 0 and broadcast (:func:`agree`), so all ranks stop after the
  same step; rank 0 alone writes files.

Outside torchrun the trainer calls none of this; the collectives are no-ops for a single process.
The process group, once made, lives until the process exits, so several trainings in one process
(e.g. a script that trains two models under torchrun) share it.

Example::

    ctx = init_from_env(torch.device("cpu"))   # DistContext(rank=1, world_size=2, local_rank=1)
    loader = shard_loader(loader, ctx, seed=0)
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

__all__ = ["DistContext", "env_rank", "is_main_process", "torchrun_env", "init_from_env", "shard_loader",
           "shard_dataset", "broadcast_module", "all_reduce_mean", "sync_buffers", "agree", "barrier"]

log = logging.getLogger(__name__)

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node.

    ``enabled`` is true under torchrun (even with one process, so that a 1-process torchrun run
    reads the same global batches as an N-process one); a plain run has ``DistContext()``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs, TensorBoard and the config."""
        return self.rank == 0


def torchrun_env() -> bool:
    """True when torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) are all set."""
    return all(k in os.environ for k in _ENV)


def env_rank() -> int:
    """This process's rank from the environment (0 outside torchrun); needs no process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if torchrun_env() else 0


def is_main_process() -> bool:
    """True on rank 0 and in a plain (non-torchrun) run: the process that may write files."""
    return env_rank() == 0


def init_from_env(device: torch.device, timeout_minutes: float = 30.0) -> DistContext:
    """Join the process group torchrun describes (or reuse an initialised one).

    Args:
        device: the training device; ``cuda`` selects ``nccl`` (and ``cuda:LOCAL_RANK`` must be
            the device), anything else ``gloo``.
        timeout_minutes: how long a collective waits for a missing rank before failing.

    Returns:
        The :class:`DistContext`; ``DistContext()`` (disabled) outside torchrun.

    Raises:
        ValueError: torchrun's variables are malformed.
    """
    if not torchrun_env():
        return DistContext()
    try:
        rank, world, local = (int(os.environ[k]) for k in _ENV)
    except ValueError as exc:
        raise ValueError(f"torchrun environment: expected integers in {', '.join(_ENV)}, found "
                         f"{', '.join(os.environ[k] for k in _ENV)}") from exc
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; cannot train under torchrun")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        # one group for the process's life: later trainings reuse it (under torchrun's agent, a
        # group destroyed and made again would meet the first one's stale rendezvous keys and hang)
        atexit.register(_destroy)
        log.info("rank %d of %d joined the %s process group", rank, world, backend)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, enabled=True)


def shard_dataset(dataset, ctx: DistContext):
    """Every ``world_size``-th item of ``dataset`` from ``rank`` on (validation: nothing repeated)."""
    if not ctx.enabled or ctx.world_size == 1:
        return dataset
    return Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))


def shard_loader(loader: DataLoader, ctx: DistContext, *, seed: int, train: bool = True) -> DataLoader:
    """This rank's view of ``loader``: the same dataset and collate, ``batch_size // world_size`` a rank.

    Training (``train=True``): a shuffling :class:`DistributedSampler` (``seed``; call
    ``loader.sampler.set_epoch(epoch)`` every epoch) that drops the tail so every rank runs the same
    number of steps; rank ``r`` reads positions ``r, r + N, …`` of the epoch's permutation, so the N
    ranks' batches together are exactly one global batch of ``loader.batch_size``.
    Validation (``train=False``): an unshuffled, unpadded share (:func:`shard_dataset`).

    Raises:
        TypeError: ``loader`` is not a :class:`~torch.utils.data.DataLoader`.
        ValueError: the global batch is smaller than the number of processes.
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(f"distributed training needs a torch DataLoader to shard, got {type(loader).__name__}")
    global_batch = loader.batch_size or 1
    per_rank = global_batch // ctx.world_size
    if per_rank < 1:
        raise ValueError(f"the global batch of {global_batch} images is smaller than the {ctx.world_size} "
                         f"processes; use --batch-size {ctx.world_size} or more")
    if global_batch % ctx.world_size and ctx.is_main:
        log.warning("global batch %d is not divisible by %d processes: each process takes %d (global %d)",
                    global_batch, ctx.world_size, per_rank, per_rank * ctx.world_size)
    common = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                  worker_init_fn=loader.worker_init_fn)
    if not train:
        return DataLoader(shard_dataset(loader.dataset, ctx), batch_size=global_batch, shuffle=False, **common)
    sampler = DistributedSampler(loader.dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    return DataLoader(loader.dataset, batch_size=per_rank, sampler=sampler, drop_last=loader.drop_last, **common)


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``module`` (identical starts)."""
    if not ctx.enabled or ctx.world_size == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


@torch.no_grad()
def all_reduce_mean(tensors: Sequence[torch.Tensor], ctx: DistContext,
                    values: Sequence[float] = ()) -> list[float]:
    """Average ``tensors`` (in place) and ``values`` over the ranks in one message per dtype.

    Args:
        tensors: e.g. the gradients of one step's parameter group (the same shapes, in the same
            order, on every rank).
        values: floats that travel with them (the step's logged losses).

    Returns:
        ``values`` averaged over the ranks.
    """
    values = [float(v) for v in values]
    if not ctx.enabled or ctx.world_size == 1:
        return values
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    carried = None
    if values:  # ride along with the float32 gradients when there are some: one message
        dtype = torch.float32 if torch.float32 in groups or not groups else torch.float64
        device = tensors[0].device if tensors else _collective_device()
        carried = torch.tensor(values, dtype=dtype, device=device)
        groups.setdefault(dtype, []).append(carried)
    for dtype, ts in groups.items():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= ctx.world_size
        offset = 0
        for t in ts:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
    if carried is not None:
        values = [float(v) for v in carried.tolist()]
    return values


@torch.no_grad()
def sync_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Average floating-point buffers (batch-norm running statistics) over the ranks; others from rank 0."""
    if not ctx.enabled or ctx.world_size == 1:
        return
    floats = [b for b in module.buffers() if b.is_floating_point()]
    if floats:
        all_reduce_mean(floats, ctx)
    for b in module.buffers():
        if not b.is_floating_point():
            dist.broadcast(b, src=0)


def agree(flag: bool, ctx: DistContext, device: torch.device | None = None) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. "the time budget is spent": all ranks stop together)."""
    if not ctx.enabled or ctx.world_size == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device or _collective_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for one process)."""
    if ctx.enabled and ctx.world_size > 1:
        dist.barrier()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

"""Batch audits on a Ray cluster: the same audit, its scoring spread over Ray Data actors.

``anomaly audit BUNDLE INPUTS --out OUT --engine ray [--address auto|HOST:PORT] [--actors N]``

Only the scoring moves: :func:`anomaly.deploy.audit.run_audit` still expands the inputs, checks and
locks ``OUT``, skips what its journal holds, and commits every record to ``results.jsonl`` /
``results.csv`` and ``summary.json``, so a Ray audit's folder is the single-process audit's folder
(``anomaly review`` reads either) and resuming works the same way. This module is the record source
it uses instead of the in-process runtime:

    paths (Ray Data, from the driver's to-do list)
      -> ``map_batches(_Scorer)``: an actor pool, each actor holding one :class:`~anomaly.deploy.runtime.Runtime`
         (one onnxruntime session, the runtime's own decoding and scoring) and the audit's own
         per-image rendering (:func:`anomaly.deploy.render.finish_record`), which writes the heatmaps,
         masks and maps into ``OUT`` — a path every node must see (a shared filesystem)
      -> records (JSON) streamed back to the driver, which journals them as they arrive.

Why the driver's journal and not Parquet shards merged at the end: a record is durable as soon as
the driver has it, resuming after a killed driver is the single-process audit's own resume (the
journal is the one source of truth, with its torn-line repair), and nothing has to be merged or
deduplicated. The driver's work per image is one JSON line (a few microseconds).

Fault tolerance is Ray Data's: its pool actors restart (``max_restarts=-1``) and their batches are
retried (``max_task_retries=-1``), its defaults for actor pools, so a killed worker process costs its
batch again, never the job (``tests/test_ray_audit.py`` kills one). A file
that cannot be read or rendered is an error record, never a failed task.

Decoding happens inside the actors (the runtime's decode threads), not in separate Ray tasks: the
decoded originals then never travel through the object store (a 12-MP frame is 36 MB), and each
actor's CPU budget covers its own decoding.

Example::

    from anomaly.deploy.audit import run_audit
    run_audit("bundle/", ["s3-mounted/line3/"], "/shared/audit", engine="ray", ray_address="auto", actors=8)
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator, Sequence

log = logging.getLogger(__name__)

__all__ = ["score_with_ray", "RayEngineError"]


class RayEngineError(ValueError):
    """Ray is not installed, or the cluster cannot be reached."""


def _import_ray() -> Any:
    try:
        import pyarrow  # noqa: F401  (the blocks of paths; Ray Data needs it too)
        import ray
        import ray.data  # noqa: F401  (Ray Data is the `ray[data]` extra)
    except ImportError as exc:
        raise RayEngineError("--engine ray needs Ray Data: pip install 'anomaly[ray]' "
                             f"(the ray[data] and pyarrow packages); {exc}") from None
    return ray


def _path_blocks(ray: Any, paths: Sequence[str]) -> Any:
    """A Ray dataset of ``paths`` in one ``path`` column of bytes (``os.fsencode``: a file name that is
    not UTF-8 is a path too), its blocks put in the object store one at a time.

    The blocks are laid out as ``ray.data.from_items`` lays them out (``read_op_min_num_blocks``, at
    least two per cluster CPU, in order), but each is one Arrow array, put before the next is made:
    ``from_items`` needs a dict per path and builds every block before putting any, which raised the
    driver's peak RSS by 208 MiB in a million-path audit (this: by 26 MiB, most of it the blocks).
    """
    import pyarrow as pa

    ctx = ray.data.DataContext.get_current()
    nblocks = max(1, min(len(paths), max(ctx.read_op_min_num_blocks, 2 * int(ray.cluster_resources().get("CPU", 1)))))
    size, extra = divmod(len(paths), nblocks)
    refs, start = [], 0
    for i in range(nblocks):
        end = start + size + (i < extra)
        refs.append(ray.put(pa.table({"path": pa.array([os.fsencode(p) for p in paths[start:end]], type=pa.binary())})))
        start = end
    return ray.data.from_arrow_refs(refs)


class _Scorer:
    """One Ray actor's state: a runtime and the audit's rendering options; scores a batch of paths.

    Args:
        bundle: the bundle folder (every node must see it at this path).
        runtime_kwargs: keyword arguments of :class:`~anomaly.deploy.runtime.Runtime`.
        options: the audit's rendering options (:meth:`RenderOptions.to_dict`).
        keep_image, keep_reconstruction, batch_size: as :meth:`Runtime.score_paths` takes them.
    """

    def __init__(self, bundle: str, runtime_kwargs: dict[str, Any], options: dict[str, Any], keep_image: bool | int,
                 keep_reconstruction: bool, batch_size: int) -> None:
        from anomaly.deploy.render import RenderOptions
        from anomaly.deploy.runtime import Runtime

        self.rt = Runtime(bundle, **runtime_kwargs)
        self.options = RenderOptions.from_dict(options)
        self.keep_image = keep_image
        self.keep_reconstruction = keep_reconstruction
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        from anomaly.deploy.render import error_record, finish_record

        records = []
        paths = [os.fsdecode(p) for p in batch["path"]]  # bytes: see _path_blocks
        for r in self.rt.score_paths(paths, batch_size=self.batch_size, keep_reconstruction=self.keep_reconstruction,
                                     keep_image=self.keep_image):
            if r.error is not None:
                rec = error_record(str(r.path), r.error)
            else:
                try:
                    rec = finish_record(r, self.options)
                except Exception as exc:  # one bad file never fails the task (a retry would fail again)
                    rec = error_record(str(r.path), f"scored, but its outputs could not be written: {exc}")
            records.append(json.dumps(rec, allow_nan=False))
        return {"record": records}


def score_with_ray(bundle: str | os.PathLike, paths: Sequence[str], options: dict[str, Any], *,
                   runtime_kwargs: dict[str, Any], keep_image: bool | int, keep_reconstruction: bool,
                   batch_size: int = 16, actors: int | None = None, address: str | None = None,
                   cpus_per_actor: float = 1.0) -> Iterator[dict[str, Any]]:
    """Score ``paths`` on Ray actors and yield their audit records as they arrive (any order).

    Args:
        bundle: the bundle folder, at a path every Ray node sees.
        paths: the images still to do (absolute paths every node sees).
        options: the audit's rendering options as a dict (``RenderOptions.to_dict()``).
        runtime_kwargs: :class:`~anomaly.deploy.runtime.Runtime` keyword arguments for each actor.
        keep_image, keep_reconstruction, batch_size: as :meth:`Runtime.score_paths`.
        actors: size of the actor pool (default: the cluster's CPUs / ``cpus_per_actor``).
        address: the cluster (``"auto"``, ``"HOST:PORT"``, ``"ray://..."``); ``None``: a Ray already
            initialised in this process, else a local one started here and shut down at the end.
        cpus_per_actor: CPUs Ray reserves for each actor (its onnxruntime threads follow).

    Yields:
        one audit record per path (the journal's JSON objects).

    Raises:
        RayEngineError: Ray is missing or the cluster cannot be reached.
    """
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                     configure_logging=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayEngineError(f"cannot reach the Ray cluster at {address!r}: {exc}") from None
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the audit shows its own progress
        if actors is None:
            actors = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_actor))
        if actors < 1:
            raise RayEngineError(f"--actors must be >= 1, got {actors}")
        kwargs = dict(runtime_kwargs)
        if kwargs.get("threads") is None:  # onnxruntime's threads: the CPUs Ray reserved for the actor
            kwargs["threads"] = max(1, int(cpus_per_actor))
        if not paths:
            return
        scored = _path_blocks(ray, paths).map_batches(
            _Scorer, batch_size=batch_size, concurrency=actors, num_cpus=cpus_per_actor,
            fn_constructor_kwargs={"bundle": str(bundle), "runtime_kwargs": kwargs, "options": options,
                                   "keep_image": keep_image, "keep_reconstruction": keep_reconstruction,
                                   "batch_size": batch_size})
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            for line in batch["record"]:
                yield json.loads(str(line))
    finally:
        if started:
            ray.shutdown()

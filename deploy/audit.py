"""Batch audit: score many images with the deployed runtime; resumable, written incrementally.

``run_audit(bundle, inputs, out)`` scores files, folders (recursive), globs and list files
(``.txt`` / ``.lst``: one path per line) with onnxruntime — no torch — and writes into ``OUT/``:

==========================  ============================================================================
``audit.json``              what this folder was audited with: the bundle's path, ``bundle_sha256`` (the
                            ONNX model's sha256, i.e. the model that made the scores),
                            ``calibration_sha256`` (hash of the calibration in force), that
                            calibration (threshold, pixel threshold, normal-score histogram), the
                            ``category`` a conditional model ran for (``None`` for other models) and the
                            options. Written before the first image.
``results.jsonl``           **the journal**: one JSON object per image, appended and flushed as each
                            image finishes (after its image files are written), so a killed run leaves
                            only complete lines (a truncated last line is dropped on resume).
``results.csv``             the same rows as a table: rebuilt from the journal when a run starts, then
                            appended to and flushed every ``csv_every`` images and at the end. A killed
                            run may leave a partial last row; resuming rebuilds the file.
``summary.json``            counts (images, scored, flagged, passed, failed), score histogram, timing,
                            images/s; written at the end.
``thumbs/<id>.jpg``         the input downscaled to ``thumbnail`` px for the review page, written only where
                            it spares the page something: inputs larger than twice ``thumbnail`` on
                            their longest side, inputs a browser cannot show (e.g. TIFF), or audits
                            without heatmaps (``heatmaps="none"``). Otherwise the page shows the
                            heatmap overlay, where there is one, and the original file (a near-full-
                            size copy cost a file per image: on a disk where creating a file takes
                            ~1 ms, 15 % of the audit rate at 128 px).
``heatmaps/<id>.jpg``       anomaly map over the input, at the input's resolution up to ``heatmap_size``
                            px on the longest side (1024; ``0``: always the input's), for
                            ``heatmaps="all"``, the default (JPEG: PNG encoding cost as much as
                            inference at 128 px). The map itself is at model resolution (128-256 px):
                            a larger overlay only shows more of the input, which the review page
                            shows from the original anyway. On 2048 px images the cap cut the
                            overlay's CPU from 8.4 to 1.7 ms and the files from 153 to 53 kB. With
                            ``heatmaps="flagged"`` only flagged images get one (every image when the
                            bundle has no threshold): on a line where most parts pass, that spares a
                            file and ~0.7 ms of CPU per passed image (the overlay, its JPEG and the
                            file), and ~8.6 GB per million 300 px images.
``masks/<id>.png``          binary region mask 0/255, original resolution (``masks=True``); a 1-bit PNG
                            (that reads back as 0/255), 7x faster to encode than an 8-bit one.
``maps/<id>.npy``           raw float32 anomaly map ``(S, S)`` at model resolution (``save_maps=True``).
``reconstructions/<id>.png`` the model's reconstruction ``x_hat`` (``reconstructions=True``).
==========================  ============================================================================

``<id>`` is ``<stem>-<10 hex of sha1(absolute path)>``: unique even when two inputs share a file name,
and the same on every rerun. A row (journal and CSV) holds ``id``, ``path`` (absolute), ``score``,
``probability`` (when the bundle has a probability model), ``label`` (1 flagged, 0 passed, -1
uncalibrated), ``threshold``, ``width``/``height`` of the input, ``regions`` (``x, y, w, h, area, peak,
mean`` in original pixels, most anomalous first), the relative paths of the files written for it and
``error`` (why the image could not be scored; such rows have no score).

Resume: rerunning with the same ``OUT`` skips every path already in the journal (errors included), so a
killed audit loses nothing and duplicates nothing. A different model, calibration or output option
(heatmaps, heatmap size, masks, maps, reconstructions, thumbnail size, smallest region) is refused
(:class:`AuditError`, naming what differs) unless ``force=True``, which deletes this module's
outputs and starts over — and only in a folder that is an audit folder (it holds this tool's
``audit.json``) or is empty, so ``--force --out .`` cannot wipe a project's own ``masks/``.

Durability: the journal is fsynced once per batch of records, and every image file is fsynced before
its record is journaled, so after a power cut a journal line never names a file that is not on the
disk; ``audit.json``, ``results.csv`` and ``summary.json`` are written to a temporary file, fsynced
and renamed (:func:`anomaly.data.io.atomic_write`).

One audit at a time per folder: a run holds an exclusive lock (``fcntl.flock``) on ``OUT/.audit.lock``
while it runs and a second run on the same folder is refused, naming the folder and the first run's
pid. The operating system releases the lock when the process ends, however it ends.

Input entries that look like images and are not (a dangling link, a folder named ``x.png``, a file
that vanished or cannot be read) are error rows, never skipped silently.

Each image is decoded once: ``Runtime.score_paths(keep_image=N)`` decodes ahead of inference in its
worker threads and hands back a copy of the original shrunk to what the heatmap and thumbnail need
(``N`` px, the larger of the two sizes; the original itself with ``heatmap_size=0``), so the images
in flight take 3 MB each at most rather than 36 MB for a 12-MP frame (a runtime without
``keep_image`` costs one more read). Image files are encoded in a thread pool and journal lines are
appended in input order.

The parts, one job each, reusable by other engines (the Ray engine scores with actors and commits
through the same journal): :mod:`anomaly.deploy.inputs` (input expansion, output ids),
:mod:`anomaly.deploy.render` (per-image files and records), :mod:`anomaly.deploy.journal` (the
journal and its tables) and this module (the folder: manifest, lock, resume checks; the pipeline;
the summary).

Example::

    summary = run_audit("bundle/", ["line3/*.png", "todo.txt"], "audit_out/", masks=True)
    print(summary["flagged"], summary["failed"], summary["images_per_second"])
"""
from __future__ import annotations

import errno
import inspect
import json
import logging
import math
import os
import shutil
import socket
import time
from array import array
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from anomaly.data.io import IMAGE_EXTENSIONS
from anomaly.deploy import render
from anomaly.deploy.inputs import LIST_SUFFIXES, AuditError, expand_inputs, iter_inputs, output_id
from anomaly.deploy.journal import RESULT_FIELDS, JournalWriter, iter_journal, load_journal, repair_journal, write_csv, write_json
from anomaly.deploy.drift import drift_status
from anomaly.deploy.render import (BROWSER_IMAGES, HEATMAP_JPEG_QUALITY, HEATMAP_MODES, HEATMAP_SIZE, RenderOptions,
                                   error_record, finish_record, heatmap_overlay)
from anomaly.deploy.runtime import Runtime

try:  # POSIX; elsewhere audits of one folder are not locked against each other
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["run_audit", "expand_inputs", "iter_inputs", "output_id", "load_journal", "iter_journal", "heatmap_overlay",
           "AuditError", "BROWSER_IMAGES", "AuditProgress", "format_duration", "RESULT_FIELDS", "AUDIT_SCHEMA",
           "OUTPUT_DIRS", "HEATMAP_MODES", "HEATMAP_SIZE", "HEATMAP_JPEG_QUALITY", "LIST_SUFFIXES", "LOCK_FILE",
           "RenderOptions", "finish_record", "error_record", "audit_lock", "is_audit_folder"]

log = logging.getLogger(__name__)

AUDIT_SCHEMA = "anomaly.audit/1"
#: Where the scoring runs: this process, or a pool of Ray Data actors (:mod:`anomaly.deploy.ray_engine`).
ENGINES = ("local", "ray")
#: Sub-folders of ``OUT`` this module writes (removed by ``force=True``).
OUTPUT_DIRS = ("thumbs", "heatmaps", "masks", "maps", "reconstructions")
OUTPUT_FILES = ("results.jsonl", "results.csv", "summary.json", "audit.json", "report.html")
#: The lock file a running audit holds in ``OUT`` (never deleted: deleting a held lock's file would
#: let a second run lock a new one).
LOCK_FILE = ".audit.lock"
#: The options of the manifest a resume must match, with how a user sets each (for the messages).
_OPTION_FLAGS = {"heatmaps": "--heatmaps", "heatmap_size": "--heatmap-size", "masks": "--masks",
                 "save_maps": "--save-maps", "reconstructions": "--reconstructions",
                 "thumbnail": "--thumbnail-size", "min_area": "min_area"}


@dataclass(frozen=True)
class AuditProgress:
    """Progress of one run: ``done`` of ``total`` new images after ``seconds``; ``skipped`` were
    already in the journal. ``flagged`` and ``failed``: of the ``done`` images, those labelled
    defective and those that could not be scored."""

    done: int
    total: int
    skipped: int
    seconds: float
    flagged: int = 0
    failed: int = 0

    @property
    def rate(self) -> float:
        """Images per second in this run (0 before the first image)."""
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate (``None`` before the first image)."""
        return (self.total - self.done) / self.rate if self.rate > 0 else None


# -- the folder: manifest, lock, force, resume -------------------------------------------------
def _calibration_snapshot(rt: Runtime) -> dict[str, Any]:
    cal = rt.calibration  # a conditional model's own category's, when calibrated on its own
    image = cal.get("image") or {}
    return {"threshold": rt.threshold, "method": image.get("method"), "pixel_threshold": rt.pixel_threshold,
            "normal_histogram": image.get("normal_histogram") or image.get("normal_histogram_"),
            "normal_stats": image.get("normal_stats"), "n_normal": image.get("n_normal"),
            "probability": bool(image.get("probability_model")), "source": cal.get("source")}


def _calibration_sha256(rt: Runtime) -> str:
    import hashlib

    blob = json.dumps(rt.calibration, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_manifest(out: Path) -> dict[str, Any] | None:
    """``out/audit.json`` when it is this tool's manifest, else ``None`` (absent, torn, foreign)."""
    try:
        old = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(old, dict) and str(old.get("schema", "")).startswith("anomaly.audit/"):
        return old
    return None


def is_audit_folder(out: str | os.PathLike) -> bool:
    """Whether ``out`` holds an ``audit.json`` written by this module (what ``force`` requires
    of a folder that is not empty)."""
    return _read_manifest(Path(out)) is not None


def _check_force(out: Path) -> None:
    """Refuse ``force`` on a folder that is neither empty nor an audit folder: it would delete the
    folders ``masks/``, ``maps/``, ... that a user's project may hold under those names."""
    if not out.exists():
        return
    if not out.is_dir():
        raise AuditError(f"--out {out} is a file, expected a folder (new, empty, or of an earlier audit)")
    entries = sorted(e for e in os.listdir(out) if e != LOCK_FILE)
    if not entries or is_audit_folder(out):
        return
    doomed = [e for e in entries if e in OUTPUT_DIRS or e in OUTPUT_FILES]
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise AuditError(f"--force would delete {', '.join(doomed) if doomed else 'the audit outputs'} in {out}, but {out} is "
                     f"not an audit folder: it holds no audit.json of `anomaly audit` and is not empty ({len(entries)} "
                     f"entries: {shown}). Use a new or empty folder as --out, or the folder of an earlier audit")


@contextmanager
def audit_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on the audit folder ``out`` for the block.

    ``fcntl.flock`` on ``out/.audit.lock`` (created; it records the holder's pid, host and start
    time for the message a second run gets). The lock belongs to the open file: the operating
    system drops it when the process ends, killed or not, so a crash never leaves a folder locked.

    Raises:
        AuditError: another process holds the lock (the message names the folder and its pid).
    """
    out = Path(out)
    if fcntl is None:  # pragma: no cover - no flock on this platform
        yield
        return
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except (OSError, ValueError):
                holder = {}
            who = f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}" \
                if isinstance(holder, dict) and holder.get("pid") else "pid unknown"
            raise AuditError(f"{out} is being audited by another run ({who}); two audits on one folder would mix "
                             "their journals. Wait for it to finish, or use another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _clear(out: Path) -> None:
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for name in OUTPUT_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def _flag(key: str, value: Any) -> str:
    """How a user asks for option ``key`` = ``value`` (``--masks``, ``--heatmap-size 160``, ...)."""
    flag = _OPTION_FLAGS.get(key, key)
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    if key == "min_area":
        return f"min_area={value}"
    return f"{flag} {value}"


def _check_options(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to resume with output options other than the folder's (some images would have masks,
    maps, heatmaps of one size... and others not)."""
    if not isinstance(old, dict):
        log.warning("%s: its audit.json records no output options; resuming with these", out)
        return
    differ = [k for k in new if k in old and old[k] != new[k]]
    if not differ:
        return
    what = "; ".join(f"{_OPTION_FLAGS.get(k, k)} was {old[k]!r}, now {new[k]!r}" for k in differ)
    same = ", ".join(_flag(k, old[k]) for k in differ)
    raise AuditError(f"{out} was audited with other output options ({what}); resuming would mix images written "
                     f"two ways. Rerun with the folder's options ({same}) to resume it, use another --out, "
                     "or --force to start over")


def _prepare(out: Path, manifest: dict[str, Any], resume: bool, force: bool) -> bool:
    """Check / reset ``out`` (locked); returns whether its journal holds results to resume from."""
    journal = out / "results.jsonl"
    if force:
        _check_force(out)  # again, under the lock
        _clear(out)
        return False
    has_results = journal.is_file() and journal.stat().st_size > 0
    if not has_results:
        return False
    if not resume:
        raise AuditError(f"{out} already holds an audit ({journal.name}); pass --resume to continue it "
                         "or --force to start over")
    old = _read_manifest(out) or {}
    if old.get("bundle_sha256") != manifest["bundle_sha256"]:
        raise AuditError(f"{out} was audited with another model (bundle sha256 {str(old.get('bundle_sha256'))[:12]}…, "
                         f"this bundle {manifest['bundle_sha256'][:12]}…, {manifest['bundle']}); resuming would mix "
                         "scores of two models. Use another --out, or --force to start over")
    if old.get("category") != manifest.get("category"):
        raise AuditError(f"{out} was audited as category {old.get('category')!r} of this conditional model, not "
                         f"{manifest.get('category')!r}; resuming would mix scores of two categories. Use another "
                         "--out, or --force to start over")
    if old.get("calibration_sha256") != manifest["calibration_sha256"]:
        raise AuditError(f"{out} was audited with a different calibration of this bundle (the threshold changed "
                         f"since: {old.get('calibration', {}).get('threshold')} -> {manifest['calibration']['threshold']}); "
                         "resuming would mix labels of two thresholds. Use another --out, or --force to start over")
    _check_options(out, old.get("options"), manifest["options"])
    if old.get("created"):
        manifest["created"] = old["created"]
    return True


# -- the summary -------------------------------------------------------------------------------
def _histogram(values: Sequence[float] | np.ndarray, bins: int = 30) -> dict[str, list] | None:
    if not len(values):
        return None
    counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


class _Tally:
    """What the summary needs of the records, accumulated one record at a time: counts, and the
    scores in a compact array (8 bytes each; a million records kept as objects took 3.3 GB)."""

    def __init__(self) -> None:
        self.images = self.flagged = self.passed = 0
        self.scores = array("d")

    def add(self, rec: dict[str, Any]) -> None:
        self.images += 1
        if rec.get("error") is not None or rec.get("score") is None:
            return
        self.scores.append(float(rec["score"]))
        label = rec.get("label")
        self.flagged += label == 1
        self.passed += label == 0


def _summary(tally: _Tally, manifest: dict[str, Any], new: int, skipped: int, seconds: float,
             out: Path, opts: RenderOptions) -> dict[str, Any]:
    scores = np.frombuffer(tally.scores, dtype=np.float64) if len(tally.scores) else np.zeros(0)
    flagged, passed = tally.flagged, tally.passed
    return {
        "schema": AUDIT_SCHEMA,
        "images": tally.images, "scored": len(scores), "flagged": flagged, "passed": passed,
        "uncalibrated": len(scores) - flagged - passed, "failed": tally.images - len(scores),
        "threshold": manifest["calibration"]["threshold"], "pixel_threshold": manifest["calibration"]["pixel_threshold"],
        "score_stats": None if not len(scores) else {"min": float(scores.min()), "max": float(scores.max()), "mean": float(np.mean(scores)),
                                                "median": float(np.median(scores))},
        "score_histogram": _histogram(scores),
        "new": new, "skipped": skipped, "seconds": seconds,
        "images_per_second": new / seconds if seconds > 0 and new else None,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bundle": manifest["bundle"], "bundle_sha256": manifest["bundle_sha256"],
        "results": str(out / "results.csv"), "journal": str(out / "results.jsonl"),
        "heatmaps": str(out / "heatmaps") if opts.heatmaps != "none" else None,
        "masks": str(out / "masks") if opts.masks else None,
        "maps": str(out / "maps") if opts.save_maps else None,
        "reconstructions": str(out / "reconstructions") if opts.reconstructions else None,
    }


# -- the records -------------------------------------------------------------------------------
def local_records(rt: Runtime, paths: Sequence[str], opts: RenderOptions, *, batch_size: int = 16,
                  workers: int = 1) -> Iterator[dict[str, Any]]:
    """The in-process record source: ``rt`` scores ``paths`` (decoding ahead in its threads) and
    ``workers`` threads write each image's files (:func:`~anomaly.deploy.render.finish_record`);
    yields one journal record per path, in input order.

    At most ``2 * batch_size`` scored images wait for their files, which bounds the decoded
    images held in memory.
    """
    # the runtime decodes each image once and hands it back (keep_image) for the overlays, shrunk
    # to what they need: holding the originals in flight took the audit of 12-MP JPEGs to 2.7 GB
    # (0.76 GB shrunk)
    keep = {"keep_image": opts.keep_image} if "keep_image" in inspect.signature(rt.score_paths).parameters else {}
    with ThreadPoolExecutor(workers, thread_name_prefix="audit-write") as write_pool:
        pending: deque[Future] = deque()

        def ready(limit: int) -> Iterator[dict[str, Any]]:
            while len(pending) > limit or (pending and pending[0].done()):
                yield pending.popleft().result()

        for r in rt.score_paths(paths, batch_size=batch_size, keep_reconstruction=opts.reconstructions, **keep):
            if r.error is not None:
                f: Future = Future()
                f.set_result(error_record(str(r.path), r.error))
                pending.append(f)
            else:
                pending.append(write_pool.submit(render.finish_record, r, opts))
            yield from ready(limit=2 * batch_size)
        yield from ready(limit=0)


# -- the run -----------------------------------------------------------------------------------
def run_audit(
    bundle: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    batch_size: int = 16,
    heatmaps: bool | str = True,
    heatmap_size: int | None = None,
    masks: bool = False,
    save_maps: bool = False,
    reconstructions: bool = False,
    thumbnail: int = 256,
    resume: bool = True,
    force: bool = False,
    device: str = "auto",
    category: str | None = None,
    workers: int | None = None,
    decode_workers: int | None = None,
    threads: int | None = None,
    tf32: bool = False,
    csv_every: int = 256,
    min_area: int = 16,
    fsync: bool = True,
    engine: str = "local",
    ray_address: str | None = None,
    actors: int | None = None,
    progress: Callable[[AuditProgress], None] | None = None,
) -> dict[str, Any]:
    """Audit ``inputs`` with ``bundle`` into ``out`` (see the module docstring); returns the summary.

    Args:
        bundle: bundle folder (``model.onnx`` + ``model.json``).
        inputs: files, folders, globs and ``.txt``/``.lst`` list files (see :func:`expand_inputs`).
        out: output folder (created).
        batch_size: images per inference call (and per journal commit).
        heatmaps: which images get a heatmap overlay: ``"all"`` (or ``True``), ``"flagged"`` (label 1;
            every image when the bundle is uncalibrated) or ``"none"`` (or ``False``).
        heatmap_size: longest side of the heatmap files; larger inputs are shrunk for them (region
            boxes stay in original pixels). 0 = the input's own size. ``None`` (default):
            :data:`HEATMAP_SIZE` for a whole-image bundle, 0 for a tiled one, whose map resolves
            defects a few pixels wide (the review page zooms into it).
        masks, save_maps, reconstructions: which other per-image files to write.
        thumbnail: longest side of ``thumbs/<id>.jpg`` for the review page (written only for inputs
            larger than twice this, inputs a browser cannot show, or with ``heatmaps="none"``); 0 = none.
        resume: skip inputs already in ``out/results.jsonl``; if False and there are results, refuse.
        force: delete previous outputs of this module in ``out`` and start over (only in an audit
            folder or an empty one).
        workers: threads that write image files (default ``min(4, cpu count)``).
        decode_workers: the runtime's decoding threads (default: :class:`anomaly.deploy.runtime.Runtime`'s,
            which depends on the pipeline and the machine).
        threads: onnxruntime intra-op threads (default: the runtime's: the physical cores on the
            CPU provider, 1 with a GPU provider).
        tf32: let CUDA run float32 in TF32 (see :class:`anomaly.deploy.runtime.Runtime`; off by default).
        csv_every: flush ``results.csv`` after this many new images (and at the end).
        min_area: smallest region kept, in original pixels.
        fsync: make every batch durable (image files and journal lines fsynced before the next
            batch; see the module docstring). ``False`` only for throwaway folders (benchmarks).
        engine: ``"local"`` (this process: the runtime's decode threads, ``workers`` writer threads)
            or ``"ray"``: the scoring and rendering run in a pool of Ray Data actors, each holding a
            runtime (:mod:`anomaly.deploy.ray_engine`); everything else, the journal included, is
            the same. ``bundle``, the inputs and ``out`` must then be paths every Ray node sees.
        ray_address: the Ray cluster (``"auto"``, ``"HOST:PORT"``); ``None``: a local Ray started
            for this audit (or the one this process already runs).
        actors: size of the Ray actor pool (default: one per CPU of the cluster).
        progress: called with an :class:`AuditProgress` after each image.

    Returns:
        The dict also written to ``summary.json`` (``images``, ``flagged``, ``failed``, ``threshold``,
        ``seconds``, ``images_per_second``, ``results`` (CSV path), ``heatmaps`` (folder or None), ...).

    Raises:
        anomaly.deploy.bundle.BundleError: the bundle is missing or inconsistent.
        FileNotFoundError: an input path does not exist (or a glob matches nothing).
        AuditError: no images in the inputs, ``out`` belongs to another bundle / calibration / set
            of output options, another audit is running on ``out``, ``force`` on a folder that is
            not an audit folder, or a bad option (batch size, heatmap mode).
    """
    if batch_size < 1:
        raise AuditError(f"batch size must be >= 1, got {batch_size}")
    heatmap_mode = ("all" if heatmaps else "none") if isinstance(heatmaps, bool) else heatmaps
    if heatmap_mode not in HEATMAP_MODES:
        raise AuditError(f"heatmaps must be one of {', '.join(HEATMAP_MODES)}, got {heatmaps!r}")
    if min_area < 0:
        raise AuditError(f"min_area must be >= 0, got {min_area}")
    if heatmap_size is not None and heatmap_size < 0:
        raise AuditError(f"heatmap size must be >= 0 (0: the input's own size), got {heatmap_size}")
    if decode_workers is not None and decode_workers < 0:
        raise AuditError(f"decode_workers must be >= 0, got {decode_workers}")
    if workers is not None and workers < 1:
        raise AuditError(f"workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise AuditError(f"threads must be >= 1, got {threads}")
    if engine not in ENGINES:
        raise AuditError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if actors is not None and actors < 1:
        raise AuditError(f"actors must be >= 1, got {actors}")
    if engine != "ray" and (ray_address is not None or actors is not None):
        raise AuditError("--address and --actors are options of --engine ray")
    # the bundle before the inputs: a wrong bundle path should not wait for a million-line list
    rt = Runtime(bundle, device=device, category=category, min_area=min_area, decode_workers=decode_workers,
                 threads=threads, tf32=tf32)
    if heatmap_size is None:
        heatmap_size = 0 if rt.preprocess.tiled else HEATMAP_SIZE
    # the whole list before the folder is touched: a list file that fails half-way must not
    # follow a --force that has already cleared the folder
    paths = list(iter_inputs(inputs))
    if not paths:
        raise AuditError(f"no images found in {', '.join(map(str, inputs))} "
                         f"(looked for {', '.join(IMAGE_EXTENSIONS)} in folders)")
    out = Path(out)
    if force:
        _check_force(out)  # before the lock file is made in someone's folder
    if out.exists() and not out.is_dir():
        raise AuditError(f"--out {out} is a file, expected a folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "schema": AUDIT_SCHEMA, "bundle": str(Path(bundle).resolve()),
        "bundle_sha256": str(rt.meta.get("onnx", {}).get("sha256")), "calibration_sha256": _calibration_sha256(rt),
        "model": rt.meta.get("model", {}).get("name"), "category": rt.category_name,
        "calibration": _calibration_snapshot(rt),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "options": {"heatmaps": heatmap_mode, "heatmap_size": heatmap_size, "masks": masks, "save_maps": save_maps,
                    "reconstructions": reconstructions,
                    "thumbnail": thumbnail, "min_area": min_area},
    }
    with audit_lock(out):
        _prepare(out, manifest, resume, force)
        write_json(out / "audit.json", manifest)

        # one streaming pass over the journal: what is done, the summary's tallies, and results.csv,
        # rebuilt once and then appended to (rewriting it every few hundred images made an audit
        # quadratic in its size). The records themselves are not kept: a million of them took 3.3 GB.
        done_paths: set[str] = set()
        tally = _Tally()
        bad: list[int] = []

        def replay() -> Iterator[dict[str, Any]]:
            for rec in iter_journal(out / "results.jsonl", bad):
                done_paths.add(rec["path"])
                tally.add(rec)
                yield rec

        write_csv(out / "results.csv", replay())
        if bad:
            repair_journal(out / "results.jsonl", bad)
        todo = [p for p in paths if p not in done_paths]
        skipped = len(paths) - len(todo)
        del paths, done_paths
        if skipped:
            log.info("resuming %s: %d of %d images already audited", out, skipped, skipped + len(todo))
        if rt.pixel_threshold is None:
            log.warning("the bundle has no pixel threshold: no regions or masks (run `anomaly calibrate`)")
        if heatmap_mode == "flagged" and rt.threshold is None:
            log.warning("the bundle has no image threshold, so nothing is flagged: every image gets a heatmap "
                        "(run `anomaly calibrate`)")
        opts = RenderOptions(out=out, heatmaps=heatmap_mode, heatmap_size=int(heatmap_size), masks=masks,
                             save_maps=save_maps, reconstructions=reconstructions, thumbnail=int(thumbnail),
                             pixel_threshold=rt.pixel_threshold, vmax=2.0 * (rt.pixel_threshold or 1.0),
                             min_area=min_area, fsync=fsync)
        for name, wanted in (("thumbs", opts.thumbnail > 0), ("heatmaps", heatmap_mode != "none"), ("masks", masks),
                             ("maps", save_maps), ("reconstructions", reconstructions)):
            if wanted:
                (out / name).mkdir(exist_ok=True)
        nworkers = workers or max(1, min(4, os.cpu_count() or 1))
        t0 = time.monotonic()
        new = new_flagged = new_failed = 0
        with render.opencv_threads(1), JournalWriter(out / "results.jsonl", out / "results.csv", csv_every=csv_every,
                                                     fsync=fsync) as journal:
            if engine == "ray":
                from anomaly.deploy.ray_engine import score_with_ray

                runtime_kwargs = {"device": device, "category": category, "min_area": min_area,
                                  "decode_workers": decode_workers, "threads": threads, "tf32": tf32}
                records = score_with_ray(Path(bundle).resolve(), todo, opts.to_dict(), runtime_kwargs=runtime_kwargs,
                                         keep_image=opts.keep_image, keep_reconstruction=reconstructions,
                                         batch_size=batch_size, actors=actors, address=ray_address)
            else:
                records = local_records(rt, todo, opts, batch_size=batch_size, workers=nworkers)
            for rec in records:
                journal.append(rec)
                tally.add(rec)
                new += 1
                if journal.pending >= batch_size:
                    journal.commit()  # one fsync per batch: an fsync per line cost as much as a small image
                if progress:
                    new_failed += rec.get("error") is not None
                    new_flagged += rec.get("label") == 1
                    progress(AuditProgress(new, len(todo), skipped, time.monotonic() - t0, new_flagged, new_failed))

        seconds = time.monotonic() - t0
        summary = _summary(tally, manifest, new, skipped, seconds, out, opts)
        # the drift alarm of the service, over every score of this audit against the calibration's
        summary["drift"] = drift_status(rt.calibration.get("reference_scores"),
                                        np.asarray(tally.scores, dtype=np.float64)).to_dict()
        write_json(out / "summary.json", summary)
    log.info("audited %d new images (%d skipped) in %.1fs: %d flagged, %d failed of %d", new, skipped, seconds,
             summary["flagged"], summary["failed"], summary["images"])
    return summary


def format_duration(s: float | None) -> str:
    """``m:ss`` or ``h:mm:ss`` for progress lines; ``?`` when unknown."""
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"

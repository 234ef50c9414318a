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
killed audit loses nothing and duplicates nothing. A different model or calibration is refused
(:class:`AuditError`) unless ``force=True``, which deletes this module's outputs and starts over.

Each image is decoded once: ``Runtime.score_paths(keep_image=N)`` decodes ahead of inference in its
worker threads and hands back a copy of the original shrunk to what the heatmap and thumbnail need
(``N`` px, the larger of the two sizes; the original itself with ``heatmap_size=0``), so the images
in flight take 3 MB each at most rather than 36 MB for a 12-MP frame (a runtime without
``keep_image`` costs one more read). Image files are encoded in a thread pool and journal lines are
appended in input order.

Example::

    summary = run_audit("bundle/", ["line3/*.png", "todo.txt"], "audit_out/", masks=True)
    print(summary["flagged"], summary["failed"], summary["images_per_second"])
"""
from __future__ import annotations

import csv
import glob
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import time
from array import array
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from anomaly.data.io import IMAGE_EXTENSIONS, ImageReadError, atomic_write, list_images, read_image, shrink, write_image
from anomaly.deploy.runtime import ImageResult, Runtime

__all__ = ["run_audit", "expand_inputs", "output_id", "load_journal", "iter_journal", "heatmap_overlay", "AuditError", "BROWSER_IMAGES",
           "AuditProgress", "format_duration", "RESULT_FIELDS", "AUDIT_SCHEMA", "OUTPUT_DIRS", "HEATMAP_MODES",
           "HEATMAP_SIZE"]

log = logging.getLogger(__name__)

AUDIT_SCHEMA = "anomaly.audit/1"
#: Columns of ``results.csv`` (``regions`` holds the JSON list of regions).
RESULT_FIELDS = ("path", "id", "score", "probability", "label", "threshold", "n_regions", "regions", "width",
                 "height", "thumbnail", "heatmap", "mask", "map", "reconstruction", "error")
#: Sub-folders of ``OUT`` this module writes (removed by ``force=True``).
OUTPUT_DIRS = ("thumbs", "heatmaps", "masks", "maps", "reconstructions")
OUTPUT_FILES = ("results.jsonl", "results.csv", "summary.json", "audit.json", "report.html")
LIST_SUFFIXES = (".txt", ".lst")
#: Input formats a web browser shows itself (the review page links such originals directly).
BROWSER_IMAGES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"})
#: JPEG quality of ``heatmaps/<id>.jpg``. The overlays are for a person to look at: 85 against
#: OpenCV's 95 halves the files (ELPV 300 px cells: 8.6 kB against 16.5 kB on average, 8 GB less
#: per million images) and encodes faster, with 0.4 grey levels mean error (0.2 at 95): not visible.
HEATMAP_JPEG_QUALITY = 85
#: Which images get ``heatmaps/<id>.jpg``: every one, only the flagged ones, or none.
HEATMAP_MODES = ("all", "flagged", "none")
#: Default longest side of ``heatmaps/<id>.jpg`` (larger inputs are shrunk first; 0 = never).
HEATMAP_SIZE = 1024
_GLOB_CHARS = set("*?[")


class AuditError(ValueError):
    """A usage problem with an audit folder or its inputs (e.g. resuming with another bundle)."""


@dataclass(frozen=True)
class AuditProgress:
    """Progress of one run: ``done`` of ``total`` new images after ``seconds``; ``skipped`` were
    already in the journal."""

    done: int
    total: int
    skipped: int
    seconds: float

    @property
    def rate(self) -> float:
        """Images per second in this run (0 before the first image)."""
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate (``None`` before the first image)."""
        return (self.total - self.done) / self.rate if self.rate > 0 else None


# -- inputs ------------------------------------------------------------------------------------
def _read_list(path: Path) -> list[str]:
    """The paths listed in ``path``, as strings: a million-line list took 11.4 s and 721 MB (peak,
    traced) to expand into Path objects, against 1.2 s and 210 MB as strings."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"{path}: cannot read the list file ({exc}); expected one image path per line") from exc
    base = os.fspath(path.parent)
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = os.path.expanduser(line)
        out.append(p if os.path.isabs(p) else os.path.join(base, p))
    return out


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand audit inputs into a de-duplicated list of absolute paths, in the order given.

    Args:
        inputs: image files; folders (searched recursively for image extensions); globs (anything
            containing ``* ? [``, expanded with :func:`glob.glob`, ``**`` recursive); list files
            (``.txt``/``.lst``: one path per line, blank and ``#`` lines ignored, relative paths
            relative to the list file). A listed path that does not exist is kept: it becomes an
            error row, like any unreadable file.

    Returns:
        Absolute paths (not symlink-resolved); folder contents and glob matches sorted.

    Raises:
        FileNotFoundError: an input that is neither an existing path nor a glob with matches.
    """
    return [Path(a) for a in _expand(inputs)]


def _expand(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """:func:`expand_inputs` as strings (what the audit keeps for a million inputs)."""
    found: list[str | Path] = []
    missing: list[str] = []
    for item in inputs:
        s = os.fspath(item)
        p = Path(s).expanduser()
        if p.is_dir():
            found.extend(list_images(p))
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            found.extend(_read_list(p))
        elif p.exists():
            found.append(p)
        elif _GLOB_CHARS & set(s):
            matches = sorted(glob.glob(os.path.expanduser(s), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            dirs = [Path(m) for m in matches if Path(m).is_dir()]
            if not files and not dirs:
                missing.append(f"{s} (glob matched nothing)")
            found.extend(files)
            for d in dirs:
                found.extend(list_images(d))
        else:
            missing.append(s)
    if missing:
        raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}")
    seen: set[str] = set()
    out = []
    for p in found:
        a = os.path.abspath(p)
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out


def output_id(path: str | os.PathLike) -> str:
    """File-name stem of the outputs of ``path``: ``<stem>-<sha1 of the absolute path, 10 hex>``.

    Stable across runs and unique per input even when inputs share a file name.
    """
    a = os.path.abspath(path)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(a).stem)[:48] or "image"
    return f"{stem}-{hashlib.sha1(a.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}"


# -- journal -----------------------------------------------------------------------------------
def iter_journal(path: str | os.PathLike, bad: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """The records of ``results.jsonl``, in journal order, read line by line.

    A million-image journal is some 370 MB: a resume that held every record took 3.3 GB, so
    callers that need one pass (a resume, the review page) stream it. A truncated or unparsable
    line (a killed run) is skipped with a warning.

    Args:
        bad: if given, the 1-based numbers of the skipped lines are appended to it.
    """
    p = Path(path)
    if not p.is_file():
        return
    skipped: list[int] = [] if bad is None else bad
    first = len(skipped)
    with open(p, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):  # a last line without its newline was being written when the run stopped
                if line.strip():
                    skipped.append(number)
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                skipped.append(number)
                continue
            if isinstance(rec, dict) and "path" in rec:
                yield rec
            else:
                skipped.append(number)
    if len(skipped) > first:
        log.warning("%s: skipped %d incomplete line(s) left by an interrupted run", p, len(skipped) - first)


def _repair_journal(path: Path, bad: Sequence[int]) -> None:
    """Rewrite ``path`` (atomically, streaming) without the lines ``bad`` and without a torn last
    line, so that appending continues from a clean line boundary."""
    drop = set(bad)
    with open(path, "rb") as src, atomic_write(path, "wb") as dst:
        for number, line in enumerate(src, 1):
            if line.endswith(b"\n") and number not in drop:
                dst.write(line)


def load_journal(path: str | os.PathLike, repair: bool = False) -> list[dict[str, Any]]:
    """Read ``results.jsonl`` into a list (:func:`iter_journal` streams it); a truncated or
    unparsable line (a killed run) is dropped.

    Args:
        repair: rewrite the file (atomically) without the dropped lines, so appending continues
            from a clean line boundary.

    Returns:
        The records, in journal order.
    """
    bad: list[int] = []
    records = list(iter_journal(path, bad))
    if repair and bad:
        _repair_journal(Path(path), bad)
    return records


def _csv_row(rec: dict[str, Any]) -> list[Any]:
    """The CSV row of one record, in :data:`RESULT_FIELDS` order."""
    def num(v: Any) -> str:
        return "" if v is None else f"{v:.6g}"

    regions = rec.get("regions") or []
    label = rec.get("label")
    row = {"score": num(rec.get("score")), "probability": num(rec.get("probability")),
           "threshold": num(rec.get("threshold")), "label": "" if label is None else label,
           "n_regions": len(regions) if rec.get("error") is None else "",
           "regions": json.dumps(regions, separators=(",", ":")) if regions else "", "error": rec.get("error") or ""}
    return [row[k] if k in row else ("" if rec.get(k) is None else rec[k]) for k in RESULT_FIELDS]


def _write_csv(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with atomic_write(path, newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(RESULT_FIELDS)
        writer.writerows(_csv_row(rec) for rec in records)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_write(path, encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")


# -- images ------------------------------------------------------------------------------------
def _rgb8(image: np.ndarray) -> np.ndarray:
    """``(H, W[, 1|3|4])`` uint8, uint16 or float in [0, 1] -> uint8 ``(H, W)`` grey or ``(H, W, 3)``
    RGB (alpha dropped). Grey stays one channel: a grey JPEG encodes in about half the time."""
    img = image
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img)
    if img.dtype == np.uint16:
        return np.ascontiguousarray(img >> 8).astype(np.uint8)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def heatmap_overlay(image: np.ndarray, anomaly_map: np.ndarray, vmax: float, alpha: float = 0.5, *,
                    bgr: bool = False) -> np.ndarray:
    """Colour the map (0 -> blue, ``vmax`` -> red) over the image at the image's resolution.

    Args:
        image: ``(H, W)`` or ``(H, W, C)``, uint8, uint16 or float in [0, 1] (as
            ``anomaly.data.io.read_image`` returns it, raw or not).
        anomaly_map: ``(S, S)`` float map at model resolution.
        vmax: map value drawn as full red (e.g. twice the pixel threshold).
        bgr: return OpenCV's BGR order (what the audit hands to the JPEG encoder).

    Returns:
        uint8 ``(H, W, 3)`` RGB (BGR with ``bgr=True``).
    """
    from anomaly.deploy.regions import overlay_heatmap

    img = _rgb8(image)
    if bgr and img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    return overlay_heatmap(img, anomaly_map, 0.0, vmax, alpha=alpha, bgr=bgr)


def _thumbnail(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 grey or RGB image whose longest side is at most ``size`` (shrunk before converting)."""
    if max(image.shape[:2]) > size:
        image = shrink(image[:, :, :3] if image.ndim == 3 and image.shape[2] == 4 else image, size)
    return _rgb8(image)


def _wants_thumbnail(path: str | os.PathLike, h: int, w: int, o: "_Options") -> bool:
    """Whether ``thumbs/<id>.jpg`` is worth a file (see the module docstring)."""
    if o.thumbnail <= 0:
        return False
    return o.heatmaps == "none" or max(h, w) > 2 * o.thumbnail or Path(path).suffix.lower() not in BROWSER_IMAGES


@contextmanager
def _opencv_threads(n: int) -> Iterator[None]:
    """Set OpenCV's own thread count for the block (process-wide), then restore it.

    The audit runs with 1: its decode/inference workers and file writers already keep every core
    busy, and OpenCV splitting each small resize or blend over the cores as well doubled the
    CPU time of the heatmap overlay (300 px ELPV cell: 1.03 ms against 0.46 ms single-threaded).
    """
    previous = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def _save_npy(path: Path, array: np.ndarray) -> None:
    # not atomic, like the images: the journal line comes after the files (see _finish)
    with open(path, "wb") as fh:
        np.save(fh, np.asarray(array, dtype=np.float32))


@dataclass(frozen=True)
class _Options:
    out: Path
    heatmaps: str  # one of HEATMAP_MODES
    heatmap_size: int  # longest side of a heatmap; 0 = the input's
    masks: bool
    save_maps: bool
    reconstructions: bool
    thumbnail: int
    pixel_threshold: float | None
    vmax: float
    min_area: int

    @property
    def needs_image(self) -> bool:
        return self.thumbnail > 0 or self.heatmaps != "none"


def _finish(r: ImageResult, o: _Options) -> dict[str, Any]:
    """Regions and image files of one scored image -> its journal record.

    The files are written first and plainly (not via rename): the record reaches the journal only
    after they are complete, so a crash can tear only files of images that a resume redoes.
    """
    from anomaly.deploy.regions import find_regions

    oid = output_id(r.path)
    image = getattr(r, "image", None)
    try:
        if image is None and o.needs_image:  # a runtime without ``keep_image``: read the file again
            image = read_image(r.path)
    except ImageReadError as exc:
        return _error_record(str(r.path), f"scored, then could not be read again for its outputs: {exc}")
    amap, recon = r.anomaly_map, r.reconstruction
    h, w = r.original_size if r.original_size else image.shape[:2]
    rec: dict[str, Any] = {"id": oid, "path": str(r.path), "score": r.score, "probability": r.probability,
                           "label": r.label, "threshold": r.threshold, "width": int(w), "height": int(h), "regions": []}
    files: dict[str, str | None] = dict.fromkeys(("thumbnail", "heatmap", "mask", "map", "reconstruction"))
    try:
        mask = None
        # bilinear resizing never exceeds the map's maximum: a map below the pixel threshold has no
        # regions, which spares the full-resolution work for most (normal) images
        if o.pixel_threshold is not None and float(amap.max()) > o.pixel_threshold:
            regions = getattr(r, "regions", None)  # the runtime's workers found them (same threshold, min_area)
            if o.masks or regions is None:
                mask, regions = find_regions(amap, o.pixel_threshold, original_size=(h, w), min_area=o.min_area)
            rec["regions"] = [{"x": g.x, "y": g.y, "w": g.w, "h": g.h, "area": g.area, "peak": round(g.peak, 6),
                               "mean": round(g.mean, 6)} for g in regions]
        heatmap = o.heatmaps == "all" or (o.heatmaps == "flagged" and r.label != 0)  # label -1: uncalibrated
        # a large input is shrunk once, for the heatmap, and the thumbnail comes from that
        base = _thumbnail(image, o.heatmap_size) if heatmap and o.heatmap_size > 0 else image
        if _wants_thumbnail(r.path, h, w, o):
            files["thumbnail"] = f"thumbs/{oid}.jpg"
            write_image(o.out / files["thumbnail"], _thumbnail(base, o.thumbnail), atomic=False)
        if heatmap:
            files["heatmap"] = f"heatmaps/{oid}.jpg"
            write_image(o.out / files["heatmap"], heatmap_overlay(base, amap, o.vmax, bgr=True), atomic=False, bgr=True,
                        quality=HEATMAP_JPEG_QUALITY)
        if o.masks:
            files["mask"] = f"masks/{oid}.png"
            write_image(o.out / files["mask"], mask if mask is not None else np.zeros((h, w), np.uint8), atomic=False,
                        bilevel=True)
        if o.save_maps:
            files["map"] = f"maps/{oid}.npy"
            _save_npy(o.out / files["map"], amap)
        if o.reconstructions and recon is not None:
            files["reconstruction"] = f"reconstructions/{oid}.png"
            x = np.asarray(recon, dtype=np.float32)  # (C, S, S) in [0, 1]
            write_image(o.out / files["reconstruction"], _rgb8(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)), atomic=False)
    except (ValueError, cv2.error) as exc:  # image-specific; disk errors (OSError) stop the run
        rec["error"] = f"{r.path}: scored, but its outputs could not be made: {exc}"
    rec.update(files)
    rec.setdefault("error", None)
    return rec


def _error_record(path: str, error: str) -> dict[str, Any]:
    return {"id": output_id(path), "path": path, "score": None, "probability": None, "label": None,
            "threshold": None, "width": None, "height": None, "regions": [], "thumbnail": None, "heatmap": None,
            "mask": None, "map": None, "reconstruction": None, "error": error}


# -- folder state ------------------------------------------------------------------------------
def _calibration_snapshot(rt: Runtime) -> dict[str, Any]:
    cal = rt.calibration  # a conditional model's own category's, when calibrated on its own
    image = cal.get("image") or {}
    return {"threshold": rt.threshold, "method": image.get("method"), "pixel_threshold": rt.pixel_threshold,
            "normal_histogram": image.get("normal_histogram") or image.get("normal_histogram_"),
            "normal_stats": image.get("normal_stats"), "n_normal": image.get("n_normal"),
            "probability": bool(image.get("probability_model")), "source": cal.get("source")}


def _calibration_sha256(rt: Runtime) -> str:
    blob = json.dumps(rt.calibration, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _clear(out: Path) -> None:
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for name in OUTPUT_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def _prepare(out: Path, rt: Runtime, manifest: dict[str, Any], resume: bool, force: bool) -> bool:
    """Check / reset ``out``; returns whether its journal holds results to resume from."""
    journal = out / "results.jsonl"
    if force:
        _clear(out)
        return False
    old_manifest_path = out / "audit.json"
    has_results = journal.is_file() and journal.stat().st_size > 0
    if not has_results:
        return False
    if not resume:
        raise AuditError(f"{out} already holds an audit ({journal.name}); pass --resume to continue it "
                         "or --force to start over")
    old: dict[str, Any] = {}
    if old_manifest_path.is_file():
        try:
            old = json.loads(old_manifest_path.read_text())
        except json.JSONDecodeError:
            old = {}
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
    return True


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
             out: Path, opts: _Options) -> dict[str, Any]:
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


# -- the run -----------------------------------------------------------------------------------
def run_audit(
    bundle: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    batch_size: int = 16,
    heatmaps: bool | str = True,
    heatmap_size: int = HEATMAP_SIZE,
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
    progress: Callable[[AuditProgress], None] | None = None,
) -> dict[str, Any]:
    """Audit ``inputs`` with ``bundle`` into ``out`` (see the module docstring); returns the summary.

    Args:
        bundle: bundle folder (``model.onnx`` + ``model.json``).
        inputs: files, folders, globs and ``.txt``/``.lst`` list files (see :func:`expand_inputs`).
        out: output folder (created).
        batch_size: images per inference call.
        heatmaps: which images get a heatmap overlay: ``"all"`` (or ``True``), ``"flagged"`` (label 1;
            every image when the bundle is uncalibrated) or ``"none"`` (or ``False``).
        heatmap_size: longest side of the heatmap files; larger inputs are shrunk for them (region
            boxes stay in original pixels). 0 = the input's own size.
        masks, save_maps, reconstructions: which other per-image files to write.
        thumbnail: longest side of ``thumbs/<id>.jpg`` for the review page (written only for inputs
            larger than twice this, inputs a browser cannot show, or with ``heatmaps="none"``); 0 = none.
        resume: skip inputs already in ``out/results.jsonl``; if False and there are results, refuse.
        force: delete previous outputs of this module in ``out`` and start over.
        workers: threads that write image files (default ``min(4, cpu count)``).
        decode_workers: the runtime's decoding threads (default: :class:`anomaly.deploy.runtime.Runtime`'s,
            which depends on the pipeline and the machine).
        threads: onnxruntime intra-op threads (default: the runtime's: the physical cores on the
            CPU provider, 1 with a GPU provider).
        tf32: let CUDA run float32 in TF32 (see :class:`anomaly.deploy.runtime.Runtime`; off by default).
        csv_every: flush ``results.csv`` after this many new images (and at the end).
        min_area: smallest region kept, in original pixels.
        progress: called with an :class:`AuditProgress` after each image.

    Returns:
        The dict also written to ``summary.json`` (``images``, ``flagged``, ``failed``, ``threshold``,
        ``seconds``, ``images_per_second``, ``results`` (CSV path), ``heatmaps`` (folder or None), ...).

    Raises:
        anomaly.deploy.bundle.BundleError: the bundle is missing or inconsistent.
        FileNotFoundError: an input path does not exist (or a glob matches nothing).
        AuditError: no images in the inputs, ``out`` belongs to another bundle / calibration, or a bad
            option (batch size, heatmap mode).
    """
    if batch_size < 1:
        raise AuditError(f"batch size must be >= 1, got {batch_size}")
    heatmap_mode = ("all" if heatmaps else "none") if isinstance(heatmaps, bool) else heatmaps
    if heatmap_mode not in HEATMAP_MODES:
        raise AuditError(f"heatmaps must be one of {', '.join(HEATMAP_MODES)}, got {heatmaps!r}")
    if min_area < 0:
        raise AuditError(f"min_area must be >= 0, got {min_area}")
    if heatmap_size < 0:
        raise AuditError(f"heatmap size must be >= 0 (0: the input's own size), got {heatmap_size}")
    if decode_workers is not None and decode_workers < 0:
        raise AuditError(f"decode_workers must be >= 0, got {decode_workers}")
    if workers is not None and workers < 1:
        raise AuditError(f"workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise AuditError(f"threads must be >= 1, got {threads}")
    # the bundle before the inputs: a wrong bundle path should not wait for a million-line list
    rt = Runtime(bundle, device=device, category=category, min_area=min_area, decode_workers=decode_workers,
                 threads=threads, tf32=tf32)
    paths = _expand(inputs)
    if not paths:
        raise AuditError(f"no images found in {', '.join(map(str, inputs))} "
                         f"(looked for {', '.join(IMAGE_EXTENSIONS)} in folders)")
    out = Path(out)
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
    resuming = _prepare(out, rt, manifest, resume, force)
    if (out / "audit.json").is_file() and resuming:
        manifest["created"] = json.loads((out / "audit.json").read_text()).get("created", manifest["created"])
    _write_json(out / "audit.json", manifest)

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

    _write_csv(out / "results.csv", replay())
    if bad:
        _repair_journal(out / "results.jsonl", bad)
    todo = [p for p in paths if p not in done_paths]
    skipped = len(paths) - len(todo)
    if skipped:
        log.info("resuming %s: %d of %d images already audited", out, skipped, len(paths))
    if rt.pixel_threshold is None:
        log.warning("the bundle has no pixel threshold: no regions or masks (run `anomaly calibrate`)")
    if heatmap_mode == "flagged" and rt.threshold is None:
        log.warning("the bundle has no image threshold, so nothing is flagged: every image gets a heatmap "
                    "(run `anomaly calibrate`)")
    opts = _Options(out=out, heatmaps=heatmap_mode, heatmap_size=int(heatmap_size), masks=masks, save_maps=save_maps,
                    reconstructions=reconstructions,
                    thumbnail=int(thumbnail), pixel_threshold=rt.pixel_threshold,
                    vmax=2.0 * (rt.pixel_threshold or 1.0), min_area=min_area)
    for name, wanted in (("thumbs", opts.thumbnail > 0), ("heatmaps", heatmap_mode != "none"), ("masks", masks), ("maps", save_maps),
                         ("reconstructions", reconstructions)):
        if wanted:
            (out / name).mkdir(exist_ok=True)
    nworkers = workers or max(1, min(4, os.cpu_count() or 1))
    t0 = time.monotonic()
    new = 0
    journal_path = out / "results.jsonl"

    # the runtime decodes each image once and hands it back (keep_image) for the overlays, shrunk
    # to what they need: holding the originals in flight took the audit of 12-MP JPEGs to 2.7 GB
    # (0.76 GB shrunk)
    sizes = ([opts.heatmap_size] if heatmap_mode != "none" else []) + ([opts.thumbnail] if opts.thumbnail > 0 else [])
    keep_image: bool | int = (False if not sizes else True if 0 in sizes else max(sizes))
    keep = {"keep_image": keep_image} if "keep_image" in inspect.signature(rt.score_paths).parameters else {}
    with _opencv_threads(1), open(journal_path, "a", encoding="utf-8") as journal, \
            open(out / "results.csv", "a", newline="", encoding="utf-8") as csv_file, \
            ThreadPoolExecutor(nworkers, thread_name_prefix="audit-write") as write_pool:
        pending: deque[Future] = deque()
        csv_writer = csv.writer(csv_file)

        def commit(rec: dict[str, Any]) -> None:
            nonlocal new
            journal.write(json.dumps(rec, allow_nan=False) + "\n")
            journal.flush()
            csv_writer.writerow(_csv_row(rec))
            tally.add(rec)
            new += 1
            if csv_every > 0 and new % csv_every == 0:
                csv_file.flush()
            if progress:
                progress(AuditProgress(new, len(todo), skipped, time.monotonic() - t0))

        def drain(limit: int) -> None:
            while len(pending) > limit or (pending and pending[0].done()):
                commit(pending.popleft().result())

        for r in rt.score_paths(todo, batch_size=batch_size, keep_reconstruction=reconstructions, **keep):
            if r.error is not None:
                f: Future = Future()
                f.set_result(_error_record(str(r.path), r.error))
                pending.append(f)
            else:
                pending.append(write_pool.submit(_finish, r, opts))
            drain(limit=2 * batch_size)  # bounds the decoded images held for writing
        drain(limit=0)

    seconds = time.monotonic() - t0
    summary = _summary(tally, manifest, new, skipped, seconds, out, opts)
    _write_json(out / "summary.json", summary)
    log.info("audited %d new images (%d skipped) in %.1fs: %d flagged, %d failed of %d", new, skipped, seconds,
             summary["flagged"], summary["failed"], summary["images"])
    return summary


def format_duration(s: float | None) -> str:
    """``m:ss`` or ``h:mm:ss`` for progress lines; ``?`` when unknown."""
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"

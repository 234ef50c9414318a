"""The audit's per-image outputs: heatmap overlays, thumbnails, masks, maps, reconstructions, and
the journal record of one scored image.

:func:`finish_record` takes an :class:`~anomaly.deploy.runtime.ImageResult` and the audit's
:class:`RenderOptions`, writes the image's files into the audit folder and returns its journal
record; :func:`error_record` is the record of an image that could not be scored. Both are what a
record source needs besides a :class:`~anomaly.deploy.runtime.Runtime` (the in-process audit's
writer threads, a Ray actor), so every engine writes the same files and the same records.

What is written and why (sizes, JPEG quality, when a thumbnail is worth a file) is described in
:mod:`anomaly.deploy.audit`.

Example::

    opts = RenderOptions(out=Path("audit_out"), heatmaps="all", heatmap_size=1024, masks=True,
                         save_maps=False, reconstructions=False, thumbnail=256,
                         pixel_threshold=rt.pixel_threshold, vmax=2 * rt.pixel_threshold, min_area=16)
    for r in rt.score_paths(paths, keep_image=opts.keep_image):
        rec = error_record(r.path, r.error) if r.error else finish_record(r, opts)
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

from anomaly.data.io import ImageReadError, read_image, shrink, write_image
from anomaly.deploy.inputs import output_id
from anomaly.deploy.runtime import ImageResult

__all__ = ["RenderOptions", "finish_record", "error_record", "heatmap_overlay", "opencv_threads", "BROWSER_IMAGES",
           "HEATMAP_JPEG_QUALITY", "HEATMAP_MODES", "HEATMAP_SIZE", "FILE_FIELDS"]

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
#: The record fields that name a file written for the image (relative to the audit folder).
FILE_FIELDS = ("thumbnail", "heatmap", "mask", "map", "reconstruction")


@dataclass(frozen=True)
class RenderOptions:
    """What to write for each scored image, and where.

    Attributes:
        out: the audit folder (its sub-folders for the wanted files exist).
        heatmaps: one of :data:`HEATMAP_MODES`.
        heatmap_size: longest side of a heatmap in px; 0 = the input's own size.
        masks, save_maps, reconstructions: which other per-image files to write.
        thumbnail: longest side of a thumbnail in px (0: none; see :func:`wants_thumbnail`).
        pixel_threshold: the bundle's pixel threshold (``None``: no regions, empty masks).
        vmax: map value drawn as full red in the overlay.
        min_area: smallest region kept, in original pixels.
        fsync: flush each file to the disk before its record is returned, so that a journal line
            that survives a power cut never names a file that did not.
    """

    out: Path
    heatmaps: str
    heatmap_size: int
    masks: bool
    save_maps: bool
    reconstructions: bool
    thumbnail: int
    pixel_threshold: float | None
    vmax: float
    min_area: int
    fsync: bool = True

    @property
    def needs_image(self) -> bool:
        """Whether an image's pixels are needed after scoring (an overlay or a thumbnail)."""
        return self.thumbnail > 0 or self.heatmaps != "none"

    @property
    def keep_image(self) -> bool | int:
        """What :meth:`Runtime.score_paths(keep_image=...) <anomaly.deploy.runtime.Runtime.score_paths>`
        should hand back: ``False`` (no pixels needed), ``True`` (the original: ``heatmap_size=0``)
        or the longest side the overlay and the thumbnail need."""
        sizes = ([self.heatmap_size] if self.heatmaps != "none" else []) + ([self.thumbnail] if self.thumbnail > 0 else [])
        return False if not sizes else True if 0 in sizes else max(sizes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (``out`` as a string), e.g. to hand the options to another process."""
        d = asdict(self)
        d["out"] = str(self.out)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RenderOptions":
        """The inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown render option(s) {', '.join(unknown)}; expected some of {', '.join(sorted(names))}")
        return cls(**{**d, "out": Path(d["out"])})


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


def thumbnail(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 grey or RGB image whose longest side is at most ``size`` (shrunk before converting)."""
    if max(image.shape[:2]) > size:
        image = shrink(image[:, :, :3] if image.ndim == 3 and image.shape[2] == 4 else image, size)
    return _rgb8(image)


def wants_thumbnail(path: str | os.PathLike, h: int, w: int, o: RenderOptions) -> bool:
    """Whether ``thumbs/<id>.jpg`` is worth a file: inputs larger than twice the thumbnail, inputs a
    browser cannot show, or audits without heatmaps (see :mod:`anomaly.deploy.audit`)."""
    if o.thumbnail <= 0:
        return False
    return o.heatmaps == "none" or max(h, w) > 2 * o.thumbnail or Path(path).suffix.lower() not in BROWSER_IMAGES


@contextmanager
def opencv_threads(n: int) -> Iterator[None]:
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


def _save_npy(path: Path, array: np.ndarray, fsync: bool) -> None:
    # not atomic, like the images: the journal line comes after the files (see finish_record)
    with open(path, "wb") as fh:
        np.save(fh, np.asarray(array, dtype=np.float32))
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def finish_record(r: ImageResult, o: RenderOptions) -> dict[str, Any]:
    """Regions and image files of one scored image -> its journal record.

    The files are written first and plainly (not via rename; fsynced with ``o.fsync``): the record
    reaches the journal only after they are complete, so a crash can tear only files of images
    that a resume redoes.

    Args:
        r: a scored result (``r.error is None``), with ``r.image`` when the runtime kept it (else
            the file is read again, if an overlay or thumbnail needs it).
        o: what to write.

    Returns:
        The record: ``id``, ``path``, ``score``, ``probability``, ``label``, ``threshold``,
        ``width``, ``height``, ``regions``, the :data:`FILE_FIELDS` and ``error`` (``None``, or
        why the outputs could not be made; disk errors (``OSError``) are raised instead).
    """
    from anomaly.deploy.regions import find_regions

    oid = output_id(r.path)
    image = getattr(r, "image", None)
    try:
        if image is None and o.needs_image:  # a runtime without ``keep_image``: read the file again
            image = read_image(r.path)
    except ImageReadError as exc:
        return error_record(str(r.path), f"scored, then could not be read again for its outputs: {exc}")
    amap, recon = r.anomaly_map, r.reconstruction
    h, w = r.original_size if r.original_size else image.shape[:2]
    rec: dict[str, Any] = {"id": oid, "path": str(r.path), "score": r.score, "probability": r.probability,
                           "label": r.label, "threshold": r.threshold, "width": int(w), "height": int(h), "regions": []}
    files: dict[str, str | None] = dict.fromkeys(FILE_FIELDS)
    sync = o.fsync
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
        base = thumbnail(image, o.heatmap_size) if heatmap and o.heatmap_size > 0 else image
        if wants_thumbnail(r.path, h, w, o):
            files["thumbnail"] = f"thumbs/{oid}.jpg"
            write_image(o.out / files["thumbnail"], thumbnail(base, o.thumbnail), atomic=False, fsync=sync)
        if heatmap:
            files["heatmap"] = f"heatmaps/{oid}.jpg"
            write_image(o.out / files["heatmap"], heatmap_overlay(base, amap, o.vmax, bgr=True), atomic=False, bgr=True,
                        quality=HEATMAP_JPEG_QUALITY, fsync=sync)
        if o.masks:
            files["mask"] = f"masks/{oid}.png"
            write_image(o.out / files["mask"], mask if mask is not None else np.zeros((h, w), np.uint8), atomic=False,
                        bilevel=True, fsync=sync)
        if o.save_maps:
            files["map"] = f"maps/{oid}.npy"
            _save_npy(o.out / files["map"], amap, sync)
        if o.reconstructions and recon is not None:
            files["reconstruction"] = f"reconstructions/{oid}.png"
            x = np.asarray(recon, dtype=np.float32)  # (C, S, S) in [0, 1]
            write_image(o.out / files["reconstruction"], _rgb8(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)),
                        atomic=False, fsync=sync)
    except (ValueError, cv2.error) as exc:  # image-specific; disk errors (OSError) stop the run
        rec["error"] = f"{r.path}: scored, but its outputs could not be made: {exc}"
    rec.update(files)
    rec.setdefault("error", None)
    return rec


def error_record(path: str | os.PathLike, error: str) -> dict[str, Any]:
    """The record of an image that could not be scored: no score, no files, ``error`` says why."""
    path = str(path)
    return {"id": output_id(path), "path": path, "score": None, "probability": None, "label": None,
            "threshold": None, "width": None, "height": None, "regions": [], "thumbnail": None, "heatmap": None,
            "mask": None, "map": None, "reconstruction": None, "error": error}

"""The inspection service: FastAPI app, served models, graceful uvicorn server (``anomaly serve``).

Every request goes through one :class:`~anomaly.deploy.runtime.Runtime` per model, behind a
:class:`~anomaly.deploy.serve_batcher.MicroBatcher`: the body is read with a size limit, decoded
and preprocessed (the runtime's own :attr:`~anomaly.deploy.runtime.Runtime.preprocess`) in a
worker thread, queued, and scored with the images that arrived with it by
:meth:`Runtime.score_batch <anomaly.deploy.runtime.Runtime.score_batch>` in the batcher's thread,
so the event loop never runs the graph, and a batched answer is the one ``score_image`` gives.

Endpoints (health and metadata follow the Open Inference / KServe v2 protocol):

* ``GET /v2/health/live``, ``GET /v2/health/ready`` (503 while loading or draining),
  ``GET /v2``, ``GET /v2/models/{name}`` (input size, thresholds, calibration method, sidecar
  schema, onnx sha256, drift; never a path of the server), ``GET /v2/models/{name}/ready``;
* ``POST /v1/models/{name}/inspect`` (one encoded image as the body, ``image/png``,
  ``image/jpeg``, ..., or one file in ``multipart/form-data``; ``?heatmap=png`` adds the overlay as
  base64) and ``POST /v1/models/{name}/inspect/batch`` (several files in one multipart body);
* ``PUT /v1/models/{name}/threshold`` and ``POST /v1/models/{name}/reload``: only with
  ``Authorization: Bearer <token>`` where the server was given a token (``ANOMALY_SERVE_TOKEN``);
  without one they answer 403. The new sidecar is written atomically, a new runtime is loaded,
  and requests admitted before it are still decided with the old one;
* ``GET /metrics``: Prometheus text (:mod:`anomaly.deploy.serve_metrics`).

Refusals: 404 unknown model; 413 body over ``max_bytes`` (from ``Content-Length`` before reading,
or while reading) or image over ``max_pixels`` (from its header, before decoding); 415 a content
type that is not an image or multipart; 422 an empty, undecodable or malformed body; 429 with
``Retry-After`` when the model's queue is full (at once: from the path and headers, before
routing and before the body is read); 503 while draining. Every error body is
``{"detail": "<what was expected and what was found>"}``.

Example::

    service = Service({"cells": "bundles/cells"}, ServeConfig(max_batch=16, max_wait_ms=5))
    service.load()
    with run_in_thread(service) as server:        # 127.0.0.1, a free port
        httpx.post(f"{server.url}/v1/models/cells/inspect", content=png, headers={"Content-Type": "image/png"})

Imports FastAPI, uvicorn and prometheus-client (the ``[serve]`` extra); torch-free.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import math
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Literal, Mapping

import cv2
import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

import anomaly
from anomaly.data.io import shrink
from anomaly.deploy.audit import HEATMAP_SIZE, heatmap_overlay
from anomaly.deploy.bundle import SCHEMA_VERSION, BundleError, load_sidecar, write_sidecar
from anomaly.deploy.drift import DriftMonitor
from anomaly.deploy.runtime import Runtime, physical_cores
from anomaly.deploy.serve_batcher import MicroBatcher, QueueFull
from anomaly.deploy.serve_limits import (ACCEPTED_TYPES, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, IMAGE_TYPES, InputError,
                                         check_content_type, decode_checked)
from anomaly.deploy.serve_metrics import UNKNOWN_MODEL, ScoreHistogram, ServiceMetrics, score_buckets

__all__ = ["ServeConfig", "ServedModel", "Service", "create_app", "ServiceServer", "run_in_thread", "TOKEN_ENV"]

log = logging.getLogger(__name__)

#: the environment variable that gives the server its bearer token for threshold changes and reloads
TOKEN_ENV = "ANOMALY_SERVE_TOKEN"


@dataclass
class ServeConfig:
    """How the service runs (the ``anomaly serve`` options).

    Attributes:
        max_batch: most images per batch (a power of two); 1 turns micro-batching off.
        max_wait_ms: how long the oldest queued image waits for others to join its batch.
        queue_size: queue places per model (images decoding or queued); beyond: 429.
        max_bytes: largest request body (413).
        max_pixels: largest image, ``width * height``, read from its header before decoding (413).
        max_images: most files in one batch request (413).
        device, threads: the runtime's (:class:`~anomaly.deploy.runtime.Runtime`).
        decode_workers: threads that decode and preprocess request images (``None``: the
            physical cores).
        drift_window, drift_alpha, drift_psi, drift_min_scores: the drift alarm
            (:class:`~anomaly.deploy.drift.DriftMonitor`).
        token: the bearer token of the threshold and reload endpoints (``None``: they are off).
        graceful_timeout: seconds a stop waits for requests in flight and queued.
        drain_delay: seconds between SIGTERM and closing the listening socket, answering
            ``ready: false`` meanwhile, so a load balancer stops sending before the port closes.
        inference_nice: how much lower the inference threads' priority is than the event loop's
            (Linux nice; 0 leaves it), so the loop answers 429 at once when the cores are saturated.
        lanes: threads per model taking and scoring batches: with 2, under load one full batch's
            graph runs while the last one's results and regions are made
            (:class:`~anomaly.deploy.serve_batcher.MicroBatcher`).
    """

    max_batch: int = 16
    max_wait_ms: float = 5.0
    queue_size: int = 64
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = 32
    device: str = "auto"
    threads: int | None = None
    decode_workers: int | None = None
    drift_window: int = 500
    drift_alpha: float = 0.05
    drift_psi: float = 0.2
    drift_min_scores: int = 100
    token: str | None = field(default=None, repr=False)
    graceful_timeout: float = 30.0
    drain_delay: float = 0.0
    inference_nice: int = 5
    lanes: int = 2

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_batch & (self.max_batch - 1):
            raise ValueError(f"max_batch must be a power of two (1, 2, 4, ...), got {self.max_batch}")
        for name in ("queue_size", "max_bytes", "max_pixels", "max_images", "drift_window", "lanes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "graceful_timeout", "drain_delay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.token is not None and len(self.token) < 16:
            raise ValueError(f"the bearer token must have at least 16 characters, got {len(self.token)}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ServedModel:
    """One bundle served under a name: its current runtime, batcher, drift monitor and score histogram.

    The bundle's folder is known only here and never leaves the server (metadata shows its
    name, hashes and calibration, not where it lives).
    """

    def __init__(self, name: str, bundle: str | os.PathLike, config: ServeConfig, metrics: ServiceMetrics | None = None) -> None:
        self.name = name
        self._bundle = Path(bundle)
        self._config = config
        self._metrics = metrics
        self._lock = threading.Lock()  # one threshold change or reload at a time
        rt = self._load()
        self.batcher = MicroBatcher(name, max_batch=config.max_batch, max_wait=config.max_wait_ms / 1000.0,
                                    queue_size=config.queue_size, on_batch=self._on_batch,
                                    on_idle_runtime=lambda r: r.close(), nice=config.inference_nice,
                                    lanes=config.lanes)
        self.batcher.set_runtime(rt)
        ref = rt.calibration.get("reference_scores")
        self.drift = self._monitor(ref)
        self.score_histogram = ScoreHistogram(score_buckets(ref, rt.threshold))
        self.loaded = _now()
        self.changes = 0

    def _load(self) -> Runtime:
        c = self._config
        # spin=False: the event loop and the decoders share the cores with inference
        return Runtime(self._bundle, device=c.device, threads=c.threads, decode_workers=0, spin=False)

    def _monitor(self, reference: Any) -> DriftMonitor:
        c = self._config
        return DriftMonitor(reference, window=c.drift_window, alpha=c.drift_alpha, psi_limit=c.drift_psi,
                            min_scores=c.drift_min_scores)

    @property
    def runtime(self) -> Runtime:
        """The runtime new requests are scored with."""
        return self.batcher.runtime

    def _on_batch(self, stats: Any) -> None:
        self.drift.add(*stats.scores)
        self.score_histogram.observe(stats.scores)
        if self._metrics is not None:
            self._metrics.batch(self.name, stats.size, stats.inference_s, stats.queue_s)

    def _install(self, rt: Runtime) -> None:
        old = self.runtime
        if list(rt.calibration.get("reference_scores") or []) != list(old.calibration.get("reference_scores") or []):
            self.drift = self._monitor(rt.calibration.get("reference_scores"))  # a new reference: a new window
        self.batcher.set_runtime(rt)
        self.loaded = _now()
        self.changes += 1

    def reload(self) -> dict[str, Any]:
        """Load the bundle's sidecar again (after ``anomaly calibrate`` rewrote it) and serve it to
        requests admitted from now on.

        Raises:
            BundleError: the bundle no longer loads (the current runtime keeps serving).
        """
        with self._lock:
            rt = self._load()
            before = self.runtime.threshold
            self._install(rt)
        log.warning("model %r reloaded from its sidecar: image threshold %s -> %s", self.name, before, rt.threshold)
        return self.metadata()

    def set_threshold(self, image: float | None = None, pixel: float | None = None) -> dict[str, Any]:
        """Move the image and/or pixel threshold: written atomically to the sidecar, then served.

        The calibration's method becomes ``manual`` and its expected false-positive rate and
        recall are cleared (they belonged to the old threshold); a probability model stays.

        Raises:
            InputError: 409 when the bundle has no such calibration to move, 422 when the
                sidecar's checks refuse the value (a negative threshold of non-negative scores).
        """
        with self._lock:
            meta = load_sidecar(self._bundle)
            cal = meta.get("calibration") or {}
            own = self.runtime.category_name
            target = (cal.get("categories") or {}).get(own) if own is not None else None
            target = target if target else cal
            changed = {}
            for key, value in (("image", image), ("pixel", pixel)):
                if value is None:
                    continue
                if not target.get(key):
                    raise InputError(409, f"model {self.name!r} has no {key} calibration to move; "
                                          "run `anomaly calibrate` on the bundle first")
                old = target[key].get("threshold")
                target[key] = {**target[key], "threshold": float(value), "method": "manual",
                               "expected_fpr": None, **({"recall": None} if key == "image" else {"f1": None})}
                changed[key] = (old, float(value))
            if not changed:
                raise InputError(422, "expected a JSON object with 'threshold' and/or 'pixel_threshold' (numbers)")
            try:
                write_sidecar(self._bundle, meta)
            except BundleError as exc:
                raise InputError(422, str(exc).split(": ", 1)[-1]) from exc
            rt = self._load()
            self._install(rt)
        for key, (old, new) in changed.items():
            log.warning("model %r: %s threshold %s -> %s (written to its sidecar)", self.name, key, old, new)
        return self.metadata()

    def metadata(self) -> dict[str, Any]:
        """The model's description (KServe v2 model metadata plus the service's own fields)."""
        rt = self.runtime
        meta = rt.meta
        pre = rt.preprocess
        cal = rt.calibration
        image = cal.get("image") or {}
        pixel = cal.get("pixel") or {}
        s = pre.image_size
        shapes = {"anomaly_map": [-1, 1, s, s], "score": [-1], "reconstruction": [-1, pre.channels, s, s]}
        return {
            "name": self.name,
            "versions": [meta["onnx"]["sha256"][:12]],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, pre.channels, pre.image_size, pre.image_size]}],
            "outputs": [{"name": n, "datatype": "FP32", "shape": shapes.get(n, [-1])} for n in rt.output_names],
            "model": meta["model"]["name"],
            "conditional": rt.conditional,
            "category": rt.category_name,
            "input_size": pre.image_size,
            "channels": pre.channels,
            "precision": rt.precision,
            "providers": rt.session.get_providers(),
            "threshold": rt.threshold,
            "pixel_threshold": rt.pixel_threshold,
            "calibration_method": image.get("method"),
            "pixel_calibration_method": pixel.get("method"),
            "probability": bool(rt.calibrator is not None and rt.calibrator.has_probability),
            "sidecar_schema": int(meta.get("schema_version", SCHEMA_VERSION)),
            "onnx_sha256": meta["onnx"]["sha256"],
            "loaded": self.loaded,
            "changes": self.changes,
            "batching": {"max_batch": self.batcher.max_batch, "max_wait_ms": self.batcher.max_wait * 1000.0,
                         "queue_size": self.batcher.queue_size},
            "drift": self.drift.status().to_dict(),
        }

    def close(self, timeout: float | None = None) -> None:
        """Score what was admitted, then stop the batcher and the runtime's threads."""
        self.batcher.stop(timeout)
        self.runtime.close()


class Service:
    """The models a server holds and its state (``loading`` -> ``ready`` -> ``draining``).

    Args:
        bundles: ``{name: bundle folder}``.
        config: see :class:`ServeConfig`.
    """

    def __init__(self, bundles: Mapping[str, str | os.PathLike], config: ServeConfig | None = None) -> None:
        if not bundles:
            raise ValueError("expected at least one bundle to serve")
        self.config = config or ServeConfig()
        self._bundles = {str(k): Path(v) for k, v in bundles.items()}
        self.models: dict[str, ServedModel] = {}
        self.state = "loading"
        self.metrics = ServiceMetrics(lambda: list(self.models.values()), lambda: self.ready, self.config.max_batch)
        workers = self.config.decode_workers or physical_cores()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="anomaly-decode")

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def load(self) -> "Service":
        """Load every bundle (``BundleError`` names the one that fails)."""
        for name, path in self._bundles.items():
            if name not in self.models:
                self.models[name] = ServedModel(name, path, self.config, self.metrics)
        return self

    def drain(self) -> None:
        """Not ready from now on; queued images stop waiting for their batch to fill."""
        if self.state != "draining":
            log.warning("draining: answering ready=false; requests in flight and queued finish")
        self.state = "draining"
        for m in self.models.values():
            m.batcher.flush()

    def close(self) -> None:
        """Score everything admitted, stop the batchers and the decoders."""
        self.state = "draining"
        for m in self.models.values():
            m.close(self.config.graceful_timeout)
        self.pool.shutdown(wait=True)


# -- API schema --------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    detail: str = Field(description="what was expected and what was found")


class RegionOut(BaseModel):
    x: int
    y: int
    w: int
    h: int
    area: int
    peak: float
    mean: float


class Timings(BaseModel):
    decode_ms: float = Field(description="reading the body, decoding and preprocessing the image")
    queue_ms: float = Field(description="queued until its batch started")
    inference_ms: float = Field(description="its batch through the graph, calibration and regions")
    batch_size: int = Field(description="images in its batch")


class Inspection(BaseModel):
    model: str
    score: float = Field(description="raw image score, higher is more anomalous")
    label: int = Field(description="1 defect, 0 normal, -1 uncalibrated bundle")
    probability: float | None = Field(None, description="probability of a defect (calibrated bundles)")
    threshold: float | None
    pixel_threshold: float | None
    regions: list[RegionOut] | None = Field(description="defect regions in original pixels, most anomalous first")
    width: int
    height: int
    timings: Timings
    heatmap_png: str | None = Field(None, description="base64 PNG of the heatmap overlay (with ?heatmap=png)")


class BatchItem(BaseModel):
    filename: str | None
    result: Inspection | None = None
    status: int = Field(description="200, or the status this image alone would have got")
    error: str | None = None


class BatchInspection(BaseModel):
    model: str
    results: list[BatchItem]


class ThresholdChange(BaseModel):
    threshold: float | None = Field(None, description="new image threshold (score > threshold is a defect)")
    pixel_threshold: float | None = Field(None, description="new pixel threshold (regions)")


class Drift(BaseModel):
    reference: int
    scores: int
    window: int
    ks_statistic: float | None
    ks_pvalue: float | None
    psi: float | None
    alarm: bool
    alpha: float
    psi_limit: float
    reason: str | None


class TensorInfo(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class Batching(BaseModel):
    max_batch: int
    max_wait_ms: float
    queue_size: int


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    model: str
    conditional: bool
    category: str | None
    input_size: int
    channels: int
    precision: str
    providers: list[str]
    threshold: float | None
    pixel_threshold: float | None
    calibration_method: str | None
    pixel_calibration_method: str | None
    probability: bool
    sidecar_schema: int
    onnx_sha256: str
    loaded: str
    changes: int
    batching: Batching
    drift: Drift


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool
    state: str


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]
    models: list[str]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {401: "no bearer token", 403: "threshold changes are off, or the token is wrong", 404: "unknown model",
            409: "nothing to change", 413: "body or image too large", 415: "not an image or multipart body",
            422: "empty, undecodable or malformed input", 429: "the model's queue is full (see Retry-After)",
            503: "the server is draining"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_IMAGE_BODY = {"requestBody": {"required": True, "description": "one encoded image, or one file in a multipart form",
                               "content": {**{t: _BINARY for t in IMAGE_TYPES},
                                           "multipart/form-data": {"schema": {
                                               "type": "object", "required": ["image"],
                                               "properties": {"image": {"type": "string", "format": "binary"}}}}}}}
_BATCH_BODY = {"requestBody": {"required": True, "description": "several image files in one multipart form",
                               "content": {"multipart/form-data": {"schema": {
                                   "type": "object", "required": ["images"],
                                   "properties": {"images": {"type": "array",
                                                             "items": {"type": "string", "format": "binary"}}}}}}}}


# -- request handling ---------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise InputError(422, f"Content-Length {declared!r} is not a number of bytes") from None
        if n > limit:
            raise InputError(413, f"the body has {n:,} bytes; this server accepts at most {limit:,} bytes per request")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise InputError(413, f"the body exceeds {limit:,} bytes, the most this server accepts per request")
        chunks.append(chunk)
    return b"".join(chunks)


async def _files(request: Request, body: bytes, max_files: int) -> list[tuple[str | None, bytes]]:
    """The files of a multipart body: ``[(filename, bytes)]`` in order."""
    async def once() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, once(), max_files=max_files, max_fields=max_files,
                                     max_part_size=64 << 10).parse()
    except MultiPartException as exc:
        status = 413 if "Too many" in str(exc) else 422
        raise InputError(status, f"malformed multipart body: {exc}"
                         + (f" (at most {max_files} files per request)" if status == 413 else "")) from None
    out = []
    try:
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                out.append((value.filename, await value.read()))
    finally:
        await form.close()
    if not out:
        raise InputError(422, "the multipart body holds no file; expected image files (fields with a filename)")
    return out


def _encode_heatmap(image: np.ndarray, anomaly_map: np.ndarray, vmax: float) -> str:
    """The overlay (image shrunk to HEATMAP_SIZE px at most) as base64 PNG."""
    overlay = heatmap_overlay(shrink(image, HEATMAP_SIZE), anomaly_map, vmax, bgr=True)
    ok, buf = cv2.imencode(".png", overlay)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 BGR image
        raise RuntimeError("PNG encoding of the heatmap failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


class _Handlers:
    """The endpoints' work, bound to one service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.config = service.config

    def model(self, name: str) -> ServedModel:
        m = self.service.models.get(name)
        if m is None:
            raise InputError(404, f"no model named {name!r} on this server; it serves {sorted(self.service.models)}")
        return m

    def _prepare(self, rt: Runtime, data: bytes, name: str) -> tuple[np.ndarray, np.ndarray, float]:
        """In a decoder thread: decode within the limits, preprocess with the runtime's own definition."""
        t0 = time.perf_counter()
        image = decode_checked(data, name, self.config.max_pixels)
        try:
            x = rt.preprocess(image)
        except ValueError as exc:  # a shape the preprocessing cannot take
            raise InputError(422, f"{name}: {exc}") from None
        return image, x, time.perf_counter() - t0

    async def _one(self, m: ServedModel, rt: Runtime, data: bytes, name: str, heatmap: bool,
                   read_s: float) -> dict[str, Any]:
        """Decode, queue, await and shape one image whose queue place is already taken."""
        loop = asyncio.get_running_loop()
        try:
            image, x, decode_s = await loop.run_in_executor(self.service.pool, self._prepare, rt, data, name)
        except BaseException:
            m.batcher.release()
            raise
        scored = await asyncio.wrap_future(m.batcher.submit(rt, x, image.shape[:2]))
        r = scored.result
        if not math.isfinite(r.score):
            raise InputError(422, f"{name}: the model gave a non-finite score ({r.score}) for this image")
        out: dict[str, Any] = {
            "model": m.name, "score": r.score, "label": r.label, "probability": r.probability,
            "threshold": r.threshold, "pixel_threshold": rt.pixel_threshold,
            "regions": None if r.regions is None else [g.to_dict() for g in r.regions],
            "width": int(image.shape[1]), "height": int(image.shape[0]),
            "timings": {"decode_ms": 1000.0 * (read_s + decode_s), "queue_ms": 1000.0 * scored.queue_s,
                        "inference_ms": 1000.0 * scored.inference_s, "batch_size": scored.batch_size},
            "heatmap_png": None,
        }
        if heatmap:
            vmax = 2.0 * (rt.pixel_threshold or 1.0)
            out["heatmap_png"] = await loop.run_in_executor(self.service.pool, _encode_heatmap, image, r.anomaly_map, vmax)
        return out

    def _admit(self, m: ServedModel, n: int = 1) -> None:
        """Take ``n`` queue places: 429 (with a retry hint) when they are not free, 503 once stopping."""
        try:
            m.batcher.reserve(n)
        except QueueFull as exc:
            if m.batcher.stopping:
                raise InputError(503, f"the server is shutting down: {exc}") from None
            raise _Busy(str(exc), m.batcher.retry_after()) from None

    async def inspect(self, request: Request, name: str, heatmap: bool) -> dict[str, Any]:
        m = self.model(name)
        media = check_content_type(request.headers.get("content-type"))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.config.max_bytes:
            raise InputError(413, f"the body has {int(declared):,} bytes; this server accepts at most "
                                  f"{self.config.max_bytes:,} bytes per request")
        self._admit(m)
        rt = m.runtime  # the runtime (and threshold) this request is decided with
        try:
            t0 = time.perf_counter()
            body = await _read_body(request, self.config.max_bytes)
            if media == "multipart/form-data":
                files = await _files(request, body, 1)
                filename, body = files[0]
            else:
                filename = None
            read_s = time.perf_counter() - t0
        except BaseException:
            m.batcher.release()
            raise
        return await self._one(m, rt, body, filename or "image", heatmap, read_s)

    async def inspect_batch(self, request: Request, name: str, heatmap: bool) -> dict[str, Any]:
        m = self.model(name)
        check_content_type(request.headers.get("content-type"), ("multipart/form-data",))
        t0 = time.perf_counter()
        body = await _read_body(request, self.config.max_bytes)
        files = await _files(request, body, self.config.max_images)
        read_s = (time.perf_counter() - t0) / len(files)
        self._admit(m, len(files))
        rt = m.runtime
        tasks = [self._one(m, rt, data, fname or f"image {i}", heatmap, read_s) for i, (fname, data) in enumerate(files)]
        done = await asyncio.gather(*tasks, return_exceptions=True)
        items = []
        for (fname, _), res in zip(files, done):
            if isinstance(res, InputError):
                items.append({"filename": fname, "result": None, "status": res.status, "error": res.message})
            elif isinstance(res, BaseException):
                raise res
            else:
                items.append({"filename": fname, "result": res, "status": 200, "error": None})
        return {"model": m.name, "results": items}

    def authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        token = self.config.token
        if not token:
            raise InputError(403, f"threshold changes and reloads are off on this server; start it with {TOKEN_ENV} "
                                  "set to a secret of at least 16 characters to allow them")
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise _Unauthorized("expected an Authorization: Bearer <token> header")
        if not hmac.compare_digest(credentials.credentials.encode("utf-8", "surrogatepass"), token.encode("utf-8")):
            raise InputError(403, "the bearer token is not this server's")


class _Busy(InputError):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(429, message)
        self.retry_after = retry_after


class _Unauthorized(InputError):
    def __init__(self, message: str) -> None:
        super().__init__(401, message)


_INSPECT_PATH = re.compile(r"/v1/models/([^/]+)/inspect(/batch)?")
_JSON_HEADERS = [(b"content-type", b"application/json")]


def _retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


class _Edge:
    """Pure ASGI middleware, the first code of the app a request meets.

    * Every request's duration and status go into the metrics, labelled by the route's name and
      the model's (only names the service serves); a 429's time in the server also goes into
      ``anomaly_refusal_seconds``.
    * An inspection for a model whose queue is full is answered 429 here, from the path and the
      headers alone: before FastAPI routes it, validates its query or reads a byte of its body.
      Under overload that is most requests, and each costs the event loop a few Python steps
      instead of the framework's whole path. Only a plain ``full`` is answered here: a request
      the handler would refuse for another reason first (415 content type, 413 declared size,
      503 stopping) goes on to the handler, which also re-checks the queue when it takes its place
      (a place taken meanwhile still gets 429 there).
    """

    def __init__(self, app: Any, service: Service) -> None:
        self.app = app
        self.service = service

    def _full(self, scope: dict) -> tuple[ServedModel, str] | None:
        """``(model, endpoint)`` when this request is an inspection its model has no place for."""
        m = _INSPECT_PATH.fullmatch(scope.get("path", ""))
        if m is None:
            return None
        model = self.service.models.get(m.group(1))
        if model is None or model.batcher.stopping or model.batcher.has_room():
            return None
        batch = m.group(2) is not None
        media = length = None
        for key, value in scope.get("headers") or ():
            if key == b"content-type":
                media = value.split(b";", 1)[0].strip().lower().decode("latin-1")
            elif key == b"content-length":
                length = value
        if media not in (("multipart/form-data",) if batch else ACCEPTED_TYPES):
            return None  # 415 from the handler
        if length is not None and (not length.isdigit() or int(length) > self.service.config.max_bytes):
            return None  # 413 or 422 from the handler
        return model, ("inspect_batch" if batch else "inspect")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        metrics = self.service.metrics
        if scope["method"] == "POST" and (full := self._full(scope)) is not None:
            model, endpoint = full
            b = model.batcher
            body = json.dumps({"detail": f"model {model.name!r} is busy: {b.admitted} of {b.queue_size} queue places "
                                         "taken; retry after the Retry-After seconds"}).encode()
            await send({"type": "http.response.start", "status": 429,
                        "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode()),
                                    (b"retry-after", _retry_after(b.retry_after()).encode())]})
            refused = time.perf_counter() - start
            await send({"type": "http.response.body", "body": body})
            metrics.refusal(model.name, refused)
            metrics.request(model.name, endpoint, 429, time.perf_counter() - start)
            return
        status = {"code": 500, "at": 0.0}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                status["at"] = time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "name", None) or "unmatched"
            name = (scope.get("path_params") or {}).get("name")
            label = name if name in self.service.models else (UNKNOWN_MODEL if name is not None else "")
            if status["code"] == 429:
                metrics.refusal(label, status["at"] - start)
            metrics.request(label, endpoint, status["code"], time.perf_counter() - start)


def create_app(service: Service) -> FastAPI:
    """The FastAPI app of a loaded :class:`Service` (state ``ready`` once its lifespan starts)."""
    h = _Handlers(service)
    bearer = HTTPBearer(auto_error=False, description=f"the token given to the server in {TOKEN_ENV}")
    service.load()  # the schema lists the served names
    names = sorted(service._bundles)

    def model_name() -> Any:
        return PathParam(description="a served model's name", json_schema_extra={"enum": names})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.load()
        service.state = "ready"
        log.info("serving %s", ", ".join(service.models))
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.close)

    app = FastAPI(title="anomaly inspection service", version=anomaly.__version__, lifespan=lifespan,
                  description="Defect verdicts for one image at a time, micro-batched per model.")
    app.add_middleware(_Edge, service=service)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        headers = {}
        if isinstance(exc, _Busy):
            headers["Retry-After"] = _retry_after(exc.retry_after)
        if isinstance(exc, _Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()))
            parts.append(f"{where}: {e.get('msg')}")
        return JSONResponse({"detail": "invalid request: " + "; ".join(parts)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/v2", response_model=ServerMetadata, name="server_metadata")
    def server_metadata() -> dict[str, Any]:
        return {"name": "anomaly", "version": anomaly.__version__, "extensions": [], "models": sorted(service.models)}

    @app.get("/v2/health/live", response_model=Live, name="live")
    def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready", response_model=Ready, name="ready", responses={503: {"model": Ready}})
    def ready() -> Any:
        body = {"ready": service.ready, "state": service.state}
        return body if service.ready else JSONResponse(body, status_code=503)

    @app.get("/v2/models/{name}", response_model=ModelMetadata, name="model_metadata", responses=_errors(404))
    def model_metadata(name: str = model_name()) -> dict[str, Any]:
        return h.model(name).metadata()

    @app.get("/v2/models/{name}/ready", response_model=ModelReady, name="model_ready",
             responses={**_errors(404), 503: {"model": ModelReady}})
    def model_ready(name: str = model_name()) -> Any:
        h.model(name)
        body = {"name": name, "ready": service.ready}
        return body if service.ready else JSONResponse(body, status_code=503)

    @app.post("/v1/models/{name}/inspect", response_model=Inspection, name="inspect", openapi_extra=_IMAGE_BODY,
              responses=_errors(404, 413, 415, 422, 429))
    async def inspect(request: Request, name: str = model_name(),
                      heatmap: Literal["png"] | None = Query(None, description="png: add the heatmap overlay")) -> dict:
        return await h.inspect(request, name, heatmap == "png")

    @app.post("/v1/models/{name}/inspect/batch", response_model=BatchInspection, name="inspect_batch",
              openapi_extra=_BATCH_BODY, responses=_errors(404, 413, 415, 422, 429))
    async def inspect_batch(request: Request, name: str = model_name(),
                            heatmap: Literal["png"] | None = Query(None, description="png: add heatmap overlays")) -> dict:
        return await h.inspect_batch(request, name, heatmap == "png")

    @app.put("/v1/models/{name}/threshold", response_model=ModelMetadata, name="set_threshold",
             responses=_errors(401, 403, 404, 409, 422))
    async def set_threshold(change: ThresholdChange, name: str = model_name(),
                            credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        h.authorize(credentials)
        m = h.model(name)
        for key in ("threshold", "pixel_threshold"):
            v = getattr(change, key)
            if v is not None and not math.isfinite(v):
                raise InputError(422, f"{key} must be a finite number, got {v}")
        return await asyncio.get_running_loop().run_in_executor(None, m.set_threshold, change.threshold,
                                                                change.pixel_threshold)

    @app.post("/v1/models/{name}/reload", response_model=ModelMetadata, name="reload",
              responses=_errors(401, 403, 404, 422))
    async def reload(name: str = model_name(), credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        h.authorize(credentials)
        m = h.model(name)
        try:
            return await asyncio.get_running_loop().run_in_executor(None, m.reload)
        except BundleError as exc:
            raise InputError(422, f"the bundle no longer loads; still serving the previous one ({exc})") from None

    @app.get("/metrics", name="metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    def metrics() -> Response:
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


class ServiceServer(uvicorn.Server):
    """uvicorn's server with the service's graceful stop.

    SIGTERM (or SIGINT): the service reports not ready, keeps answering for ``drain_delay``
    seconds, then uvicorn closes the socket and waits up to ``graceful_timeout`` for requests in
    flight; the lifespan's end scores what is still queued. A second signal stops at once.
    Unlike plain uvicorn the signal is not raised again afterwards, so a graceful stop exits 0.
    """

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        #: called with the server once it listens (the CLI prints the address, port 0 resolved)
        self.on_started: Any = None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started(self)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.service.state == "draining":  # a second signal: stop now
            super().handle_exit(sig, frame)
            self.force_exit = self.force_exit or self.should_exit
            self.should_exit = True
            return
        self.service.drain()
        delay = self.service.config.drain_delay
        if delay > 0:
            timer = threading.Timer(delay, self._stop)
            timer.daemon = True
            timer.start()
        else:
            self._stop()

    def _stop(self) -> None:
        self.should_exit = True

    @property
    def port(self) -> int | None:
        """The port it listens on (``None`` before it started)."""
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return None


def make_server(service: Service, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning",
                access_log: bool = False) -> ServiceServer:
    """A :class:`ServiceServer` for ``service`` on ``host:port`` (port 0: any free one)."""
    app = create_app(service)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=service.config.graceful_timeout, limit_concurrency=None,
                            timeout_keep_alive=5)
    return ServiceServer(config, service)


class _ThreadedServer:
    def __init__(self, server: ServiceServer, thread: threading.Thread, host: str) -> None:
        self.server = server
        self.thread = thread
        self.url = f"http://{host}:{server.port}"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.service.drain()
        self.server.should_exit = True
        self.thread.join(timeout)


@contextlib.contextmanager
def run_in_thread(service: Service, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0) -> Iterator[_ThreadedServer]:
    """Serve ``service`` from a background thread (tests, notebooks); stops on leaving the block.

    Yields an object with ``url`` (``http://host:port``), ``server`` and ``stop()``.

    Raises:
        RuntimeError: the server did not start within ``start_timeout`` seconds.
    """
    server = make_server(service, host, port)
    thread = threading.Thread(target=server.run, name="anomaly-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the service did not start on {host}:{port} within {start_timeout:g} s")
        time.sleep(0.01)
    handle = _ThreadedServer(server, thread, host)
    try:
        yield handle
    finally:
        handle.stop()

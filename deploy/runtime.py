"""The deployed runtime: a bundle scored with onnxruntime. Torch-free (numpy, OpenCV, onnxruntime).

Tests load a calibrated bundle in a fresh interpreter and assert that neither ``torch`` nor
scikit-learn gets imported: a line PC installs ``pip install .`` without the training stack, and
the calibration is applied with :class:`anomaly.decision.ImageDecision` (importing scikit-learn
took longer than loading the model).

Execution providers: ``device="auto"`` picks TensorRT/CUDA when their provider is installed
(onnxruntime-gpu; TensorRT only where its own libraries load), else the CPU; ``cpu``, ``cuda`` and
``tensorrt`` force one and fail with a message naming the installed providers when it is missing.
Session options: intra-op threads = physical cores on the CPU provider, 1 on a GPU one (unless
``threads`` is given), all graph optimisations (NCHWc layout included), sequential execution,
memory-pattern planning on; CUDA in full float32 unless ``tf32`` (see :class:`Runtime`).

:meth:`Runtime.score_paths` is a bounded pipeline whose results come back in input order, the
path iterable consumed lazily, unreadable files yielding a result with ``error`` set in their
place. Two shapes (``pipeline``):

* ``batch`` (CPU, the default there): one worker per physical core takes a whole batch, decodes
  it and runs it through a *single-threaded* session, so the cores work on different batches and
  never wait for each other. Splitting every operator over the cores instead (intra-op threads)
  makes each operator wait for its slowest thread, and on a busy core (decoding, the audit's
  JPEG writers) that is most of them: on 2 cores the decode->score pipeline ran at 240-310
  images/s that way against 460 images/s of pure inference with two single-threaded sessions
  side by side (default AAE, 128², batch 16). At most ``workers + prefetch`` batches are in
  flight.
* ``overlap`` (GPU providers): decoder threads prepare the next batches while the current one
  runs through the one session; at most ``prefetch + 1`` batches are held.

:meth:`Runtime.infer` on a preprocessed batch follows the same rule on the CPU: a batch of N >= 2
is cut into one slice per physical core, each run through the single-threaded session in a thread
of its own. Against one session with intra-op threads (spinning, onnxruntime's default), two
slices of 8 ran a batch of 16 at 1.26x the images/s at 128² and 1.20x at 256² (medians of 8
back-to-back pairs of 2-s windows, 2-core AMD EPYC VM, 2026-12-03), and the spinning session's
rate sagged from window to window (278 -> 183 images/s at 128²) where the slices held steady.

A *tiled* bundle (``preprocess.tile_scale`` in the sidecar; ``anomaly train --tile-scale``) keeps
each image at its tiling scale, cuts it into the overlapping ``S x S`` grid of
:mod:`anomaly.data.tiling`, runs the tiles through the graph in batches of ``batch_size`` (tiles
of several images share a batch) and blends their maps into one map of the scaled image; the image
score is the largest tile score. Chunks then hold one image each, so the memory in flight is a few
images and one batch of tiles whatever the image size (see ``benchmarks/tiling_speed.py``).

Example::

    rt = Runtime("bundle/")
    for r in rt.score_paths(["part1.png", "part2.png"]):
        print(r.path, r.score, r.label)
    r = rt.score_image(image_array)          # (H, W[, C]) uint8/uint16/float
    for r in rt.score_paths(paths, keep_image=True):   # r.image: the decoded original
        ...
"""
from __future__ import annotations

import collections
import functools
import itertools
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np
import onnxruntime as ort

from anomaly.decision import ImageDecision
from anomaly.data.io import ImageReadError, read_image, shrink
from anomaly.data.preprocess import Preprocess
from anomaly.data.tiling import Stitcher, tile_grid
from anomaly.deploy.bundle import MODEL_FILE, BundleError, check_model_inputs, load_sidecar
from anomaly.deploy.regions import Region, find_regions

__all__ = ["Runtime", "ImageResult", "available_devices", "physical_cores", "PipelineStats", "CategoryError",
           "resolve_category"]

log = logging.getLogger(__name__)

_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
# device="auto": the fastest installed provider first; onnxruntime falls back along the list
# for nodes a provider cannot run.
_AUTO_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


# TensorRT's own libraries, which onnxruntime-gpu does not ship (its TensorRT provider needs them).
_TENSORRT_LIBRARIES = (("libnvinfer.so.10", "libnvonnxparser.so.10"), ("nvinfer_10.dll", "nvonnxparser_10.dll"))


@functools.lru_cache(maxsize=1)
def _tensorrt_loadable() -> bool:
    """Whether TensorRT's libraries load. onnxruntime-gpu lists its TensorRT provider whether or not
    TensorRT is installed; a session that asks for it without them logs an error and retries
    without it (seen on an H200 with onnxruntime-gpu 1.31.1, 2026-12-04)."""
    import ctypes

    for names in _TENSORRT_LIBRARIES:
        try:
            for name in names:
                ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def _usable_providers() -> list[str]:
    """onnxruntime's installed providers, less TensorRT when its libraries are missing."""
    have = list(ort.get_available_providers())
    if "TensorrtExecutionProvider" in have and not _tensorrt_loadable():
        have.remove("TensorrtExecutionProvider")
    return have


def available_devices() -> list[str]:
    """Devices whose onnxruntime execution provider is installed and can start (``cpu`` always;
    ``tensorrt`` only where TensorRT's libraries load)."""
    have = set(_usable_providers())
    return [d for d, p in _PROVIDERS.items() if p in have]


def physical_cores() -> int:
    """Physical CPU cores this process may use (hyper-threads not counted).

    Reads ``/proc/cpuinfo`` (``physical id``/``core id`` pairs) on Linux, limited by the
    process's CPU affinity; elsewhere ``os.cpu_count()``.
    """
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    try:
        phys = core = ""
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not key and core:  # blank line closes one processor entry
                    cores.add((phys, core))
                    core = ""
        if core:
            cores.add((phys, core))
    except OSError:
        pass
    n = len(cores) if cores else allowed
    # With hyper-threading, ``allowed`` logical CPUs hold about allowed * n / logical physical cores.
    logical = os.cpu_count() or allowed
    if cores and logical > n:
        n = max(1, round(allowed * n / logical))
    return max(1, min(n, allowed))


class CategoryError(ValueError):
    """A conditional bundle run without a category, or with one it was not trained on."""


def resolve_category(categories: Sequence[str], category: str | int | None) -> int:
    """The index of ``category`` (a name or an index) among a conditional model's ``categories``;
    ``None`` is allowed only when there is at most one.

    Raises:
        CategoryError: no category where several exist, or an unknown name or index.
    """
    if category is None:
        if len(categories) <= 1:
            return 0
        raise CategoryError(f"this model is conditional: pass a category, one of {list(categories)}")
    if isinstance(category, int) or str(category).isdigit():
        idx = int(category)
    elif category in categories:
        idx = list(categories).index(category)
    else:
        raise CategoryError(f"unknown category {category!r}; expected one of {list(categories)}")
    if not 0 <= idx < max(len(categories), 1):
        raise CategoryError(f"category index {idx} out of range for {len(categories)} categories")
    return idx


@dataclass
class ImageResult:
    """The verdict on one image.

    Attributes:
        path: the file (``None`` for arrays).
        score: raw image score (higher = more anomalous); ``nan`` on error.
        label: 1 anomalous, 0 normal (``-1`` on error or when the bundle has no threshold).
        threshold: the image threshold applied.
        probability: probability of a defect when the bundle has a probability calibration.
        anomaly_map: ``(S, S)`` float32 map at model resolution; for a tiled bundle ``(H', W')``,
            the stitched map at the tiling scale (:meth:`Preprocess.input_size`).
        reconstruction: ``(C, S, S)`` the model's ``x_hat`` (only if requested; ``(C, H', W')``
            stitched for a tiled bundle).
        original_size: ``(H, W)`` of the input image.
        error: why this image could not be scored.
        image: the decoded original ``(H, W)`` or ``(H, W, C)`` RGB(A) in its own pixel type
            (uint8, uint16, or float32 in [0, 1]), as ``anomaly.data.io.read_image(path, raw=True)``
            returns it (only with ``keep_image``; for drawing overlays without decoding the file
            twice), shrunk to at most ``keep_image`` px on its longest side when that is a number.
        regions: defect regions in original-image pixels, most anomalous first
            (:func:`anomaly.deploy.regions.find_regions` with the bundle's pixel threshold and the
            runtime's ``min_area``); ``[]`` when the map stays below the threshold, ``None`` when
            the bundle has no pixel threshold (``anomaly calibrate`` sets one), on error, or when
            the map holds NaN or infinite values.
    """

    path: str | None
    score: float = float("nan")
    label: int = -1
    threshold: float | None = None
    probability: float | None = None
    anomaly_map: np.ndarray | None = field(default=None, repr=False)
    reconstruction: np.ndarray | None = field(default=None, repr=False)
    original_size: tuple[int, int] | None = None
    error: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)
    regions: list[Region] | None = None


@dataclass
class PipelineStats:
    """What the last :meth:`Runtime.score_paths` call did (for tests and benchmarks).

    Attributes:
        batches: graph runs.
        images: paths consumed.
        peak_in_flight: most paths taken and not yet yielded at any moment.
        bound: the most there may be (see :meth:`Runtime.score_paths`).
    """

    batches: int = 0
    images: int = 0
    peak_in_flight: int = 0
    bound: int = 0


#: tiles per graph run of :meth:`Runtime.score_image` on a tiled bundle (``score_paths`` and
#: ``score_images`` use their ``batch_size``)
TILE_BATCH = 16

# One decoded item: (preprocessed (C, S, S) or (C, H', W') when tiled, original (H, W), decoded image
# or None) or the error.
_Decoded = tuple[np.ndarray, tuple[int, int], "np.ndarray | None"]


class Runtime:
    """Load a bundle once, then score images.

    Args:
        bundle: folder with ``model.onnx`` and ``model.json``.
        device: ``auto`` (TensorRT/CUDA when their provider is installed, else CPU), ``cpu``,
            ``cuda`` or ``tensorrt``. Asking for a provider that is not installed is an error that
            says which ones are.
        threads: intra-op threads (``None``: the physical cores this process may use on the CPU
            provider; 1 with a GPU provider, which leaves only shape computations to the CPU).
        category: for conditional models, the category name (or index) to condition on.
        decode_workers: worker threads of :meth:`score_paths` (``None``: the physical cores in
            the ``batch`` pipeline; as many as CPUs, at most 4, in the ``overlap`` one; ``0``:
            decode and infer in the calling thread, no overlap).
        prefetch: batches taken ahead of those being worked on (memory bound, images in flight:
            ``(workers + prefetch) * batch_size`` in the ``batch`` pipeline, ``(prefetch + 1) *
            batch_size`` in the ``overlap`` one).
        spin: let onnxruntime's idle intra-op threads busy-wait for work between operators
            (onnxruntime's own default). Only the multi-threaded session spins (:meth:`infer` of
            a single image or with ``split=False``, :meth:`score_image`, the ``overlap``
            pipeline); measured on 2 cores, +10-15 % images/s of pure inference against not
            spinning. Turn it off when other heavy threads share the cores with :meth:`infer`
            (they would wait for the spinning ones).
        nchwc: allow onnxruntime's NCHWc layout transformer (CPU): +10-20 % images/s for the
            default AAE at 128² batch 16 since SSIM blurs its five local means as one 5-channel
            depthwise convolution (it had cost 20 % when they were five 1-channel ones).
        pipeline: ``auto`` (``batch`` on the CPU provider, else ``overlap``), ``batch`` or
            ``overlap`` (see the module docstring).
        min_area: smallest region kept in ``ImageResult.regions``, in original pixels.
        tf32: let the CUDA provider run float32 convolutions and matrix products in TF32 (its own
            default). Off here: on an H200 it moved scores by up to 2.1e-4 relative to the CPU
            provider, against 1.8e-5 in full float32, for 25-30 % more images/s of pure inference
            (default AAE, 128² and 256², batch 16 and 256, 2026-12-04), which the audit does not
            see: there the CPU side sets the pace (README, GPU figures).
        split: :meth:`infer` runs a batch of N >= 2 as ``min(threads, N)`` slices side by side on
            the single-threaded session (module docstring). ``None``: on the CPU provider with
            more than one thread; ``False``: one call of the multi-threaded session.
    """

    def __init__(self, bundle: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 category: str | int | None = None, *, decode_workers: int | None = None, prefetch: int = 2,
                 spin: bool = True, nchwc: bool = True, pipeline: str = "auto", min_area: int = 16,
                 split: bool | None = None, tf32: bool = False) -> None:
        self.bundle = Path(bundle)
        self.tf32 = bool(tf32)
        self.meta = load_sidecar(self.bundle)
        self.preprocess = Preprocess.from_dict(self.meta["preprocess"])
        self.input_names: list[str] = list(self.meta["inputs"])
        self.output_names: list[str] = list(self.meta["outputs"])
        self.conditional = "label" in self.input_names
        self.categories: list[str] = list(self.meta["model"].get("categories", []))
        self.category_index = self._category(category)
        self.precision: str = str(self.meta.get("precision", "fp32"))
        self.providers = self._providers(device)
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if min_area < 0:
            raise ValueError(f"min_area must be >= 0, got {min_area}")
        self.min_area = int(min_area)
        self.prefetch = prefetch
        ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # A GPU session leaves the CPU only the few nodes its provider does not take (shapes): one
        # thread does them. With a pool of one per core the audit's CPU per image was 10.6 ms
        # against 8.7 with one thread, at the same images/s (H200, 16 cores, 2026-12-04,
        # benchmarks/audit_split.py --device cuda): the pool's threads spent cores the decoders
        # and writers could use.
        on_gpu = self.providers[0] != "CPUExecutionProvider"
        self.threads = int(threads) if threads else (1 if on_gpu else physical_cores())
        if pipeline not in ("auto", "batch", "overlap"):
            raise ValueError(f"unknown pipeline {pipeline!r}; expected auto, batch or overlap")
        if pipeline == "auto":
            pipeline = "batch" if self.providers[0] == "CPUExecutionProvider" else "overlap"
        self.pipeline = pipeline
        if decode_workers is None:
            decode_workers = self.threads if pipeline == "batch" else min(4, ncpu)
        self.decode_workers = max(0, int(decode_workers))
        self._nchwc = nchwc
        self._single: ort.InferenceSession | None = None  # the batch pipeline's 1-thread session
        self._slicer: ThreadPoolExecutor | None = None  # infer's threads for the slices of a batch
        self._slicer_lock = threading.Lock()
        self.session_options = self._session_options(self.threads, spin)
        self.session = self._new_session(self.session_options)
        # the sidecar's size and channels must be what the graph takes (BundleError otherwise)
        check_model_inputs(self.meta, [(i.name, i.shape) for i in self.session.get_inputs()], self.bundle / MODEL_FILE)
        got = self.session.get_providers()
        if device in ("cuda", "tensorrt") and self.providers[0] not in got:
            raise RuntimeError(f"{self.providers[0]} is installed but could not start (CUDA/cuDNN/TensorRT libraries "
                               f"missing or no GPU?); onnxruntime fell back to {got}")
        if self.providers[0] not in got:
            log.warning("%s could not start; running on %s", self.providers[0], got)
        cal = self.calibration
        self.calibrator = None
        if cal.get("image"):
            # numpy alone: importing scikit-learn for ThresholdCalibrator cost more than the model load
            self.calibrator = ImageDecision.from_dict(cal["image"])
        self.pixel_threshold: float | None = (cal.get("pixel") or {}).get("threshold")
        on_cpu = self.session.get_providers()[0] == "CPUExecutionProvider"
        self.split = (on_cpu and self.threads > 1) if split is None else bool(split) and self.threads > 1
        self.stats = PipelineStats()
        self._on_decode: Callable[[str], None] | None = None  # test hook: called in the worker per path

    # -- setup ---------------------------------------------------------------------------------
    @staticmethod
    def _session_options(threads: int, spin: bool) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # the graph is one chain: no branch parallelism to win
        opts.enable_mem_pattern = True  # same shapes batch after batch: plan the arena once
        opts.enable_cpu_mem_arena = True
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        return opts

    def _new_session(self, options: ort.SessionOptions) -> ort.InferenceSession:
        model_path = str(self.bundle / MODEL_FILE)
        try:
            providers = [(p, {"use_tf32": "1" if self.tf32 else "0"}) if p == "CUDAExecutionProvider" else p
                         for p in self.providers]
            return ort.InferenceSession(model_path, sess_options=options, providers=providers,
                                        disabled_optimizers=None if self._nchwc else ["NchwcTransformer"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(f"{model_path}: onnxruntime could not load the model with {self.providers[0]} ({exc})") from exc

    def _single_thread_session(self) -> ort.InferenceSession:
        """The ``batch`` pipeline's session: one intra-op thread; its workers call it concurrently
        (``InferenceSession.run`` is thread-safe and releases the GIL)."""
        with self._slicer_lock:
            if self._single is None:
                self._single = self._new_session(self._session_options(1, False))
        return self._single

    def _slices(self) -> ThreadPoolExecutor:
        with self._slicer_lock:
            if self._slicer is None:
                self._slicer = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="anomaly-infer")
        return self._slicer

    def close(self) -> None:
        """Stop :meth:`infer`'s slice threads (they also stop with the interpreter)."""
        with self._slicer_lock:
            if self._slicer is not None:
                self._slicer.shutdown(wait=True)
                self._slicer = None

    def _providers(self, device: str) -> list[str]:
        have = _usable_providers()
        if device == "auto":
            return [p for p in _AUTO_ORDER if p in have]
        if device not in _PROVIDERS:
            raise ValueError(f"unknown device {device!r}; expected auto, {', '.join(_PROVIDERS)}")
        if _PROVIDERS[device] not in ort.get_available_providers():
            hint = " (install onnxruntime-gpu in place of onnxruntime)" if device != "cpu" else ""
            raise RuntimeError(f"device {device!r} requested but onnxruntime has no {_PROVIDERS[device]}{hint}; "
                               f"available here: {', '.join(available_devices())}")
        if _PROVIDERS[device] not in have:
            raise RuntimeError(f"device {device!r} requested but TensorRT's libraries ({_TENSORRT_LIBRARIES[0][0]}, "
                               f"{_TENSORRT_LIBRARIES[0][1]}) cannot be loaded: install TensorRT 10 or use --device "
                               f"cuda; available here: {', '.join(available_devices())}")
        if device == "tensorrt":
            return [p for p in _AUTO_ORDER if p in have]
        return [_PROVIDERS[device], "CPUExecutionProvider"] if device != "cpu" else ["CPUExecutionProvider"]

    def _category(self, category: str | int | None) -> int | None:
        return resolve_category(self.categories, category) if self.conditional else None

    @property
    def category_name(self) -> str | None:
        """The category a conditional model runs for (``None`` for other models)."""
        if self.category_index is None:
            return None
        return self.categories[self.category_index] if self.category_index < len(self.categories) else str(self.category_index)

    @property
    def calibration(self) -> dict[str, Any]:
        """The sidecar's calibration in force for this runtime: a conditional model's own
        category's (``calibration.categories[name]``, written by ``anomaly calibrate --category``)
        when there is one, else the bundle's (without the ``categories`` table)."""
        cal = dict(self.meta.get("calibration") or {})
        own = (cal.pop("categories", None) or {}).get(self.category_name) if self.category_name is not None else None
        return dict(own) if own else cal

    @property
    def threshold(self) -> float | None:
        """The image threshold from the sidecar's calibration (``None`` if uncalibrated)."""
        return None if self.calibrator is None else float(self.calibrator.threshold)

    # -- inference -----------------------------------------------------------------------------
    def infer(self, batch: np.ndarray, labels: np.ndarray | None = None, *,
              session: ort.InferenceSession | None = None) -> dict[str, np.ndarray]:
        """Run the graph on a preprocessed batch ``(N, C, S, S)`` float32.

        Returns:
            dict with ``anomaly_map`` ``(N, 1, S, S)``, ``score`` ``(N,)``, ``reconstruction``
            ``(N, C, S, S)`` (float32 whatever the bundle's precision).
        """
        pre = self.preprocess
        expected = (pre.channels, pre.image_size, pre.image_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ValueError(f"expected a batch of shape (N, {expected[0]}, {expected[1]}, {expected[2]}), got {batch.shape}")
        feeds: dict[str, np.ndarray] = {"image": np.ascontiguousarray(batch, dtype=np.float32)}
        if self.conditional:
            if labels is None:
                labels = np.full(batch.shape[0], self.category_index or 0, dtype=np.int64)
            feeds["label"] = np.asarray(labels, dtype=np.int64).reshape(batch.shape[0])
        n = batch.shape[0]
        if session is None and self.split and n >= 2:
            single = self._single_thread_session()
            cuts = np.linspace(0, n, min(self.threads, n) + 1).round().astype(int)
            parts = [self._slices().submit(single.run, self.output_names, {k: v[a:b] for k, v in feeds.items()})
                     for a, b in zip(cuts[:-1], cuts[1:])]
            done = [f.result() for f in parts]
            outs = [np.concatenate([d[i] for d in done]) for i in range(len(self.output_names))]
        else:
            outs = (session or self.session).run(self.output_names, feeds)
        return {k: (v if v.dtype != np.float16 else v.astype(np.float32)) for k, v in zip(self.output_names, outs)}

    def _tiled(self, xs: Sequence[np.ndarray], keep_reconstruction: bool, tile_batch: int,
               session: ort.InferenceSession | None = None) -> dict[str, Any]:
        """Run preprocessed images ``[(C, H_i, W_i), ...]`` of a tiled bundle: each image's grid of
        tiles through the graph, ``tile_batch`` tiles per run (tiles of consecutive images share
        runs), the maps stitched. Returns ``score`` ``(N,)`` (each image's largest tile score),
        ``anomaly_map`` ``[(H_i, W_i), ...]`` and, when asked, ``reconstruction`` ``[(C, H_i, W_i), ...]``."""
        pre = self.preprocess
        t, ov = pre.image_size, pre.overlap
        for x in xs:
            if x.ndim != 3 or x.shape[0] != pre.channels or min(x.shape[1:]) < t:
                raise ValueError(f"expected a preprocessed image ({pre.channels}, H, W) with H, W >= {t}, got {x.shape}")
        maps = [Stitcher(x.shape[1:], t, ov) for x in xs]
        recons = [Stitcher(x.shape[1:], t, ov, channels=pre.channels) for x in xs] if keep_reconstruction else None
        best = np.full(len(xs), -np.inf)
        jobs = [(i, pos) for i, x in enumerate(xs) for pos in tile_grid(x.shape[1], x.shape[2], t, ov)]
        for a in range(0, len(jobs), tile_batch):
            part = jobs[a:a + tile_batch]
            tiles = np.stack([xs[i][:, y:y + t, x:x + t] for i, (y, x) in part])
            out = self.infer(tiles, session=session)
            for k, (i, pos) in enumerate(part):
                maps[i].add(out["anomaly_map"][k:k + 1], [pos])
                if recons is not None:
                    recons[i].add(out["reconstruction"][k:k + 1], [pos])
                best[i] = np.maximum(best[i], out["score"][k])  # a NaN tile makes the image's score NaN
        return {"score": best, "anomaly_map": [m.result() for m in maps],
                "reconstruction": [r.result() for r in recons] if recons is not None else None}

    def _results(self, batch: np.ndarray | Sequence[np.ndarray], paths: Sequence[str | None], sizes: Sequence[tuple[int, int]],
                 keep_reconstruction: bool, images: Sequence[np.ndarray | None] | None = None,
                 session: ort.InferenceSession | None = None, tile_batch: int = TILE_BATCH) -> list[ImageResult]:
        if self.preprocess.tiled:
            out = self._tiled(list(batch), keep_reconstruction, tile_batch, session)
            amaps, recons = out["anomaly_map"], out["reconstruction"]
        else:
            if not isinstance(batch, np.ndarray):
                batch = np.stack(list(batch))
            out = self.infer(batch, session=session)
            amaps, recons = out["anomaly_map"][:, 0], out["reconstruction"]
        scores = np.asarray(out["score"]).astype(np.float64)
        labels = self.calibrator.predict(scores) if self.calibrator is not None else np.full(len(scores), -1)
        probs = None
        if self.calibrator is not None and self.calibrator.has_probability:
            probs = self.calibrator.predict_proba(scores)
        threshold = self.threshold
        results = []
        for i, (p, size) in enumerate(zip(paths, sizes)):
            amap = amaps[i]
            results.append(ImageResult(
                path=p, score=float(scores[i]), label=int(labels[i]), threshold=threshold,
                probability=None if probs is None else float(probs[i]),
                anomaly_map=amap, regions=self.regions(amap, size),
                reconstruction=recons[i] if keep_reconstruction else None,
                original_size=size,
                image=None if images is None else images[i],
            ))
        return results

    def regions(self, anomaly_map: np.ndarray, original_size: tuple[int, int]) -> list[Region] | None:
        """Defect regions of a map ``(S, S)`` (or a tiled bundle's ``(H', W')``) in an original of ``(H, W)`` pixels (see
        ``ImageResult.regions``). A map whose maximum stays below the pixel threshold has none,
        which costs one pass over the map: most images on a line."""
        t = self.pixel_threshold
        if t is None:
            return None
        peak = float(anomaly_map.max())  # NaN when any value is
        if peak != peak:
            return None
        if not peak > t:  # bilinear resizing never exceeds the map's maximum
            return []
        try:
            return find_regions(anomaly_map, t, original_size=original_size, min_area=self.min_area)[1]
        except ValueError as exc:  # an infinite value: one image's problem, not the whole run's
            log.warning("no regions for a map of %s: %s", original_size, exc)
            return None

    def score_image(self, image: np.ndarray, keep_reconstruction: bool = False) -> ImageResult:
        """Score one decoded image ``(H, W)`` or ``(H, W, C)`` (uint8, uint16 or float in [0, 1])."""
        x = self.preprocess(image)
        return self._results([x] if self.preprocess.tiled else x[None], [None], [tuple(image.shape[:2])],
                             keep_reconstruction)[0]

    def score_batch(self, batch: np.ndarray | Sequence[np.ndarray], sizes: Sequence[tuple[int, int]],
                    keep_reconstruction: bool = False) -> list[ImageResult]:
        """Score a batch already made by :attr:`preprocess`: ``(N, C, S, S)`` float32, one input
        per image, whose originals were ``sizes`` ``[(H, W), ...]`` (for the regions); or a list of
        the per-image arrays (a tiled bundle's are ``(C, H_i, W_i)``, each its own size).

        The service decodes and preprocesses each request in its own worker thread and runs the
        images that arrived together as one batch; this gives each the verdict
        :meth:`score_image` gives it alone (same graph, same calibration, same regions).
        """
        n = batch.shape[0] if isinstance(batch, np.ndarray) else len(batch)
        if len(sizes) != n:
            raise ValueError(f"expected one original size per image: {n} images, {len(sizes)} sizes")
        return self._results(batch, [None] * len(sizes), [(int(h), int(w)) for h, w in sizes], keep_reconstruction)

    def score_images(self, images: Iterable[np.ndarray] | np.ndarray, batch_size: int = 16,
                     keep_reconstruction: bool = False) -> Iterator[ImageResult]:
        """Score decoded images in batches, in input order: the in-memory form of :meth:`score_paths`.

        Args:
            images: an iterable of images ``(H, W)`` or ``(H, W, C)`` (uint8, uint16 or float in
                [0, 1]; sizes may differ), consumed lazily (a camera's frames), or one array of
                same-sized images ``(N, H, W)`` / ``(N, H, W, C)``. One image alone goes to
                :meth:`score_image`.
            batch_size: images per graph run.
            keep_reconstruction: fill ``ImageResult.reconstruction``.

        Yields:
            one :class:`ImageResult` per image (``path`` ``None``). An image that cannot be
            preprocessed (wrong shape or channel count) yields a result whose ``error`` names its
            index, and the others are scored.

        Raises:
            ValueError: ``batch_size`` < 1, or an array that is not a stack of images.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(images, np.ndarray) and (images.ndim not in (3, 4) or images.dtype == object):
            raise ValueError(f"an array of images must be (N, H, W) or (N, H, W, C), got shape {images.shape}; "
                             "score one image with score_image()")
        source = iter(images)
        index = 0
        per_chunk = 1 if self.preprocess.tiled else batch_size  # a tiled image fills batches with its own tiles
        while chunk := list(itertools.islice(source, per_chunk)):
            items: list[_Decoded | ImageResult] = []
            for image in chunk:
                try:
                    image = np.asarray(image)
                    items.append((self.preprocess(image), (int(image.shape[0]), int(image.shape[1])), None))
                except (ValueError, TypeError, IndexError, cv2.error) as exc:
                    items.append(ImageResult(path=None, error=f"image {index}: {exc}"))
                index += 1
            yield from self._run_chunk([None] * len(chunk), items, keep_reconstruction,  # type: ignore[list-item]
                                       tile_batch=batch_size)

    def _decode(self, path: str, keep_image: bool | int) -> _Decoded | ImageResult:
        """Read + preprocess one file (runs in a worker thread); errors become a result."""
        if self._on_decode is not None:
            self._on_decode(path)
        try:
            img = read_image(path, raw=True)  # Preprocess gives the same input from raw or float pixels
            x = self.preprocess(img)
        except (ImageReadError, ValueError) as exc:
            return ImageResult(path=path, error=str(exc))
        except OSError as exc:
            return ImageResult(path=path, error=f"{path}: cannot read ({exc})")
        kept = img if keep_image is True else shrink(img, keep_image) if keep_image else None
        return x, (int(img.shape[0]), int(img.shape[1])), kept

    def _run_chunk(self, paths: list[str], items: list[_Decoded | ImageResult],
                   keep_reconstruction: bool, session: ort.InferenceSession | None = None,
                   tile_batch: int = TILE_BATCH) -> list[ImageResult]:
        """Infer the decoded items of one chunk and merge error rows back in input order."""
        ok = [i for i, it in enumerate(items) if not isinstance(it, ImageResult)]
        done: list[ImageResult] = []
        if ok:
            decoded = [items[i] for i in ok]
            arrays = [d[0] for d in decoded]  # type: ignore[index]
            batch = arrays if self.preprocess.tiled else np.stack(arrays)
            done = self._results(batch, [paths[i] for i in ok], [d[1] for d in decoded],  # type: ignore[index]
                                 keep_reconstruction, [d[2] for d in decoded], session, tile_batch)  # type: ignore[index]
        it = iter(done)
        return [item if isinstance(item, ImageResult) else next(it) for item in items]

    def score_paths(self, paths: Iterable[str | os.PathLike], batch_size: int = 16,
                    keep_reconstruction: bool = False, keep_image: bool | int = False) -> Iterator[ImageResult]:
        """Score files in batches, in input order, decoding ahead in worker threads.

        Unreadable files yield a result with ``error`` set instead of stopping the run. ``paths``
        is consumed lazily: at most ``stats.bound`` paths are in flight (taken and not yet
        yielded; ``(workers + prefetch) * batch_size`` in the ``batch`` pipeline), so memory
        stays bounded for any number of images.

        Args:
            paths: image files.
            batch_size: images per graph run (a chunk with unreadable files runs smaller); for a
                tiled bundle, tiles per graph run, and the chunks hold one image each.
            keep_reconstruction: fill ``ImageResult.reconstruction`` ``(C, S, S)``.
            keep_image: fill ``ImageResult.image`` with the decoded original ``(H, W[, C])``
                (``True``), or with a copy shrunk to at most this many px on its longest side (a
                number; what an overlay needs, where a 12-MP frame held 36 MB for each image in
                flight).

        Yields:
            one :class:`ImageResult` per path, in input order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(keep_image, bool) and not (isinstance(keep_image, (int, np.integer)) and keep_image > 0):
            raise ValueError(f"keep_image must be True, False or a size in px > 0, got {keep_image!r}")
        tile_batch = batch_size
        if self.preprocess.tiled:  # one image per chunk: its tiles fill the graph runs
            batch_size = 1
        bound = (self.prefetch + 1) * batch_size
        self.stats = stats = PipelineStats(bound=bound)
        source = iter(str(p) for p in paths)

        def next_chunk() -> list[str]:
            return list(itertools.islice(source, batch_size))

        if self.decode_workers == 0:  # sequential: decode a chunk, infer it, repeat
            stats.bound = batch_size
            while chunk := next_chunk():
                stats.images += len(chunk)
                stats.peak_in_flight = max(stats.peak_in_flight, len(chunk))
                results = self._run_chunk(chunk, [self._decode(p, keep_image) for p in chunk], keep_reconstruction,
                                          tile_batch=tile_batch)
                stats.batches += any(r.error is None for r in results)
                yield from results
            return
        if self.pipeline == "batch":  # a whole chunk per worker, on the single-threaded session
            stats.bound = (self.decode_workers + self.prefetch) * batch_size
            session = self._single_thread_session()  # created here, not racing in the workers

            def submit(pool: ThreadPoolExecutor, chunk: list[str]) -> list[Future]:
                return [pool.submit(self._decode_and_run, chunk, keep_reconstruction, keep_image, session, tile_batch)]

            def finish(chunk: list[str], futures: list[Future]) -> list[ImageResult]:
                return futures[0].result()

            depth = self.decode_workers + self.prefetch
        else:  # overlap: decoder threads prepare the next chunks while this thread infers the head one
            def submit(pool: ThreadPoolExecutor, chunk: list[str]) -> list[Future]:
                return [pool.submit(self._decode, p, keep_image) for p in chunk]

            def finish(chunk: list[str], futures: list[Future]) -> list[ImageResult]:
                return self._run_chunk(chunk, [f.result() for f in futures], keep_reconstruction, tile_batch=tile_batch)

            depth = self.prefetch + 1
        yield from self._pipelined(next_chunk, depth, submit, finish)

    def _decode_and_run(self, chunk: list[str], keep_reconstruction: bool, keep_image: bool | int,
                        session: ort.InferenceSession, tile_batch: int = TILE_BATCH) -> list[ImageResult]:
        """One chunk, start to end, in one worker thread."""
        items = [self._decode(p, keep_image) for p in chunk]
        return self._run_chunk(chunk, items, keep_reconstruction, session, tile_batch)

    def _pipelined(self, next_chunk: Callable[[], list[str]], depth: int,
                   submit: Callable[[ThreadPoolExecutor, list[str]], list[Future]],
                   finish: Callable[[list[str], list[Future]], list[ImageResult]]) -> Iterator[ImageResult]:
        """Keep ``depth`` chunks submitted to a pool of ``decode_workers`` threads and yield their
        results in input order; stopping early cancels what is queued."""
        stats = self.stats
        pending: collections.deque[tuple[list[str], list[Future]]] = collections.deque()
        in_flight = 0
        with ThreadPoolExecutor(max_workers=self.decode_workers, thread_name_prefix="anomaly-pipeline") as pool:
            try:
                while True:
                    while len(pending) < depth and (chunk := next_chunk()):
                        pending.append((chunk, submit(pool, chunk)))
                        in_flight += len(chunk)
                        stats.images += len(chunk)
                        stats.peak_in_flight = max(stats.peak_in_flight, in_flight)
                    if not pending:
                        break
                    chunk, futures = pending.popleft()
                    results = finish(chunk, futures)
                    del futures
                    stats.batches += any(r.error is None for r in results)
                    for r in results:
                        in_flight -= 1
                        yield r
            finally:  # the caller stopped early (or an error): drop what was queued
                for _, futures in pending:
                    for f in futures:
                        f.cancel()

    def describe(self) -> dict[str, Any]:
        """Short description for CLIs: model, input, providers, threshold, precision, threads."""
        pre = self.preprocess
        shape = f"{pre.channels}x{pre.image_size}x{pre.image_size}"
        if pre.tiled:
            shape += f" tiles at scale {pre.tile_scale:g}, overlap {pre.overlap} px"
        return {"model": self.meta["model"]["name"], "input": shape,
                "providers": self.session.get_providers(), "threshold": self.threshold, "precision": self.precision,
                "threads": self.threads, "pipeline": self.pipeline if self.decode_workers else "sequential",
                "split": self.split}

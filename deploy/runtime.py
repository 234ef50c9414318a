"""The deployed runtime: a bundle scored with onnxruntime. Torch-free (numpy, OpenCV, onnxruntime).

A test imports this module in a fresh interpreter and asserts ``torch`` never gets imported: a
line PC installs ``pip install .`` without the training stack.

Example::

    rt = Runtime("bundle/")
    for r in rt.score_paths(["part1.png", "part2.png"]):
        print(r.path, r.score, r.label)
    r = rt.score_image(image_array)          # (H, W[, C]) uint8/uint16/float
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from data.io import ImageReadError, read_image
from data.preprocess import Preprocess
from deploy.bundle import MODEL_FILE, BundleError, load_sidecar

__all__ = ["Runtime", "ImageResult", "available_devices"]

log = logging.getLogger(__name__)

_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def available_devices() -> list[str]:
    """Devices whose onnxruntime execution provider is installed (``cpu`` always)."""
    have = set(ort.get_available_providers())
    return [d for d, p in _PROVIDERS.items() if p in have]


@dataclass
class ImageResult:
    """The verdict on one image.

    Attributes:
        path: the file (``None`` for arrays).
        score: raw image score (higher = more anomalous); ``nan`` on error.
        label: 1 anomalous, 0 normal (``-1`` on error or when the bundle has no threshold).
        threshold: the image threshold applied.
        probability: probability of a defect when the bundle has a probability calibration.
        anomaly_map: ``(S, S)`` float32 map at model resolution.
        reconstruction: ``(C, S, S)`` the model's ``x_hat`` (only if requested).
        original_size: ``(H, W)`` of the input image.
        error: why this image could not be scored.
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


class Runtime:
    """Load a bundle once, then score images.

    Args:
        bundle: folder with ``model.onnx`` and ``model.json``.
        device: ``auto`` (CUDA when its provider is installed, else CPU), ``cpu``, ``cuda`` or
            ``tensorrt``. Asking for a provider that is not installed is an error that says which
            ones are.
        threads: intra-op threads (``None``: onnxruntime's default, all physical cores).
        category: for conditional models, the category name (or index) to condition on.
    """

    def __init__(self, bundle: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 category: str | int | None = None) -> None:
        self.bundle = Path(bundle)
        self.meta = load_sidecar(self.bundle)
        self.preprocess = Preprocess.from_dict(self.meta["preprocess"])
        self.input_names: list[str] = list(self.meta["inputs"])
        self.output_names: list[str] = list(self.meta["outputs"])
        self.conditional = "label" in self.input_names
        self.categories: list[str] = list(self.meta["model"].get("categories", []))
        self.category_index = self._category(category)
        self.providers = self._providers(device)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.bundle / MODEL_FILE), sess_options=opts, providers=self.providers)
        cal = self.meta.get("calibration") or {}
        self.calibrator = None
        if cal.get("image"):
            from anomaly.calibration import ThresholdCalibrator

            self.calibrator = ThresholdCalibrator.from_dict(cal["image"])
        self.pixel_threshold: float | None = (cal.get("pixel") or {}).get("threshold")

    # -- setup ---------------------------------------------------------------------------------
    def _providers(self, device: str) -> list[str]:
        have = ort.get_available_providers()
        if device == "auto":
            return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]
        if device not in _PROVIDERS:
            raise ValueError(f"unknown device {device!r}; expected auto, {', '.join(_PROVIDERS)}")
        if _PROVIDERS[device] not in have:
            raise RuntimeError(f"device {device!r} requested but onnxruntime has no {_PROVIDERS[device]}; "
                               f"available here: {', '.join(available_devices())}")
        return [_PROVIDERS[device], "CPUExecutionProvider"] if device != "cpu" else ["CPUExecutionProvider"]

    def _category(self, category: str | int | None) -> int | None:
        if not self.conditional:
            return None
        if category is None:
            if len(self.categories) == 1:
                return 0
            raise ValueError(f"this model is conditional: pass a category, one of {self.categories}")
        if isinstance(category, int) or str(category).isdigit():
            idx = int(category)
        elif category in self.categories:
            idx = self.categories.index(category)
        else:
            raise ValueError(f"unknown category {category!r}; expected one of {self.categories}")
        if not 0 <= idx < max(len(self.categories), 1):
            raise ValueError(f"category index {idx} out of range for {len(self.categories)} categories")
        return idx

    @property
    def threshold(self) -> float | None:
        """The image threshold from the sidecar's calibration (``None`` if uncalibrated)."""
        return None if self.calibrator is None else float(self.calibrator.threshold_)

    # -- inference -----------------------------------------------------------------------------
    def infer(self, batch: np.ndarray, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Run the graph on a preprocessed batch ``(N, C, S, S)`` float32.

        Returns:
            dict with ``anomaly_map`` ``(N, 1, S, S)``, ``score`` ``(N,)``, ``reconstruction``
            ``(N, C, S, S)``.
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
        outs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs))

    def _results(self, batch: np.ndarray, paths: Sequence[str | None], sizes: Sequence[tuple[int, int]],
                 keep_reconstruction: bool) -> list[ImageResult]:
        out = self.infer(batch)
        scores = out["score"].astype(np.float64)
        labels = self.calibrator.predict(scores) if self.calibrator is not None else np.full(len(scores), -1)
        probs = None
        if self.calibrator is not None and getattr(self.calibrator, "has_probability", False):
            probs = self.calibrator.predict_proba(scores)
        results = []
        for i, (p, size) in enumerate(zip(paths, sizes)):
            results.append(ImageResult(
                path=p, score=float(scores[i]), label=int(labels[i]), threshold=self.threshold,
                probability=None if probs is None else float(probs[i]),
                anomaly_map=out["anomaly_map"][i, 0],
                reconstruction=out["reconstruction"][i] if keep_reconstruction else None,
                original_size=size,
            ))
        return results

    def score_image(self, image: np.ndarray, keep_reconstruction: bool = False) -> ImageResult:
        """Score one decoded image ``(H, W)`` or ``(H, W, C)`` (uint8, uint16 or float in [0, 1])."""
        x = self.preprocess(image)[None]
        return self._results(x, [None], [tuple(image.shape[:2])], keep_reconstruction)[0]

    def score_paths(self, paths: Iterable[str | os.PathLike], batch_size: int = 16,
                    keep_reconstruction: bool = False) -> Iterator[ImageResult]:
        """Score files in batches, in input order. Unreadable files yield a result with ``error``
        set instead of stopping the run."""
        buf: list[np.ndarray] = []
        meta: list[tuple[str, tuple[int, int]]] = []
        pending: list[ImageResult | None] = []  # keeps input order across errors

        def flush() -> Iterator[ImageResult]:
            done = iter(self._results(np.stack(buf), [m[0] for m in meta], [m[1] for m in meta], keep_reconstruction)) if buf else iter(())
            for slot in pending:
                yield next(done) if slot is None else slot
            buf.clear()
            meta.clear()
            pending.clear()

        for path in paths:
            path = str(path)
            try:
                img = read_image(path)
                buf.append(self.preprocess(img))
                meta.append((path, tuple(img.shape[:2])))
                pending.append(None)
            except (ImageReadError, ValueError) as exc:
                pending.append(ImageResult(path=path, error=str(exc)))
            if len(buf) >= batch_size:
                yield from flush()
        yield from flush()

    def describe(self) -> dict[str, Any]:
        """Short description for CLIs: model, input, providers, threshold."""
        return {"model": self.meta["model"]["name"], "input": f"{self.preprocess.channels}x{self.preprocess.image_size}x{self.preprocess.image_size}",
                "providers": self.session.get_providers(), "threshold": self.threshold}

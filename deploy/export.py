"""Export a trained run to a bundle: ``model.onnx`` (torch -> ONNX) and ``model.json`` (sidecar).

The graph is :class:`anomaly.scoring.ReconstructionScorer`: reconstruct -> residual ->
(per-pixel normalisation) -> smoothing -> ``anomaly_map``, ``score``, ``reconstruction``, optionally
averaged over flipped views (``tta="flips"``, :class:`anomaly.scoring.FlipAveraged`). Input
``image`` ``(N, C, S, S)`` float32 in [0, 1] — exactly what :class:`data.preprocess.Preprocess`
produces — plus ``label`` ``(N,)`` int64 for conditional models; the batch axis is dynamic.

Export then scores the run's held-out validation images with onnxruntime to record normal score
statistics, a default threshold (1 % false positives on those images; ``anomaly calibrate``
replaces it with one fitted on a held-out normal folder), and the measured torch-vs-onnxruntime
difference on that batch.

Example::

    export_run("runs/x", "bundle/")
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomaly.scoring import TTA_MODES, ScoreOutput, Scorer, scoring_graph
from data.preprocess import Preprocess
from deploy.bundle import MODEL_FILE, SCHEMA_VERSION, sha256_file, write_sidecar
from training.run import load_run

__all__ = ["export_run", "export_onnx", "load_run", "OPSET"]

log = logging.getLogger(__name__)
OPSET = 18
# per-pixel std from fewer images is too noisy to divide by
MIN_NORMALIZATION_IMAGES = 16


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("anomaly", "torch", "onnx", "onnxruntime", "numpy", "opencv-python-headless", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def export_onnx(graph: torch.nn.Module, path: str | os.PathLike, example: torch.Tensor,
                conditional: bool, opset: int = OPSET) -> None:
    """Trace ``graph`` with the torch.export-based exporter into one self-contained ``.onnx`` file.

    Args:
        graph: the scorer graph (:func:`anomaly.scoring.scoring_graph`) in ``eval()`` mode.
        path: destination file (written atomically).
        example: ``(N, C, S, S)`` example input (N >= 2 so the batch axis stays symbolic).
        conditional: add the ``label`` input.
    """
    batch = torch.export.Dim("batch")
    if conditional:
        args: tuple = (example, torch.zeros(example.shape[0], dtype=torch.int64))
        shapes: tuple = ({0: batch}, {0: batch})
        names = ["image", "label"]
    else:
        args, shapes, names = (example,), ({0: batch},), ["image"]
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_file = Path(tmp) / path.name
        torch.onnx.export(graph, args, str(tmp_file), input_names=names, output_names=list(ScoreOutput._fields),
                          opset_version=opset, dynamo=True, dynamic_shapes=shapes, external_data=False,
                          verbose=False, report=False)
        os.replace(tmp_file, path)


@torch.no_grad()
def _normalization(model: torch.nn.Module, scorer: Scorer, val: np.ndarray, labels: np.ndarray | None) -> None:
    """Per-pixel mean/std of the raw residual on normal validation images."""
    x = torch.from_numpy(val)
    cond = None if labels is None else torch.from_numpy(labels)
    r = scorer.raw_residual(x, model(x, cond), model)
    scorer.set_normalization(r.mean(0, keepdim=True), r.std(0, keepdim=True) if len(r) > 1 else torch.ones_like(r[:1]))


@torch.no_grad()
def _mix_statistics(model: torch.nn.Module, scorer: Scorer, val: np.ndarray, labels: np.ndarray | None) -> None:
    """Global mean/std of each part of a mixed residual (``l1_learned``) on normal validation
    images, after per-pixel normalisation and smoothing: what standardises the parts before the sum."""
    from anomaly.scoring import gaussian_blur

    x = torch.from_numpy(val)
    cond = None if labels is None else torch.from_numpy(labels)
    parts = [gaussian_blur(p, scorer.smoothing_sigma) for p in scorer.components(x, model(x, cond), model)]
    scorer.set_mix_statistics(torch.stack([p.mean() for p in parts]), torch.stack([p.std() for p in parts]))


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, checkpoint: str = "best",
               scoring: dict[str, Any] | None = None, normalize: bool | None = None, opset: int = OPSET,
               tta: str = "none") -> Path:
    """Export ``run_dir`` to the bundle folder ``out_dir`` (created; existing files replaced).

    Args:
        run_dir: folder written by ``anomaly train``.
        out_dir: bundle folder.
        checkpoint: ``best`` or ``last``.
        scoring: overrides of the run's scoring settings (residual, smoothing_sigma, aggregate…).
        normalize: per-pixel normalisation of residuals by their statistics on the validation
            images. ``None`` (default) turns it on when there are at least
            :data:`MIN_NORMALIZATION_IMAGES` validation images: in benchmarks/results/quality.md it
            adds 0.04–0.13 image AUROC on ELPV for every trained model.
        opset: ONNX opset (>= 17).
        tta: ``none``, or ``flips``: the graph averages the maps of the image and its three flips
            (:class:`anomaly.scoring.FlipAveraged`; four times the inference). The normalisation
            statistics are those of single views; the threshold and parity are measured on the
            averaged graph, like any other.

    Returns:
        the bundle folder.

    Raises:
        ValueError: unknown ``tta``; normalisation or a mixed residual without validation images.
    """
    from anomaly.calibration import PixelThresholdCalibrator, ThresholdCalibrator
    from deploy.runtime import Runtime

    if tta not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {tta!r}; expected one of {TTA_MODES}")
    model, ckpt, cfg = load_run(run_dir, checkpoint)
    settings = {**cfg.scoring, **(scoring or {})}
    pre = Preprocess(image_size=cfg.image_size, channels=cfg.channels)
    scorer = Scorer(residual=settings["residual"], smoothing_sigma=settings["smoothing_sigma"],
                    aggregate=settings["aggregate"], topk_fraction=settings.get("topk_fraction", 0.01),
                    image_size=(cfg.image_size, cfg.image_size))
    split = json.loads((Path(run_dir) / "split.json").read_text())
    val_paths = split.get("val", [])
    val = pre.load_batch(val_paths) if val_paths else np.zeros((0, cfg.channels, cfg.image_size, cfg.image_size), np.float32)
    conditional = _is_conditional(ckpt)
    val_labels = np.asarray(split.get("val_categories", [0] * len(val_paths)), np.int64) if conditional else None
    if normalize is None:
        normalize = len(val) >= MIN_NORMALIZATION_IMAGES
        if not normalize:
            log.info("per-pixel normalisation off: %d validation images (< %d)", len(val), MIN_NORMALIZATION_IMAGES)
    if normalize:
        if len(val) < 2:
            raise ValueError("per-pixel normalisation needs at least 2 validation images; train with --val-fraction > 0")
        _normalization(model, scorer, val, val_labels)
    if len(scorer.parts) > 1:
        if len(val) < 2:
            raise ValueError(f"residual {scorer.residual!r} standardises its parts on normal validation images: "
                             f"found {len(val)}; train with --val-fraction > 0")
        _mix_statistics(model, scorer, val, val_labels)
    graph = scoring_graph(model, scorer, tta).eval()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(val[:2]) if len(val) >= 2 else torch.rand(2, cfg.channels, cfg.image_size, cfg.image_size)
    export_onnx(graph, out / MODEL_FILE, example, conditional, opset)

    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "preprocess": pre.to_dict(),
        "model": {"name": ckpt["model_name"], "kwargs": ckpt.get("model_kwargs", {}), "conditional": conditional,
                  "categories": ckpt.get("categories", []), "run": str(Path(run_dir).resolve()), "checkpoint": checkpoint,
                  "epochs": ckpt.get("epoch"), "val_error": ckpt.get("val")},
        "inputs": ["image", "label"] if conditional else ["image"],
        "outputs": list(ScoreOutput._fields),
        "scoring": {**scorer.config(), "tta": tta},
        "onnx": {"file": MODEL_FILE, "sha256": sha256_file(out / MODEL_FILE), "opset": opset},
        "versions": _versions(),
        "normal_stats": None,
        "calibration": None,
        "parity": None,
    }
    write_sidecar(out, meta)

    if len(val):
        rt = Runtime(out, device="cpu", category=0 if conditional else None)  # labels are passed per image below
        res = rt.infer(val, val_labels)
        scores = res["score"].astype(np.float64)
        with torch.no_grad():
            ref = graph(torch.from_numpy(val), None if val_labels is None else torch.from_numpy(val_labels))
        meta["parity"] = {
            "images": int(len(val)),
            "max_abs_diff_score": float(np.abs(ref.score.numpy() - res["score"]).max()),
            "max_abs_diff_map": float(np.abs(ref.anomaly_map.numpy() - res["anomaly_map"]).max()),
        }
        meta["normal_stats"] = _stats(scores, "validation split of the training folder (never trained on)")
        cal = ThresholdCalibrator(method="fpr", target_fpr=0.01).fit(scores)
        meta["calibration"] = {
            "image": cal.to_dict(),
            "pixel": PixelThresholdCalibrator(method="fpr", target_fpr=0.001).fit(res["anomaly_map"][:, 0]).to_dict(),
            "source": {"kind": "validation", "images": int(len(val))},
        }
        write_sidecar(out, meta)
        log.info("exported %s; parity on %d validation images: max |score diff| %.2e", out, len(val),
                 meta["parity"]["max_abs_diff_score"])
    else:
        log.warning("run has no validation images: the bundle has no threshold until `anomaly calibrate`")
    return out


def _is_conditional(ckpt: dict[str, Any]) -> bool:
    from anomaly.registry import get_spec

    return get_spec(ckpt["model_name"]).conditional


def _stats(scores: np.ndarray, source: str) -> dict[str, Any]:
    return {"n": int(len(scores)), "mean": float(scores.mean()), "std": float(scores.std()),
            "min": float(scores.min()), "max": float(scores.max()),
            "quantiles": {str(q): float(np.quantile(scores, q)) for q in (0.5, 0.9, 0.95, 0.99)}, "source": source}

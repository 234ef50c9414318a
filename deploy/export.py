"""Export a trained run to a bundle: ``model.onnx`` (torch -> ONNX) and ``model.json`` (sidecar).

The graph is :class:`anomaly.scoring.ReconstructionScorer`: reconstruct -> residual ->
(per-pixel normalisation) -> smoothing -> ``anomaly_map``, ``score``, ``reconstruction``, optionally
averaged over flipped views (``tta="flips"``, :class:`anomaly.scoring.FlipAveraged`). With a
latent score (``latent="knn"``, the default for AAEs) the image score also measures how far the
image's code lies from the codes of the normal training images, which the graph carries. Input
``image`` ``(N, C, S, S)`` float32 in [0, 1] — exactly what :class:`anomaly.data.preprocess.Preprocess`
produces — plus ``label`` ``(N,)`` int64 for conditional models; the batch axis is dynamic.

Export then scores the run's held-out validation images with onnxruntime to record normal score
statistics, a default threshold (1 % false positives on those images; ``anomaly calibrate``
replaces it with one fitted on a held-out normal folder), their scores as the drift alarm's
``reference_scores``, and the measured torch-vs-onnxruntime difference on them. Every pass over
the validation images (statistics, scoring, parity) runs :data:`EXPORT_BATCH` images at a time:
exporting a run with 2,000 validation images of 64² peaked at 1.4 GB RSS, against 3.4 GB in one
batch (``benchmarks/results/2026-12-07-export-memory.md``). The sidecar also records the sha256
of every training image (``training_split``), which calibration and evaluation check against.

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
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from anomaly.scoring import LATENT_SCORES, TTA_MODES, ScoreOutput, Scorer, encode_decode, scoring_graph
from anomaly.data.preprocess import Preprocess
from anomaly.deploy.bundle import MODEL_FILE, SCHEMA_VERSION, reference_scores, sha256_file, write_sidecar
from anomaly.training.config import TrainConfig
from anomaly.training.run import load_run

__all__ = ["export_run", "export_onnx", "build_scoring_graph", "ScoringGraph", "load_run", "training_split_hashes", "OPSET",
           "EXPORT_BATCH"]

log = logging.getLogger(__name__)
OPSET = 18
# per-pixel std from fewer images is too noisy to divide by
MIN_NORMALIZATION_IMAGES = 16
# models whose codes an adversary shapes to a prior: `latent="auto"` gives them the knn score
# (ELPV poly 0.774 -> 0.831 image AUROC over 3 seeds at 64²; the plain AE's codes do not help), up to
# LATENT_AUTO_MAX_SIZE: a 128² AAE's codes were nearly uninformative (poly, seed 0: 0.773 -> 0.725
# with knn). See benchmarks/results/2026-11-22-quality-latent-knn.md.
LATENT_AUTO_MODELS = ("aae", "cond_aae")
LATENT_AUTO_MAX_SIZE = 64
# the graph carries at most this many training codes (a deterministic subset beyond it); the
# distances take N x M x D floats: 33 MB for a batch of 64 with 64-d codes
MAX_LATENT_BANK = 2048
#: at most this many training images feed the texture statistics' bank (``texture="stats"``)
MAX_STATISTICS_IMAGES = 512
#: validation images per forward pass in export (statistics, scoring, parity): the model's
#: activations for 64 images of 64² are ~30 MB for the default AAE, against ~1 GB for 2,000 at once
EXPORT_BATCH = 64
#: a tiled run's validation statistics use at most this many tiles of each validation image (an
#: evenly spaced subset of its grid) and at most MAX_VAL_TILES in all: the per-pixel statistics are
#: per tile position, so a few thousand tiles pin them down, and memory stays bounded on big images
MAX_VAL_TILES_PER_IMAGE = 64
MAX_VAL_TILES = 4096


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


def _batches(val: np.ndarray, labels: np.ndarray | None, batch_size: int | None = None):
    """``(x, cond)`` torch batches of at most ``batch_size`` (default :data:`EXPORT_BATCH`)
    validation images: every pass of the export over the validation set runs the model on one
    such batch at a time, so its activations take the memory of a batch, not of the set."""
    batch_size = batch_size or EXPORT_BATCH
    for i in range(0, len(val), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(val[i:i + batch_size]))
        yield x, None if labels is None else torch.from_numpy(labels[i:i + batch_size])


class _Moments:
    """Running sum and sum of squares (float64) -> mean and unbiased std, as ``torch.std``
    computes them over all the values seen."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | float = 0.0
        self.sq: torch.Tensor | float = 0.0

    def add(self, values: torch.Tensor, dim: int | None = None) -> None:
        v = values.double()
        self.n += v.numel() if dim is None else v.shape[dim]
        self.sum = self.sum + (v.sum() if dim is None else v.sum(dim, keepdim=True))
        self.sq = self.sq + ((v * v).sum() if dim is None else (v * v).sum(dim, keepdim=True))

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.as_tensor(self.sum) / self.n
        var = (torch.as_tensor(self.sq) - self.n * mean * mean) / max(self.n - 1, 1)
        return mean.float(), var.clamp_min(0).sqrt().float()


@torch.no_grad()
def _normalization(model: torch.nn.Module, scorer: Scorer, val: np.ndarray, labels: np.ndarray | None) -> None:
    """Per-pixel mean/std of the raw residual on normal validation images (batch by batch)."""
    acc = _Moments()
    for x, cond in _batches(val, labels):
        acc.add(scorer.raw_residual(x, model(x, cond), model), dim=0)
    mean, std = acc.mean_std()
    scorer.set_normalization(mean, std if acc.n > 1 else torch.ones_like(mean))


@torch.no_grad()
def _mix_statistics(model: torch.nn.Module, scorer: Scorer, val: np.ndarray, labels: np.ndarray | None) -> None:
    """Global mean/std of each part of a mixed residual (``l1_learned``) on normal validation
    images, after per-pixel normalisation and smoothing: what standardises the parts before the sum."""
    from anomaly.scoring import gaussian_blur

    accs: list[_Moments] = []
    for x, cond in _batches(val, labels):
        parts = [gaussian_blur(p, scorer.smoothing_sigma) for p in scorer.components(x, model(x, cond), model)]
        accs = accs or [_Moments() for _ in parts]
        for acc, p in zip(accs, parts):
            acc.add(p)
    stats = [acc.mean_std() for acc in accs]
    scorer.set_mix_statistics(torch.stack([m for m, _ in stats]), torch.stack([s for _, s in stats]))


def _resolve_latent(latent: str, model_name: str, model: torch.nn.Module, split: dict[str, Any], conditional: bool,
                    k: int, image_size: int) -> str:
    """``auto`` -> ``knn`` for :data:`LATENT_AUTO_MODELS` at image sizes up to
    :data:`LATENT_AUTO_MAX_SIZE` when the run has what it needs (>= 2 validation images, >= ``k``
    training images, per class for conditional models), else ``none``; an explicit ``knn`` that
    cannot work raises."""
    if latent not in LATENT_SCORES + ("auto",):
        raise ValueError(f"unknown latent score {latent!r}; expected one of {LATENT_SCORES + ('auto',)}")
    if latent == "none":
        return latent
    n_val = len(split.get("val", []))
    classes = split.get("train_categories")
    if conditional and classes is None:
        problem = ("the training images' classes, which this run's split.json predates (retrain, or export "
                   "with latent 'none')")
    elif not (hasattr(model, "encode") and hasattr(model, "decode")):
        problem = f"a model with an encoder and a decoder (ae, vae, aae, cvae, cond_aae); {model_name!r} has none"
    elif n_val < 2:
        problem = f"at least 2 normal validation images to standardise its distance, found {n_val} (train with --val-fraction > 0)"
    else:
        if conditional:  # every class the model knows needs its own k codes
            counts = np.bincount(np.asarray(classes, dtype=np.int64), minlength=max(1, len(split.get("categories", []))))
            fewest = int(counts.min())
        else:
            fewest = len(split.get("train", []))
        problem = f"at least {k} training images{' of each class' if conditional else ''}, found {fewest}" if fewest < k else ""
    if latent == "auto":
        if model_name not in LATENT_AUTO_MODELS or image_size > LATENT_AUTO_MAX_SIZE:
            return "none"
        if problem:
            log.info("latent score off: knn needs %s", problem)
            return "none"
        return "knn"
    if problem:
        raise ValueError(f"latent 'knn' needs {problem}")
    return latent


@torch.no_grad()
def _latent_bank(model: torch.nn.Module, scorer: Scorer, pre: Preprocess, split: dict[str, Any],
                 conditional: bool, batch_size: int = 256) -> None:
    """Encode the run's training images (at most :data:`MAX_LATENT_BANK`, a fixed subset) into the
    scorer's bank; conditional models keep each code's class."""
    paths = list(split.get("train", []))
    labels = split.get("train_categories")
    keep = np.arange(len(paths))
    if len(paths) > MAX_LATENT_BANK:  # a fixed subset; per class for conditional models, so none falls below k
        rng = np.random.default_rng(0)
        if conditional:
            cls = np.asarray(labels, dtype=np.int64)
            per = max(scorer.latent_k, MAX_LATENT_BANK // len(np.unique(cls)))
            keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(cls == c))[:per] for c in np.unique(cls)]))
        else:
            keep = np.sort(rng.permutation(len(paths))[:MAX_LATENT_BANK])
        log.info("latent bank: %d of %d training images", len(keep), len(paths))
    codes = []
    for i in range(0, len(keep), batch_size):
        idx = keep[i:i + batch_size]
        x = torch.from_numpy(pre.load_batch([paths[j] for j in idx]))  # never tiled: see build_scoring_graph
        cond = torch.as_tensor([labels[j] for j in idx], dtype=torch.int64) if conditional else None
        codes.append(model.encode(x, cond))
    scorer.set_latent_bank(torch.cat(codes), torch.as_tensor([labels[j] for j in keep], dtype=torch.int64)
                           if conditional else None)


@torch.no_grad()
def _statistics_bank(scorer: Scorer, pre: Preprocess, split: dict[str, Any], batch_size: int = 64) -> None:
    """Fit the ``stats`` part's bank on the run's training images (at most
    :data:`MAX_STATISTICS_IMAGES`, a fixed subset)."""
    from anomaly.texture_stats import fit_statistics_bank

    paths = list(split.get("train", []))
    if not paths:
        raise ValueError("texture statistics need the run's normal training images; split.json lists none")
    if len(paths) > MAX_STATISTICS_IMAGES:
        keep = np.sort(np.random.default_rng(0).permutation(len(paths))[:MAX_STATISTICS_IMAGES])
        paths = [paths[j] for j in keep]
    if pre.tiled:  # a few tiles of each image: the bank describes what the graph sees
        batches = (torch.from_numpy(pre.load_tiles(paths[i:i + batch_size], max_tiles_per_image=4)[0])
                   for i in range(0, len(paths), batch_size))
    else:
        batches = (torch.from_numpy(pre.load_batch(paths[i:i + batch_size])) for i in range(0, len(paths), batch_size))
    scorer.set_statistics_bank(*fit_statistics_bank(batches))


@torch.no_grad()
def _score_mix(model: torch.nn.Module, scorer: Scorer, val: np.ndarray, labels: np.ndarray | None) -> None:
    """Mean/std of the map aggregate and of the latent distance on normal validation images."""
    chunks = []
    for x, cond in _batches(val, labels):
        z, x_hat = encode_decode(model, x, cond)
        chunks.append(torch.stack([scorer.image_score(scorer.anomaly_map(x, x_hat, model)), scorer.latent_distance(z, cond)]))
    parts = torch.cat(chunks, 1)
    scorer.set_score_mix(parts.mean(1), parts.std(1))


@dataclass
class ScoringGraph:
    """A trained run made ready to score: what :func:`export_run` exports and what the training-side
    :class:`anomaly.detector.AnomalyDetector` runs in torch (one definition for both).

    Attributes:
        graph: :class:`anomaly.scoring.ReconstructionScorer` (or its flip-averaged form) in
            ``eval()``; ``graph(x, cond)`` on ``(N, C, S, S)`` float32 in [0, 1] gives a
            :class:`anomaly.scoring.ScoreOutput`.
        scorer: its :class:`anomaly.scoring.Scorer`, with the statistics fitted on the validation images.
        preprocess: the run's :class:`anomaly.data.preprocess.Preprocess`.
        ckpt, config: the checkpoint dict and the run's :class:`anomaly.training.config.TrainConfig`.
        val: ``(V, C, S, S)`` the run's normal validation images, preprocessed (``V`` may be 0).
        val_labels: ``(V,)`` int64 classes of those images for conditional models, else ``None``.
        conditional: whether the model takes a class label.
    """

    graph: torch.nn.Module
    scorer: Scorer
    preprocess: Preprocess
    ckpt: dict[str, Any]
    config: TrainConfig
    val: np.ndarray
    val_labels: np.ndarray | None
    conditional: bool


def build_scoring_graph(run_dir: str | os.PathLike, *, checkpoint: str = "best", scoring: dict[str, Any] | None = None,
                        normalize: bool | None = None, tta: str = "none", latent: str | None = None) -> ScoringGraph:
    """Load ``run_dir`` and assemble its scoring graph, fitting the scorer's statistics (per-pixel
    normalisation, part and score mixing, latent bank) on the run's validation and training
    images. The arguments are :func:`export_run`'s, which documents them and the errors."""
    if tta not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {tta!r}; expected one of {TTA_MODES}")
    model, ckpt, cfg = load_run(run_dir, checkpoint)
    settings = {**cfg.scoring, **(scoring or {})}
    pre = Preprocess(image_size=cfg.image_size, channels=cfg.channels, tile_scale=cfg.tile_scale,
                     tile_overlap=cfg.tile_overlap)
    split = json.loads((Path(run_dir) / "split.json").read_text())
    val_paths = split.get("val", [])
    conditional = _is_conditional(ckpt)
    latent_k = int(settings.get("latent_k", 5))
    latent = latent or settings.get("latent", "auto")
    if pre.tiled and latent != "none":
        if latent == "knn":
            raise ValueError("latent 'knn' compares whole images' codes; a tiled run scores tiles: export with latent 'none'")
        latent = "none"
    latent = _resolve_latent(latent, ckpt["model_name"], model, split, conditional, latent_k, cfg.image_size)
    scorer = Scorer(residual=settings["residual"], smoothing_sigma=settings["smoothing_sigma"],
                    aggregate=settings["aggregate"], topk_fraction=settings.get("topk_fraction", 0.01),
                    image_size=(cfg.image_size, cfg.image_size), latent=latent,
                    latent_k=latent_k, colour=settings.get("colour", "rgb"), texture=settings.get("texture", "none"),
                    texture_weight=settings.get("texture_weight", 0.5), line_length=int(settings.get("line_length", 0)),
                    line_weight=float(settings.get("line_weight", 1.0)))
    val_labels = np.asarray(split.get("val_categories", [0] * len(val_paths)), np.int64) if conditional else None
    if pre.tiled:  # the statistics are the tiles' (what the graph sees): a bounded, evenly spaced subset
        per_image = max(1, min(MAX_VAL_TILES_PER_IMAGE, MAX_VAL_TILES // max(1, len(val_paths))))
        val, owner = pre.load_tiles(val_paths, max_tiles_per_image=per_image)
        val_labels = val_labels[owner] if val_labels is not None else None
        log.info("tiled run: statistics on %d tiles of %d validation images", len(val), len(val_paths))
    else:
        val = pre.load_batch(val_paths) if val_paths else np.zeros((0, cfg.channels, cfg.image_size, cfg.image_size), np.float32)
    if normalize is None:
        normalize = len(val) >= MIN_NORMALIZATION_IMAGES
        if not normalize:
            log.info("per-pixel normalisation off: %d validation images (< %d)", len(val), MIN_NORMALIZATION_IMAGES)
    if normalize:
        if len(val) < 2:
            raise ValueError("per-pixel normalisation needs at least 2 validation images; train with --val-fraction > 0")
        _normalization(model, scorer, val, val_labels)
    if scorer.texture == "stats":
        _statistics_bank(scorer, pre, split)
    if len(scorer.parts) > 1:
        if len(val) < 2:
            raise ValueError(f"scoring {'+'.join(scorer.parts)!r} standardises its parts on normal validation images: "
                             f"found {len(val)}; train with --val-fraction > 0")
        _mix_statistics(model, scorer, val, val_labels)
    if latent != "none":
        _latent_bank(model, scorer, pre, split, conditional)
        _score_mix(model, scorer, val, val_labels)
    graph = scoring_graph(model, scorer, tta).eval()
    return ScoringGraph(graph, scorer, pre, ckpt, cfg, val, val_labels, conditional)


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, checkpoint: str = "best",
               scoring: dict[str, Any] | None = None, normalize: bool | None = None, opset: int = OPSET,
               tta: str = "none", latent: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Export ``run_dir`` to the bundle folder ``out_dir`` (created; existing files replaced).

    Args:
        run_dir: folder written by ``anomaly train``.
        out_dir: bundle folder.
        checkpoint: ``best`` or ``last``.
        scoring: overrides of the run's scoring settings (residual, smoothing_sigma, aggregate…).
        normalize: per-pixel normalisation of residuals by their statistics on the validation
            images. ``None`` (default) turns it on when there are at least
            :data:`MIN_NORMALIZATION_IMAGES` validation images: in benchmarks/results/2026-11-21-quality-first-trials.md it
            adds 0.04–0.13 image AUROC on ELPV for every trained model.
        opset: ONNX opset (>= 17).
        tta: ``none``, or ``flips``: the graph averages the maps of the image and its three flips
            (:class:`anomaly.scoring.FlipAveraged`; four times the inference). The normalisation
            statistics are those of single views; the threshold and parity are measured on the
            averaged graph, like any other.
        latent: image-score term from the encoder's code (:data:`anomaly.scoring.LATENT_SCORES`
            or ``auto``). ``None`` (default) takes ``scoring["latent"]``, then the run's scoring
            settings, then ``auto``: ``knn`` for :data:`LATENT_AUTO_MODELS` up to
            :data:`LATENT_AUTO_MAX_SIZE` pixels a side, ``none`` otherwise.
            ``knn`` encodes the run's training images into the graph and standardises the distance
            and the map's aggregate on the validation images.
        progress: called as ``progress(done, total)`` while the exported graph is checked against
            torch and scored on the validation inputs (images, or a tiled run's tiles and then its
            images); a command shows it, library code does not print.

    Returns:
        the bundle folder.

    Raises:
        ValueError: unknown ``tta`` or ``latent``; normalisation, a mixed residual or a latent score
            without validation images; a latent score for a model without an encoder and decoder.
    """
    from anomaly.calibration import PixelThresholdCalibrator, ThresholdCalibrator
    from anomaly.deploy.runtime import Runtime

    built = build_scoring_graph(run_dir, checkpoint=checkpoint, scoring=scoring, normalize=normalize, tta=tta,
                                latent=latent)
    graph, scorer, pre, ckpt, cfg = built.graph, built.scorer, built.preprocess, built.ckpt, built.config
    val, val_labels, conditional = built.val, built.val_labels, built.conditional

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
        "training_split": training_split_hashes(run_dir),
        "recipe": cfg.recipe,
        "normal_stats": None,
        "calibration": None,
        "parity": None,
    }
    write_sidecar(out, meta)

    if len(val):
        rt = Runtime(out, device="cpu", category=0 if conditional else None)  # labels are passed per image below
        score_parts, map_parts = [], []
        diff_score = diff_map = 0.0
        val_paths = json.loads((Path(run_dir) / "split.json").read_text()).get("val", []) if pre.tiled else []
        total, done = len(val) + len(val_paths), 0
        if progress is not None:
            progress(0, total)
        for x, cond in _batches(val, val_labels):
            res = rt.infer(x.numpy(), None if cond is None else cond.numpy())
            with torch.no_grad():
                ref = graph(x, cond)
            diff_score = max(diff_score, float(np.abs(ref.score.numpy() - res["score"]).max()))
            diff_map = max(diff_map, float(np.abs(ref.anomaly_map.numpy() - res["anomaly_map"]).max()))
            score_parts.append(res["score"].astype(np.float64))
            map_parts.append(res["anomaly_map"][:, 0])
            done += len(x)
            if progress is not None:
                progress(done, total)
        scores = np.concatenate(score_parts)
        maps: np.ndarray | list[np.ndarray] = np.concatenate(map_parts)  # (V, S, S) float32: what the pixel threshold is fitted on
        meta["parity"] = {"images": int(len(val)), "max_abs_diff_score": diff_score, "max_abs_diff_map": diff_map}
        if pre.tiled:  # parity above is per tile; the statistics and thresholds are the stitched images'
            meta["parity"]["unit"] = "tiles"
            whole = []
            for r in rt.score_paths(val_paths, batch_size=4):
                done += 1
                if progress is not None:
                    progress(done, total)
                if r.error is None:
                    whole.append(r)
            scores = np.asarray([r.score for r in whole], np.float64)
            maps = [r.anomaly_map for r in whole]
        meta["normal_stats"] = _stats(scores, "validation split of the training folder (never trained on)")
        # Provisional thresholds until `anomaly calibrate`: 1 % of the validation images (0.1 % of
        # their pixels). Under 100 images 1 % cannot be resolved: the threshold is then their largest
        # score, whose false-positive rate is about 1 / n, and the sidecar records that rate rather
        # than a 1 % it cannot keep (the calibrator would warn about it on every small export). At most
        # 0.5: a rate must stay below 1, and one validation image is too few for any rate anyway.
        image_fpr = min(max(0.01, 1.0 / len(scores)), 0.5)
        cal = ThresholdCalibrator(method="fpr", target_fpr=image_fpr).fit(scores)
        meta["calibration"] = {
            "image": cal.to_dict(),
            "pixel": PixelThresholdCalibrator(method="fpr", target_fpr=0.001).fit(maps).to_dict(),
            "source": {"kind": "validation", "images": int(len(scores))},
            "reference_scores": reference_scores(scores),
        }
        write_sidecar(out, meta)
        log.info("exported %s; parity on %d validation %s: max |score diff| %.2e", out, len(val),
                 "tiles" if pre.tiled else "images",
                 meta["parity"]["max_abs_diff_score"])
        log.info("provisional image threshold %.4g at %.2g of the %d validation images; `anomaly calibrate` on "
                 "held-out normal images sets the real one", cal.threshold_, image_fpr, len(val))
    else:
        log.warning("run has no validation images: the bundle has no threshold until `anomaly calibrate`")
    return out


def training_split_hashes(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The sidecar's ``training_split``: sha256 of every training image of the run (sorted), so
    that calibration and evaluation can refuse them by content where the run folder is absent.

    Raises:
        FileNotFoundError: a training image listed in ``split.json`` is gone (the bundle could
            not vouch for what it was trained on).
    """
    paths = json.loads((Path(run_dir) / "split.json").read_text()).get("train", [])
    digests = set()
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: a training image of {run_dir} (listed in its split.json) is missing; "
                                    "the bundle records every training image's hash")
        digests.add(sha256_file(p))
    return {"algorithm": "sha256", "train": sorted(digests), "n_train": len(paths)}


def _is_conditional(ckpt: dict[str, Any]) -> bool:
    from anomaly.registry import get_spec

    return get_spec(ckpt["model_name"]).conditional


def _stats(scores: np.ndarray, source: str) -> dict[str, Any]:
    return {"n": int(len(scores)), "mean": float(scores.mean()), "std": float(scores.std()),
            "min": float(scores.min()), "max": float(scores.max()),
            "quantiles": {str(q): float(np.quantile(scores, q)) for q in (0.5, 0.9, 0.95, 0.99)}, "source": source}

"""The training-side detector: scikit-learn's ``fit`` / ``decision_function`` / ``predict`` over a run.

:class:`AnomalyDetector` is for notebooks and pipelines that hold images in memory. ``fit`` trains a
model (:func:`anomaly.training.run.train`, the same job as ``anomaly train``), then builds the same scoring
graph that ``anomaly export`` writes to ONNX (:func:`anomaly.deploy.export.build_scoring_graph`) and runs it
in torch. ``save`` writes that graph as a bundle for the torch-free :class:`anomaly.deploy.runtime.Runtime`,
with this detector's thresholds in the sidecar, so the runtime reproduces its scores and labels
(``tests/test_detector.py`` feeds both the same files).

Scores follow PyOD's sign: higher = more anomalous; ``predict`` gives 1 for a defect.

Example::

    from anomaly import AnomalyDetector
    det = AnomalyDetector(epochs=100, image_size=64).fit("data/normals")   # folder, files or arrays
    scores = det.decision_function(images)      # (N,) float64
    maps = det.anomaly_map(images)              # (N, S, S) float32
    labels = det.predict(images)                # (N,) 0/1, threshold_ from held-out normals
    det.save("bundle/")                         # -> anomaly audit / Runtime("bundle/")

Training is a long job: for budgets, progress, resume and checkpoints, ``anomaly train`` is the
tool; :meth:`AnomalyDetector.from_run` scores with a run it made.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from anomaly.training.config import train_defaults

__all__ = ["AnomalyDetector", "Images"]

log = logging.getLogger(__name__)
#: the training parameters' defaults: :class:`anomaly.training.config.TrainConfig`'s (one definition)
_D = train_defaults()

#: What the detector accepts as images: a folder (its images, recursively, sorted), an image file,
#: a sequence of files, a sequence of decoded images ``(H, W[, C])`` (uint8, uint16 or float in
#: [0, 1]; sizes may differ), or one array of same-sized images ``(N, H, W)`` / ``(N, H, W, C)``.
Images = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], Sequence[np.ndarray], np.ndarray]


class AnomalyDetector(BaseEstimator):
    """Reconstruction-based anomaly detector, trained on normal images only.

    The training parameters' defaults are :class:`anomaly.training.config.TrainConfig`'s (those of
    ``anomaly train``).

    Args:
        model: registry name (``anomaly models``; ``aae`` is the default reconstructor).
        image_size: model input side S.
        channels: 1 or 3; ``None``: from the first training image.
        epochs, max_minutes: the training budget (whichever ends first; ``None``: no time limit).
        batch_size: optimisation batch size.
        lr: learning rate (``None``: the objective's own default).
        val_fraction: share of the normal images held out for validation: checkpoint choice, the
            scorer's normalisation statistics and the default threshold. Never trained on.
        seed: seeds the split, the initialisation and the data order.
        device: ``auto``, ``cpu`` or ``cuda`` (training and torch scoring).
        augment: ``none``, ``flip`` or ``flip_rot90`` (:class:`anomaly.training.config.TrainConfig`).
        model_kwargs: passed to the model factory.
        scoring: overrides of the scoring settings (residual, smoothing_sigma, aggregate, ...).
        tta: ``none`` or ``flips`` (:func:`anomaly.deploy.export.export_run`).
        latent: ``None`` / ``auto``, ``knn`` or ``none``: the image score's latent term
            (:func:`anomaly.deploy.export.export_run`).
        checkpoint: ``best`` (lowest validation error) or ``last``.
        target_fpr: false-positive rate on normal images of the image threshold (``fit`` sets it
            on the validation images, :meth:`calibrate` on held-out ones).
        pixel_fpr: false-positive rate on normal pixels of the pixel threshold.
        work_dir: folder for the training run (and the training images given as arrays or a file
            list), kept. ``None``: a new temporary folder per ``fit``, which :meth:`save` and
            :meth:`calibrate` use while the detector lives; it is removed at the next ``fit``, when
            the detector is garbage-collected, or at interpreter exit (pass a ``work_dir`` to keep
            the run).

    Attributes (after ``fit``, :meth:`from_run` or :meth:`calibrate`):
        run_dir_: the training run folder.
        graph_: the torch scoring graph (``eval()``), the one ``save`` exports.
        preprocess_: the run's :class:`anomaly.data.preprocess.Preprocess`.
        categories_: class names of a conditional model (``[]`` otherwise).
        calibrator_: :class:`anomaly.calibration.ThresholdCalibrator` of the image scores, or
            ``None`` when the run has no validation images and :meth:`calibrate` was not called.
        threshold_: its threshold (``None`` without one).
        pixel_calibrator_: :class:`anomaly.calibration.PixelThresholdCalibrator` (or ``None``).
        calibration_source_: what the thresholds were fitted on: ``{"kind": "validation",
            "images": n}`` after ``fit``; after :meth:`calibrate`, ``"normal images"`` or
            ``"labelled images"`` with ``images``, ``n_normal`` and ``n_defects``.
    """

    def __init__(self, model: str = _D["model"], image_size: int = _D["image_size"], channels: int | None = _D["channels"],
                 epochs: int = _D["epochs"], max_minutes: float | None = _D["max_minutes"],
                 batch_size: int = _D["batch_size"], lr: float | None = _D["lr"], val_fraction: float = _D["val_fraction"],
                 seed: int = _D["seed"], device: str = _D["device"], augment: str = _D["augment"],
                 model_kwargs: dict[str, Any] | None = None, scoring: dict[str, Any] | None = None,
                 tta: str = "none", latent: str | None = None, checkpoint: str = "best", target_fpr: float = 0.01,
                 pixel_fpr: float = 0.001, work_dir: str | os.PathLike | None = None) -> None:
        self.model = model
        self.image_size = image_size
        self.channels = channels
        self.epochs = epochs
        self.max_minutes = max_minutes
        self.batch_size = batch_size
        self.lr = lr
        self.val_fraction = val_fraction
        self.seed = seed
        self.device = device
        self.augment = augment
        self.model_kwargs = model_kwargs
        self.scoring = scoring
        self.tta = tta
        self.latent = latent
        self.checkpoint = checkpoint
        self.target_fpr = target_fpr
        self.pixel_fpr = pixel_fpr
        self.work_dir = work_dir

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, X: Images, y: ArrayLike | None = None, *,
            progress: Callable[[dict[str, Any]], None] | None = None) -> "AnomalyDetector":
        """Train on normal images ``X``, then set the default thresholds on the validation images.

        Args:
            X: normal images (see :data:`Images`); a folder may also be an MVTec-style category
                (its ``train/good`` is used) or a folder of categories (for conditional models).
            y: ignored if ``None`` or all 0 (scikit-learn's signature); the detector learns from
                normal images only, so any other label is an error.
            progress: called with the trainer's batch and epoch events (``{"event": "batch" |
                "epoch", "epoch", "epochs", "logs", "elapsed", ...}``, as ``anomaly train``
                displays them); every epoch is also logged at INFO level.

        Returns:
            ``self``.

        Raises:
            ValueError: defective labels in ``y``, no images, a float image outside [0, 1].
            anomaly.data.folder.DatasetError: a folder without training images.

        A second ``fit`` with the same ``work_dir`` starts over: it replaces the run (and the
        written training images) of the first.
        """
        from anomaly.training.config import TrainConfig
        from anomaly.training.run import train

        if y is not None and np.any(np.asarray(y) != 0):
            raise ValueError(f"fit takes normal images only, but y marks {int(np.count_nonzero(np.asarray(y)))} "
                             "as defective; leave those out (or use calibrate() for a threshold)")
        self._drop_temporary()  # a refit's new temporary folder replaces the last one
        if self.work_dir is not None:
            work = Path(self.work_dir)
        else:  # ours: removed at the next fit, when the detector is collected, or at exit
            work = Path(tempfile.mkdtemp(prefix="anomaly-detector-"))
            self._temporary = weakref.finalize(self, shutil.rmtree, str(work), ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        data = _training_folder(X, work / "data")
        if (work / "run" / "config.json").is_file():  # refitting: a fresh run, not one resumed or appended to
            shutil.rmtree(work / "run")
        config = TrainConfig(data=str(data), out=str(work / "run"), model=self.model, image_size=self.image_size,
                             channels=self.channels, epochs=self.epochs, max_minutes=self.max_minutes,
                             batch_size=self.batch_size, lr=self.lr, val_fraction=self.val_fraction, seed=self.seed,
                             device=self.device, augment=self.augment, model_kwargs=dict(self.model_kwargs or {}))
        if self.scoring:
            config.scoring = {**config.scoring, **self.scoring}
        result = train(config, progress=progress)
        log.info("trained %s: %s", self.model, result)
        return self._load(work / "run")

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, **params: Any) -> "AnomalyDetector":
        """A fitted detector from a run folder of ``anomaly train`` (no training).

        ``params`` are constructor arguments; those that describe training (model, image size,
        epochs, ...) are taken from the run's ``config.json``.
        """
        from anomaly.training.config import TrainConfig

        cfg = TrainConfig.load(Path(run_dir) / "config.json")
        trained = {"model": cfg.model, "image_size": cfg.image_size, "channels": cfg.channels, "epochs": cfg.epochs,
                   "max_minutes": cfg.max_minutes, "batch_size": cfg.batch_size, "lr": cfg.lr,
                   "val_fraction": cfg.val_fraction, "seed": cfg.seed, "augment": cfg.augment,
                   "model_kwargs": cfg.model_kwargs or None, "work_dir": str(Path(run_dir).parent)}
        return cls(**{**trained, **params})._load(Path(run_dir))

    def _load(self, run_dir: Path) -> "AnomalyDetector":
        from anomaly.calibration import PixelThresholdCalibrator, ThresholdCalibrator
        from anomaly.deploy.export import build_scoring_graph

        built = build_scoring_graph(run_dir, checkpoint=self.checkpoint, scoring=self.scoring,
                                    tta=self.tta, latent=self.latent)
        self.run_dir_ = Path(run_dir)
        self.graph_ = built.graph
        self.preprocess_ = built.preprocess
        self.conditional_ = built.conditional
        self.categories_ = list(built.ckpt.get("categories", [])) if built.conditional else []
        self.calibrator_ = self.pixel_calibrator_ = self.threshold_ = None
        self.calibration_source_ = None
        self._reference_scores: Any = []
        if len(built.val):  # export_run's defaults: 1 % of normal images, 0.1 % of normal pixels (same thresholds;
            # export records the rate 1 / n it can keep under 100 images, this keeps the target asked for)
            out = self._run(built.val, built.val_labels)
            self.calibrator_ = ThresholdCalibrator(method="fpr", target_fpr=self.target_fpr).fit(out["score"])
            self.pixel_calibrator_ = PixelThresholdCalibrator(method="fpr", target_fpr=self.pixel_fpr).fit(out["anomaly_map"])
            self.threshold_ = float(self.calibrator_.threshold_)
            self.calibration_source_ = {"kind": "validation", "images": int(len(built.val))}
            self._reference_scores = out["score"]
        else:
            log.warning("run %s has no validation images: no threshold until calibrate()", run_dir)
        return self

    def calibrate(self, X: Images, y: ArrayLike | None = None, *, labels: ArrayLike | str | int | None = None,
                  method: str | None = None, probability: str | None = None) -> "AnomalyDetector":
        """Set the image and pixel thresholds on held-out images (never trained on); what ``anomaly
        calibrate`` does.

        Args:
            X: held-out images (see :data:`Images`).
            y: ``(N,)`` 0/1, 1 = defective; ``None``: all normal.
            labels: classes of a conditional model (see :meth:`decision_function`).
            method: :class:`anomaly.calibration.ThresholdCalibrator`'s method; ``None``: ``fpr`` at
                ``target_fpr`` on normal images only, ``f1`` when ``y`` marks defects.
            probability: ``isotonic`` or ``logistic``: also fit ``P(defect | score)`` for
                :meth:`predict_proba` (needs defects in ``y``).

        The pixel threshold is fitted on the normal images' maps at ``pixel_fpr``.

        Returns:
            ``self``.

        Raises:
            ValueError: ``y`` of another length or not 0/1; a method or probability model that
                needs defects without any (the calibrator's own errors).
        """
        from anomaly.calibration import PixelThresholdCalibrator, ThresholdCalibrator

        self._check_fitted()
        out = self._score(X, labels)
        n = len(out["score"])
        truth = np.zeros(n, dtype=np.int64) if y is None else np.asarray(y).ravel()
        if truth.shape != (n,) or not np.isin(truth, (0, 1)).all():
            raise ValueError(f"y must hold one 0/1 label per image ({n}), got {np.asarray(y).shape} with values "
                             f"{sorted(set(np.unique(truth).tolist()))[:5]}")
        if method is None:
            method = "f1" if truth.any() else "fpr"
        calibrator = ThresholdCalibrator(method=method, target_fpr=self.target_fpr, probability=probability)
        calibrator.fit(out["score"], truth)
        normal = truth == 0
        self.pixel_calibrator_ = PixelThresholdCalibrator(method="fpr", target_fpr=self.pixel_fpr).fit(out["anomaly_map"][normal])
        self.calibrator_ = calibrator
        self.threshold_ = float(calibrator.threshold_)
        self.calibration_source_ = {"kind": "normal images" if not truth.any() else "labelled images",
                                    "images": int(n), "n_normal": int(normal.sum()), "n_defects": int((~normal).sum())}
        self._reference_scores = out["score"][normal]  # the drift alarm's reference (the bundle's sidecar)
        return self

    # -- scoring -------------------------------------------------------------------------------
    def decision_function(self, X: Images, labels: ArrayLike | str | int | None = None,
                          batch_size: int = 32) -> np.ndarray:
        """Image scores ``(N,)`` float64, higher = more anomalous.

        Args:
            X: images (see :data:`Images`).
            labels: for a conditional model, the class of every image (name or index, one for
                all or one per image); ignored otherwise.
            batch_size: images per forward pass.

        Memory: one batch of images and the ``N`` scores. For large batches of files the exported
        bundle is faster (onnxruntime: 0.8 s against 2.1 s for 460 ELPV cells on 2 cores) and
        writes results as it goes: :meth:`save`, then ``anomaly audit`` or ``Runtime.score_paths``.
        """
        return self._score(X, labels, batch_size, maps=False)["score"]

    def anomaly_map(self, X: Images, labels: ArrayLike | str | int | None = None, batch_size: int = 32) -> np.ndarray:
        """Anomaly maps ``(N, S, S)`` float32 at model resolution (``labels``: see :meth:`decision_function`)."""
        return self._score(X, labels, batch_size)["anomaly_map"]

    def predict(self, X: Images, labels: ArrayLike | str | int | None = None, batch_size: int = 32) -> np.ndarray:
        """Labels ``(N,)`` int64: 1 where the score is above ``threshold_``, else 0.

        Raises:
            NotFittedError: before ``fit``, or when there is no threshold (a run without
                validation images; call :meth:`calibrate`).
        """
        self._check_fitted()
        if self.calibrator_ is None:
            raise NotFittedError("this detector has no threshold (its run has no validation images); "
                                 "call calibrate() with held-out normal images first")
        return self.calibrator_.predict(self.decision_function(X, labels, batch_size))

    def predict_proba(self, X: Images, labels: ArrayLike | str | int | None = None, batch_size: int = 32) -> np.ndarray:
        """Probability of a defect ``(N,)`` from the probability model that :meth:`calibrate`
        fitted with ``probability=`` and labelled defects.

        Raises:
            NotFittedError: before ``fit``.
            ValueError: no probability model (the message says how to fit one).
        """
        self._check_fitted()
        if self.calibrator_ is None or self.calibrator_.probability_model_ is None:
            raise ValueError("predict_proba needs a probability model: call calibrate(images, y, "
                             "probability='isotonic' or 'logistic') with labelled defects in y")
        return self.calibrator_.predict_proba(self.decision_function(X, labels, batch_size))

    def save(self, path: str | os.PathLike, opset: int | None = None) -> Path:
        """Export to a bundle folder for :class:`anomaly.deploy.runtime.Runtime` and ``anomaly audit``.

        The bundle's graph is :attr:`graph_` (same run, checkpoint and settings) and its sidecar
        carries this detector's thresholds, so the runtime gives the same scores (to float
        precision: fp32 onnxruntime against torch) and the same labels.

        Returns:
            the bundle folder.
        """
        from anomaly.deploy.bundle import reference_scores, update_calibration
        from anomaly.deploy.export import OPSET, export_run

        self._check_fitted()
        out = export_run(self.run_dir_, path, checkpoint=self.checkpoint, scoring=self.scoring,
                         tta=self.tta, latent=self.latent, opset=opset or OPSET)
        if self.calibrator_ is not None:
            update_calibration(out, {"image": self.calibrator_.to_dict(), "pixel": self.pixel_calibrator_.to_dict(),
                                     "source": dict(self.calibration_source_ or {}),
                                     "reference_scores": reference_scores(getattr(self, "_reference_scores", []))})
        return out

    # -- internals -----------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # a copy (pickle, deepcopy) uses the temporary folder but does not own it: the original removes it
        state = dict(super().__getstate__())
        state.pop("_temporary", None)
        return state

    def _drop_temporary(self) -> None:
        """Remove the temporary work folder of the last ``fit`` (``work_dir=None``), if any."""
        fin = getattr(self, "_temporary", None)
        if fin is not None:
            fin()  # a finalizer runs once: calling it removes the folder and detaches it
            self._temporary = None

    def _check_fitted(self) -> None:
        if not hasattr(self, "graph_"):
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet; call fit(images) or "
                                 "AnomalyDetector.from_run(run_dir) first")

    def _labels(self, labels: ArrayLike | str | int | None, n: int) -> np.ndarray | None:
        """Class indices ``(n,)`` int64 for a conditional model, else ``None``."""
        if not self.conditional_:
            return None
        if labels is None:
            raise ValueError(f"this model is conditional: pass labels= (one of {self.categories_}, by name or index)")
        values = [labels] * n if isinstance(labels, (str, int, np.integer)) else list(labels)  # type: ignore[arg-type]
        if len(values) != n:
            raise ValueError(f"labels: expected one value or one per image ({n}), got {len(values)}")
        out = []
        for v in values:
            if isinstance(v, str):
                if v not in self.categories_:
                    raise ValueError(f"unknown category {v!r}; this model knows {self.categories_}")
                v = self.categories_.index(v)
            if not 0 <= int(v) < max(1, len(self.categories_)):
                raise ValueError(f"category index {v} out of range for {len(self.categories_)} categories")
            out.append(int(v))
        return np.asarray(out, dtype=np.int64)

    def _score(self, X: Images, labels: ArrayLike | str | int | None, batch_size: int = 32,
               maps: bool = True) -> dict[str, Any]:
        """Decode and preprocess ``batch_size`` images at a time and run the graph on them.

        Memory holds one batch of inputs plus the outputs kept: ``N`` scores, and with ``maps``
        the ``N x S x S`` maps (16 GB for a million 64² maps, so the scores alone keep none)."""
        self._check_fitted()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        items = _images(X)
        classes = self._labels(labels, len(items))
        pre = self.preprocess_
        scores, kept = [], []
        for i in range(0, len(items), batch_size):
            batch = np.stack([_preprocess_one(pre, item, i + j) for j, item in enumerate(items[i:i + batch_size])])
            out = self._run(batch, None if classes is None else classes[i:i + batch_size], batch_size)
            scores.append(out["score"])
            if maps:
                kept.append(out["anomaly_map"])
        return {"score": np.concatenate(scores), "anomaly_map": np.concatenate(kept) if maps else None}

    def _run(self, batch: np.ndarray, labels: np.ndarray | None, batch_size: int = 32) -> dict[str, np.ndarray]:
        """The torch graph on ``(N, C, S, S)``: ``{"score": (N,) float64, "anomaly_map": (N, S, S) float32}``."""
        import torch

        scores, maps = [], []
        with torch.no_grad():
            for i in range(0, len(batch), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(batch[i:i + batch_size]))
                cond = None if labels is None else torch.from_numpy(labels[i:i + batch_size])
                out = self.graph_(x, cond)
                scores.append(out.score.double().numpy())
                maps.append(out.anomaly_map[:, 0].numpy())
        return {"score": np.concatenate(scores), "anomaly_map": np.concatenate(maps)}


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _images(X: Images) -> list[Any]:
    """Paths (str) or arrays, one per image, from any :data:`Images` form; checked before any work."""
    from anomaly.deploy.audit import expand_inputs

    if _is_path(X):
        paths = [str(p) for p in expand_inputs([X])]  # type: ignore[list-item]
        if not paths:
            raise ValueError(f"{X}: no images found")
        return paths
    if isinstance(X, np.ndarray):
        if X.ndim not in (3, 4) or X.dtype == object:
            raise ValueError(f"an array of images must be (N, H, W) or (N, H, W, C), got shape {X.shape}; "
                             "pass one image as [image]")
        if len(X) == 0:
            raise ValueError("no images: the array is empty")
        return list(X)
    items = list(X)
    if not items:
        raise ValueError("no images: the sequence is empty")
    if all(_is_path(p) for p in items):
        return [os.fspath(p) for p in items]
    if all(isinstance(p, np.ndarray) for p in items):
        bad = [i for i, a in enumerate(items) if a.ndim not in (2, 3)]
        if bad:
            raise ValueError(f"image {bad[0]} has shape {items[bad[0]].shape}; expected (H, W) or (H, W, C)")
        return items
    raise TypeError("images must be a folder, a file, a sequence of files, a sequence of arrays or one array; "
                    f"got a sequence of {sorted({type(p).__name__ for p in items})}")


def _preprocess_one(pre: Any, item: str | np.ndarray, index: int) -> np.ndarray:
    """``(C, S, S)`` float32 of one image; a file is decoded as the runtime decodes it."""
    from anomaly.data.io import read_image

    image = read_image(item, raw=True) if isinstance(item, str) else item
    try:
        return pre(image)
    except ValueError as exc:
        raise ValueError(f"image {index}{f' ({item})' if isinstance(item, str) else ''}: {exc}") from exc


def _training_folder(X: Images, folder: Path) -> Path:
    """A folder ``anomaly train`` reads: ``X`` itself when it is one, else ``folder`` filled with
    links to the files (copies where links fail) or with PNGs of the arrays (uint8 and uint16 as
    they are, floats in [0, 1] as 16-bit)."""
    import shutil

    from anomaly.data.io import IMAGE_EXTENSIONS

    if _is_path(X) and Path(X).is_dir():  # type: ignore[arg-type]
        return Path(X)  # type: ignore[arg-type]
    items = _images(X)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, item in enumerate(items):
        if isinstance(item, str):
            suffix = Path(item).suffix.lower()
            if suffix not in IMAGE_EXTENSIONS:
                raise ValueError(f"{item}: not an image file name (expected one of {IMAGE_EXTENSIONS})")
            target = folder / f"{i:07d}{suffix}"
            try:
                target.symlink_to(os.path.abspath(item))
            except OSError:
                shutil.copyfile(item, target)
        else:
            _write_png(folder / f"{i:07d}.png", item)
    return folder


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    img = image
    if img.dtype not in (np.uint8, np.uint16):
        f = np.asarray(img, dtype=np.float64)
        if f.size and (np.nanmin(f) < 0.0 or np.nanmax(f) > 1.0 or not np.isfinite(f).all()):
            raise ValueError(f"a float image must hold values in [0, 1]; got [{np.nanmin(f):.3g}, {np.nanmax(f):.3g}]")
        img = (f * 65535.0 + 0.5).astype(np.uint16)
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA)
    if not cv2.imwrite(str(path), img):
        raise ValueError(f"could not write training image {path.name} of shape {image.shape}")

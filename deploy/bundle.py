"""The deployable bundle: ``model.onnx`` + ``model.json`` (the sidecar), checked on load.

The sidecar (schema version :data:`SCHEMA_VERSION`) is a JSON object with:

* ``schema_version`` (int), ``created`` (ISO time), ``versions`` (package versions);
* ``preprocess``: :meth:`anomaly.data.preprocess.Preprocess.to_dict` (``image_size`` S, ``channels``;
  a tiled bundle's ``tile_scale`` in (0, 4] and ``tile_overlap`` in [0, 0.75]);
* ``model``: ``name``, ``kwargs``, ``conditional``, ``categories``, the run it came from;
* ``inputs`` (``["image"]`` or ``["image", "label"]``) and ``outputs`` (the graph's output names);
* ``scoring``: the residual and map settings the graph computes (:meth:`anomaly.scoring.Scorer.config`);
* ``onnx``: ``file``, ``sha256``, ``opset``;
* ``normal_stats``: score statistics of the normal validation images;
* ``training_split``: ``{"algorithm": "sha256", "train": [hex digest of each training image's
  file, sorted], "n_train": N}``: lets ``anomaly calibrate`` and ``anomaly evaluate`` refuse images the
  model was trained on by content, without the run folder (a line PC has none);
* ``calibration``: ``image`` and ``pixel`` thresholds with the method that made them
  (:meth:`anomaly.calibration.ThresholdCalibrator.to_dict`), ``source`` (what they were fitted on),
  ``reference_scores`` (the image scores of the normal images the calibration used: the
  validation images at export, the held-out normal folder after ``anomaly calibrate``; a list of at
  most :data:`MAX_REFERENCE_SCORES` floats, a fixed random subsample when there were more) — the
  reference of the service's drift alarm — and, for a conditional model of several categories,
  ``categories``: ``{name: {image, pixel, source, reference_scores}}`` per category;
* ``parity``: the measured torch-vs-onnxruntime difference on the validation images.

Thresholds live here, not in the graph, so a line engineer can move them without re-exporting. On
load the sidecar is checked: schema version, types and ranges of the fields the runtime uses (a
NaN, infinite or — for scores that cannot be negative — negative threshold, an image size outside
[8, :data:`MAX_IMAGE_SIZE`], ...) and the ONNX file's sha256; each problem is a
:class:`BundleError` naming the field, what was expected and what was found.

Torch-free: numpy and the standard library only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from anomaly.data.io import atomic_write_text

__all__ = ["SCHEMA_VERSION", "MODEL_FILE", "SIDECAR_FILE", "MAX_IMAGE_SIZE", "MAX_REFERENCE_SCORES", "BundleError",
           "sha256_file", "load_sidecar", "check_sidecar", "check_model_inputs", "write_sidecar", "update_calibration",
           "reference_scores", "training_hashes", "find_training_images", "trained_on", "training_images_message"]

SCHEMA_VERSION = 1
MODEL_FILE = "model.onnx"
SIDECAR_FILE = "model.json"
#: largest model input side a sidecar may declare (a 8192² RGB float batch of one is 800 MB)
MAX_IMAGE_SIZE = 8192
#: the sidecar keeps at most this many calibration scores for the drift alarm (a fixed subsample beyond)
MAX_REFERENCE_SCORES = 5000
# a threshold of scores that cannot be negative may still sit a rounding error below 0
_NEGATIVE_TOLERANCE = 1e-6
_HEX64 = re.compile(r"[0-9a-f]{64}")
log = logging.getLogger(__name__)


class BundleError(ValueError):
    """A bundle folder that is missing, incomplete, from another schema, out of range, or tampered with."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_sidecar(bundle: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Read and check ``bundle/model.json``.

    Args:
        bundle: the bundle folder.
        verify: check the ONNX file's sha256 against the sidecar.

    Raises:
        BundleError: missing folder or files, unreadable JSON, other schema version, a field of
            the wrong type or out of range (:func:`check_sidecar`), hash mismatch.
    """
    root = Path(bundle)
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle folder (expected a folder written by `anomaly export`)")
    side, onnx_path = root / SIDECAR_FILE, root / MODEL_FILE
    for f in (side, onnx_path):
        if not f.is_file():
            raise BundleError(f"{root}: missing {f.name} (a bundle holds {MODEL_FILE} and {SIDECAR_FILE})")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{side}: not valid JSON ({exc})") from exc
    check_sidecar(meta, side)
    if verify:
        expected = meta["onnx"]["sha256"]
        actual = sha256_file(onnx_path)
        if expected != actual:
            raise BundleError(f"{onnx_path}: sha256 {actual[:12]}… does not match the sidecar's {str(expected)[:12]}…; "
                              "the model file was modified or belongs to another bundle — re-export it")
    return meta


# -- checks ------------------------------------------------------------------------------------
def _fail(where: Any, field: str, expected: str, found: Any) -> BundleError:
    shown = repr(found)
    return BundleError(f"{where}: {field} must be {expected}, found {shown if len(shown) <= 80 else shown[:77] + '...'}")


def _dict(where: Any, meta: dict, key: str, field: str, optional: bool = False) -> dict | None:
    value = meta.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise _fail(where, field, "an object", value)
    return value


def _int(where: Any, value: Any, field: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, field, "an integer", value)
    if value < lo or (hi is not None and value > hi):
        raise _fail(where, field, f"in [{lo}, {hi}]" if hi is not None else f">= {lo}", value)
    return value


def _number(where: Any, value: Any, field: str) -> float:
    """A finite JSON number (not a bool, NaN or an infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(where, field, "a finite number", value)
    return float(value)


def _signed_scores(scoring: dict[str, Any]) -> tuple[bool, bool]:
    """Whether the graph's (image scores, map values) can be negative: standardised parts
    (per-pixel normalisation, mixed parts, the latent knn term) can; raw residuals cannot."""
    map_signed = bool(scoring.get("normalized")) or "mix" in scoring
    return map_signed or scoring.get("latent", "none") != "none", map_signed


def _check_threshold(where: Any, d: Any, field: str, signed: bool) -> None:
    if not isinstance(d, dict):
        raise _fail(where, field, "an object (a fitted calibrator's to_dict())", d)
    t = _number(where, d.get("threshold"), f"{field}.threshold")
    if not signed and t < -_NEGATIVE_TOLERANCE:
        raise _fail(where, f"{field}.threshold", ">= 0 (this bundle's scores cannot be negative)", t)
    for key in ("expected_fpr", "recall"):
        v = d.get(key)
        if v is not None and not 0.0 <= _number(where, v, f"{field}.{key}") <= 1.0:
            raise _fail(where, f"{field}.{key}", "in [0, 1]", v)


def _check_calibration(where: Any, cal: dict, field: str, scoring: dict[str, Any]) -> None:
    image_signed, map_signed = _signed_scores(scoring)
    if cal.get("image") is not None:
        _check_threshold(where, cal["image"], f"{field}.image", image_signed)
    if cal.get("pixel") is not None:
        _check_threshold(where, cal["pixel"], f"{field}.pixel", map_signed)
    ref = cal.get("reference_scores")
    if ref is not None:
        if not isinstance(ref, list) or len(ref) > MAX_REFERENCE_SCORES:
            raise _fail(where, f"{field}.reference_scores", f"a list of at most {MAX_REFERENCE_SCORES} numbers",
                        type(ref).__name__ if not isinstance(ref, list) else f"{len(ref)} values")
        for i, v in enumerate(ref):
            _number(where, v, f"{field}.reference_scores[{i}]")


def check_sidecar(meta: Any, where: Any = SIDECAR_FILE) -> None:
    """Raise :class:`BundleError` unless ``meta`` is a sidecar of this schema whose fields have
    the types and ranges the runtime relies on (see the module docstring). ``where`` names the
    file in messages."""
    if not isinstance(meta, dict):
        raise _fail(where, "the sidecar", "a JSON object", type(meta).__name__)
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise BundleError(f"{where}: schema version {version!r}, this anomaly reads version {SCHEMA_VERSION}; "
                          "re-export the bundle with this version")
    pre = _dict(where, meta, "preprocess", "preprocess")
    _int(where, pre.get("image_size"), "preprocess.image_size", 8, MAX_IMAGE_SIZE)
    if pre.get("channels") not in (1, 3) or isinstance(pre.get("channels"), bool):
        raise _fail(where, "preprocess.channels", "1 or 3", pre.get("channels"))
    if pre.get("tile_scale") is not None:  # a tiled bundle
        if not 0.0 < _number(where, pre["tile_scale"], "preprocess.tile_scale") <= 4.0:
            raise _fail(where, "preprocess.tile_scale", "a pixel scale in (0, 4] (1 = native pixels)", pre["tile_scale"])
        if not 0.0 <= _number(where, pre.get("tile_overlap", 0.25), "preprocess.tile_overlap") <= 0.75:
            raise _fail(where, "preprocess.tile_overlap", "a fraction in [0, 0.75]", pre.get("tile_overlap"))
    model = _dict(where, meta, "model", "model")
    if not isinstance(model.get("name"), str) or not model["name"]:
        raise _fail(where, "model.name", "a registry name (a non-empty string)", model.get("name"))
    cats = model.get("categories", [])
    if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
        raise _fail(where, "model.categories", "a list of names", cats)
    if meta.get("inputs") not in (["image"], ["image", "label"]):
        raise _fail(where, "inputs", "['image'] or ['image', 'label']", meta.get("inputs"))
    outputs = meta.get("outputs")
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs) \
            or not {"anomaly_map", "score"} <= set(outputs):
        raise _fail(where, "outputs", "a list of output names with 'anomaly_map' and 'score'", outputs)
    onnx = _dict(where, meta, "onnx", "onnx")
    if not isinstance(onnx.get("sha256"), str) or not _HEX64.fullmatch(onnx["sha256"]):
        raise _fail(where, "onnx.sha256", "64 lowercase hex digits", onnx.get("sha256"))
    scoring = _dict(where, meta, "scoring", "scoring", optional=True) or {}
    if "smoothing_sigma" in scoring and _number(where, scoring["smoothing_sigma"], "scoring.smoothing_sigma") < 0:
        raise _fail(where, "scoring.smoothing_sigma", ">= 0", scoring["smoothing_sigma"])
    if "topk_fraction" in scoring and not 0 < _number(where, scoring["topk_fraction"], "scoring.topk_fraction") <= 1:
        raise _fail(where, "scoring.topk_fraction", "in (0, 1]", scoring["topk_fraction"])
    stats = _dict(where, meta, "normal_stats", "normal_stats", optional=True)
    if stats is not None:
        for key in ("mean", "std", "min", "max"):
            if key in stats:
                _number(where, stats[key], f"normal_stats.{key}")
    split = _dict(where, meta, "training_split", "training_split", optional=True)
    if split is not None:
        digests = split.get("train")
        if not isinstance(digests, list) or not all(isinstance(d, str) and _HEX64.fullmatch(d) for d in digests):
            raise _fail(where, "training_split.train", "a list of sha256 hex digests",
                        type(digests).__name__ if not isinstance(digests, list) else "a list with other values")
    cal = _dict(where, meta, "calibration", "calibration", optional=True)
    if cal is not None:
        _check_calibration(where, cal, "calibration", scoring)
        per = cal.get("categories")
        if per is not None:
            if not isinstance(per, dict):
                raise _fail(where, "calibration.categories", "an object of category name -> calibration", per)
            for name, c in per.items():
                if not isinstance(c, dict):
                    raise _fail(where, f"calibration.categories[{name!r}]", "an object", c)
                _check_calibration(where, c, f"calibration.categories[{name!r}]", scoring)


def check_model_inputs(meta: dict[str, Any], inputs: Sequence[tuple[str, Sequence[Any]]], where: Any = MODEL_FILE) -> None:
    """Refuse a sidecar whose input size or channels the ONNX graph cannot take.

    Args:
        meta: a checked sidecar.
        inputs: the graph's inputs as ``(name, shape)``; a shape entry is an int or a symbolic
            name (the batch axis). ``image`` must be ``(N, channels, S, S)`` as the sidecar says.

    Raises:
        BundleError: the graph's inputs are not the sidecar's ``inputs``, or ``image``'s fixed
            dimensions differ from the sidecar's channels and image size.
    """
    names = [n for n, _ in inputs]
    if names != list(meta["inputs"]):
        raise BundleError(f"{where}: the graph's inputs are {names}, the sidecar says {meta['inputs']}; "
                          "the sidecar belongs to another model — re-export the bundle")
    shape = list(dict(inputs)["image"])
    want = [meta["preprocess"]["channels"], meta["preprocess"]["image_size"], meta["preprocess"]["image_size"]]
    fixed = [d if isinstance(d, int) else None for d in shape[1:]]
    if len(shape) != 4 or any(f is not None and f != w for f, w in zip(fixed, want)):
        raise BundleError(f"{where}: the graph takes images of shape {shape}, the sidecar's preprocessing makes "
                          f"(N, {want[0]}, {want[1]}, {want[2]}); the sidecar does not belong to this model — re-export it")


# -- writing -----------------------------------------------------------------------------------
def write_sidecar(bundle: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Write ``bundle/model.json`` atomically and durably (fsync'd file and folder).

    Raises:
        BundleError: ``meta`` fails :func:`check_sidecar` (nothing is written).
    """
    check_sidecar(meta, Path(bundle) / SIDECAR_FILE)
    atomic_write_text(Path(bundle) / SIDECAR_FILE, json.dumps(meta, indent=2, sort_keys=False) + "\n")


def update_calibration(bundle: str | os.PathLike, calibration: dict[str, Any]) -> dict[str, Any]:
    """Replace only the sidecar's ``calibration`` section (atomically); returns the new sidecar."""
    meta = load_sidecar(bundle)
    meta["calibration"] = calibration
    write_sidecar(bundle, meta)
    return meta


# -- drift reference and training split --------------------------------------------------------
def reference_scores(scores: Iterable[float], cap: int = MAX_REFERENCE_SCORES, seed: int = 0) -> list[float]:
    """The calibration scores to store as ``reference_scores``: all of them (as floats, in their
    order) up to ``cap``, else a fixed random subsample of ``cap`` (seeded, so re-running a
    calibration stores the same values)."""
    s = np.asarray(list(scores), dtype=np.float64).ravel()
    if len(s) > cap:
        s = s[np.sort(np.random.default_rng(seed).permutation(len(s))[:cap])]
    return [float(v) for v in s]


def training_hashes(meta: dict[str, Any]) -> set[str] | None:
    """The sha256 digests of the training images recorded in the sidecar (``None`` when the
    bundle predates them)."""
    split = meta.get("training_split")
    return None if not split else set(split.get("train") or [])


def find_training_images(meta: dict[str, Any], paths: Iterable[str | os.PathLike]) -> list[Path] | None:
    """The files among ``paths`` whose content is a training image of this bundle (by sha256,
    so copies and renamed files count); ``None`` when the sidecar has no training hashes.
    Unreadable files are left to the caller, which reports them when it scores them."""
    digests = training_hashes(meta)
    if digests is None:
        return None
    found = []
    for p in paths:
        try:
            if sha256_file(p) in digests:
                found.append(Path(p))
        except OSError:
            continue
    return found


def trained_on(meta: dict[str, Any], paths: list[Path]) -> list[Path]:
    """The images among ``paths`` the model was trained on: by content, from the sidecar's
    ``training_split`` hashes (no run folder needed); a bundle exported before those were stored
    falls back to the paths in its run folder's ``split.json`` where that folder still exists."""
    found = find_training_images(meta, paths)
    if found is not None:
        return found
    run = (meta.get("model") or {}).get("run")
    split = Path(run) / "split.json" if run else None
    if split is None or not split.is_file():
        log.warning("this bundle records no training-image hashes and its run folder is absent: the "
                    "images cannot be checked against the training images (re-export to record them)")
        return []
    trained = {str(Path(p).resolve()) for p in json.loads(split.read_text()).get("train", [])}
    return [p for p in paths if str(p.resolve()) in trained]


def training_images_message(found: list[Path], what: str, advice: str) -> str:
    """``N <what> image(s) were used to train this model: a.png, b.png, ... ; <advice>``."""
    names = ", ".join(str(p) for p in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    return f"{len(found)} {what} image(s) were used to train this model (same content as its training images): {names}; {advice}"

"""Texture-inspection data sets in MVTec-AD layout for the benchmarks, cut from scikit-image's textures.

scikit-image ships three 512x512 grayscale surface photographs with the package itself (no
download): ``brick``, ``grass`` and ``gravel``, and one colour micrograph, ``ihc`` (its
``immunohistochemistry`` sample: brown-stained glands in blue-stained stroma, 512x512 RGB), the
colour texture of :data:`anomaly.data.textures.COLOUR_TEXTURES`. :func:`make_texture_dataset` turns
one of them into an MVTec-AD-style category that :func:`anomaly.data.folder.discover` reads::

    ROOT/train/good/000.png                  normal crops from the TOP band of the source
    ROOT/test/good/000.png                   normal crops from the BOTTOM band (never seen in training)
    ROOT/test/<kind>/000.png                 bottom-band crops with an evaluation defect
    ROOT/ground_truth/<kind>/000_mask.png    uint8 0/255 masks
    ROOT/manifest.json                       parameters, the source window of every crop, and each
                                             defect's kind, width (px) and CNR (eval_defects.EvalDefect)

Training and test crops come from spatially disjoint bands of the source image (rows
``[0, train_fraction * H)`` and ``[train_fraction * H, H)``), so a model cannot score well by
memorising the training pixels. Both bands get the same augmentation (small rotation, flips), so
normal train and test images share one distribution. Defects come from
``eval_defects.EvalDefectGenerator`` (``benchmarks/eval_defects.py``) — never from the training
synthesizer (:mod:`anomaly.data.synthetic`); its foreign-object patches are cut from the *other*
grayscale textures. The colour texture also gets ``discolour`` defects (hue and saturation changed at the same luma), which
only a model that reads colour can find.

The category is built in a temporary folder beside ``root`` and renamed into place at the end,
so an interrupted run leaves nothing half-written. Calling again with the same parameters reuses
the existing folder.

Used by ``benchmarks/quality.py`` (and the tests); the product installs none of it.

Example::

    import sys; sys.path.insert(0, "benchmarks")
    from texture_data import make_texture_dataset

    root = make_texture_dataset("data_cache/brick", "brick", image_size=128, seed=0)
    layout = discover(root)      # kind "mvtec": train/good, test/{good,crack,foreign,hole,spot}
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling benchmark module, however this one is loaded
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from anomaly.data.io import atomic_write, write_image  # noqa: E402
from anomaly.data.textures import COLOUR_TEXTURES, TEXTURES, load_texture  # noqa: E402
from eval_defects import COLOUR_EVAL_KINDS, EVAL_KINDS, FAINT_EVAL_KINDS, EvalDefectGenerator, measured_cnr  # noqa: E402

__all__ = ["make_texture_dataset"]

log = logging.getLogger(__name__)

_MANIFEST = "manifest.json"
_FORMAT = 1  # bump whenever the generated files change, so cached data sets are rebuilt


def _window_side(crop: int, max_rotation: float) -> int:
    """Side of the axis-aligned source window that contains a ``crop`` square rotated by up to ``max_rotation``."""
    th = math.radians(min(abs(max_rotation), 45.0))
    return int(math.ceil(crop * (math.cos(th) + math.sin(th)))) + 2  # +2: bilinear support


def _cut(source: np.ndarray, band: tuple[int, int], crop: int, size: int, max_rotation: float,
         flips: bool, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One augmented crop from rows ``band`` of ``source`` -> (uint8 ``(size, size[, 3])``, record)."""
    h, w = source.shape[:2]
    side = _window_side(crop, max_rotation)
    y0 = int(rng.integers(band[0], band[1] - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    window = source[y0:y0 + side, x0:x0 + side].astype(np.float32)
    angle = float(rng.uniform(-max_rotation, max_rotation)) if max_rotation > 0 else 0.0
    c = (side - 1) / 2.0
    mat = cv2.getRotationMatrix2D((c, c), angle, 1.0)
    # Shift so that the centred crop x crop square lands at the output origin.
    mat[:, 2] -= (c - (crop - 1) / 2.0)
    patch = cv2.warpAffine(window, mat, (crop, crop), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    if crop != size:
        patch = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA if crop > size else cv2.INTER_CUBIC)
    hflip = bool(flips and rng.random() < 0.5)
    vflip = bool(flips and rng.random() < 0.5)
    if hflip:
        patch = patch[:, ::-1]
    if vflip:
        patch = patch[::-1]
    out = np.clip(np.round(patch), 0, 255).astype(np.uint8)
    record = {"box": [y0, x0, y0 + side, x0 + side], "angle": round(angle, 4), "hflip": hflip, "vflip": vflip}
    return np.ascontiguousarray(out), record


def _to_chw_float(image: np.ndarray) -> np.ndarray:
    img = image.astype(np.float32) / 255.0
    return img[None] if img.ndim == 2 else img.transpose(2, 0, 1)


def _to_uint8_image(image: np.ndarray) -> np.ndarray:
    img = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    return img[0] if img.shape[0] == 1 else np.ascontiguousarray(img.transpose(1, 2, 0))


def recorded_params(manifest_path: Path) -> dict[str, Any] | None:
    """The ``params`` a data set's manifest records, ``{}`` for an unreadable manifest, ``None`` when
    there is none: a cached data set is reused only when they equal the requested ones."""
    if not manifest_path.is_file():
        return None
    try:
        return json.loads(manifest_path.read_text()).get("params", {})
    except (OSError, ValueError):
        return {}


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def make_texture_dataset(root: str | os.PathLike, texture: str, image_size: int = 128, n_train: int = 200,
                         n_test_good: int = 40, n_test_bad: int = 40, seed: int = 0, *,
                         crop_size: int | None = None, train_fraction: float = 0.6,
                         max_rotation: float = 10.0, flips: bool = True,
                         defect_kinds: Sequence[str] | None = None, cnr_range: tuple[float, float] = (0.5, 8.0),
                         overwrite: bool = False) -> Path:
    """Write an MVTec-AD-style category cut from a bundled texture (see module docstring).

    Args:
        root: the category folder to create (e.g. ``cache/brick``).
        texture: one of :data:`anomaly.data.textures.TEXTURES` or :data:`anomaly.data.textures.COLOUR_TEXTURES`.
        image_size: side S of the written square images.
        n_train: normal training crops (top band).
        n_test_good: normal test crops (bottom band).
        n_test_bad: defective test crops (bottom band), spread evenly over ``defect_kinds``.
        seed: seeds every random choice; the same arguments give identical files.
        crop_size: side of the square cut from the source before resizing to ``image_size``
            (default ``image_size``: native resolution).
        train_fraction: fraction of the source rows, from the top, reserved for training crops.
        max_rotation: crops are rotated by a uniform angle in ``[-max_rotation, max_rotation]``
            degrees (0 disables).
        flips: random horizontal and vertical flips.
        defect_kinds: one ``test/<kind>`` folder each. Default: ``eval_defects.EVAL_KINDS``, plus
            ``eval_defects.COLOUR_EVAL_KINDS`` for a colour texture (they need colour). The thin and
            faint kinds (``eval_defects.FAINT_EVAL_KINDS``) may be named too.
        cnr_range: contrast-to-noise range of the faint kinds (ignored without them).
        overwrite: replace an existing category previously written by this function with
            different parameters. Folders not written by it are never replaced.

    Returns:
        ``Path(root)``.

    Raises:
        ValueError: unknown texture or defect kind, or crops that do not fit in a band.
        FileExistsError: ``root`` holds other files, or a category with other parameters and
            ``overwrite`` is false.
    """
    if texture not in TEXTURES and texture not in COLOUR_TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; expected one of {', '.join(TEXTURES + tuple(COLOUR_TEXTURES))}")
    colour = texture in COLOUR_TEXTURES
    allowed = EVAL_KINDS + FAINT_EVAL_KINDS + (COLOUR_EVAL_KINDS if colour else ())
    default = EVAL_KINDS + COLOUR_EVAL_KINDS if colour else EVAL_KINDS
    kinds = tuple(default if defect_kinds is None else defect_kinds)
    bad_kinds = [k for k in kinds if k not in allowed]
    if bad_kinds or (n_test_bad > 0 and not kinds):
        extra = f" ({', '.join(COLOUR_EVAL_KINDS)} needs a colour texture)" if set(bad_kinds) & set(COLOUR_EVAL_KINDS) else ""
        raise ValueError(f"unknown defect kinds {bad_kinds or '(none given)'}; expected a subset of {allowed}{extra}")
    if min(n_train, n_test_good, n_test_bad) < 0 or n_train == 0:
        raise ValueError(f"need n_train >= 1 and non-negative test counts, got {n_train}, {n_test_good}, {n_test_bad}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    crop = int(crop_size or image_size)
    if image_size < 8 or crop < 8:
        raise ValueError(f"image_size and crop_size must be >= 8, got {image_size}, {crop}")

    root = Path(root)
    params = {
        "format": _FORMAT, "texture": texture, "image_size": int(image_size), "n_train": int(n_train),
        "n_test_good": int(n_test_good), "n_test_bad": int(n_test_bad), "seed": int(seed), "crop_size": crop,
        "train_fraction": float(train_fraction), "max_rotation": float(max_rotation), "flips": bool(flips),
        "defect_kinds": list(kinds),
    }
    faint = any(k in FAINT_EVAL_KINDS for k in kinds)
    if faint:  # only then: the data sets written before the faint kinds keep their parameters (and caches)
        params["cnr_range"] = [float(cnr_range[0]), float(cnr_range[1])]
    manifest_path = root / _MANIFEST
    recorded = recorded_params(manifest_path)
    ours = recorded is not None
    if ours:
        if recorded == params:
            log.info("%s: texture data set already present with these parameters", root)
            return root
        if not overwrite:
            raise FileExistsError(f"{root}: holds a texture data set with other parameters; pass overwrite=True to replace it")
    elif root.exists() and not _is_empty_dir(root):
        raise FileExistsError(f"{root}: exists and is not an empty folder or a data set written by make_texture_dataset")

    source = load_texture(texture)
    h, w = source.shape[:2]
    split = int(round(train_fraction * h))
    side = _window_side(crop, max_rotation)
    for name, (lo, hi) in (("train", (0, split)), ("test", (split, h))):
        if hi - lo < side or w < side:
            raise ValueError(f"{texture}: a {crop}px crop rotated up to {max_rotation} degrees needs a {side}px window, "
                             f"but the {name} band is {hi - lo}x{w}px; lower crop_size/max_rotation or change train_fraction")
    others = [load_texture(t) for t in TEXTURES if t != texture]
    generator = EvalDefectGenerator(kinds=kinds or EVAL_KINDS, foreign_textures=others,
                                    **({"cnr_range": tuple(cnr_range)} if faint else {}))

    # Independent streams per split: adding test images never changes the training crops.
    stream = TEXTURES.index(texture) if not colour else len(TEXTURES) + list(COLOUR_TEXTURES).index(texture)
    train_rng, good_rng, bad_rng = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, stream]).spawn(3))
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the final folder should not be
    crops: dict[str, dict] = {}
    try:
        for i in range(n_train):
            img, rec = _cut(source, (0, split), crop, image_size, max_rotation, flips, train_rng)
            rel = f"train/good/{i:03d}.png"
            write_image(tmp / rel, img)
            crops[rel] = rec
        for i in range(n_test_good):
            img, rec = _cut(source, (split, h), crop, image_size, max_rotation, flips, good_rng)
            rel = f"test/good/{i:03d}.png"
            write_image(tmp / rel, img)
            crops[rel] = rec
        for i in range(n_test_bad):
            kind = kinds[i % len(kinds)]
            img, rec = _cut(source, (split, h), crop, image_size, max_rotation, flips, bad_rng)
            clean = _to_chw_float(img)
            defect = generator.generate(clean, bad_rng, kind=kind)
            rel = f"test/{kind}/{i:03d}.png"
            written = _to_uint8_image(defect.image)
            write_image(tmp / rel, written)
            write_image(tmp / f"ground_truth/{kind}/{i:03d}_mask.png", (defect.mask[0] > 0.5).astype(np.uint8) * 255)
            # what the defect is, its CNR measured on the 8-bit file as written
            crops[rel] = {**rec, **defect.record(),
                          "cnr": round(measured_cnr(clean, _to_chw_float(written), defect.mask), 4)}
        manifest = {"params": params, "source_shape": list(source.shape), "split_row": split,
                    "train_rows": [0, split], "test_rows": [split, h], "crops": crops}
        with atomic_write(tmp / _MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
        # Swap into place: an existing data set of ours is moved aside first, then deleted.
        trash = None
        if ours:
            trash = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".old"))
            os.replace(root, trash / "old")
        try:
            os.replace(tmp, root)  # also replaces an empty folder
        except BaseException:
            if trash is not None:  # put the previous data set back
                os.replace(trash / "old", root)
                trash.rmdir()
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: wrote %s texture data set (%d train, %d good, %d defective test images of %dpx)",
             root, texture, n_train, n_test_good, n_test_bad, image_size)
    return root

"""Which recipe fits a set of normal training images: cheap, explainable measurements and one rule.

``anomaly train --data DIR`` without model options (no ``--model``, ``--image-size``,
``--tile-scale``, ``--residual``, ...) calls :func:`recommend`: :func:`measure` reads up to
:data:`MAX_IMAGES` training images (decoded, gray, shrunk to 64 x 64), and :func:`choose` turns the
numbers into a product preset (:data:`anomaly.training.presets.PRODUCT_PRESETS`) and a one-line reason
that names them. The run's ``config.json`` and the bundle's sidecar keep both (``recipe``).

What is measured, and why:

* ``alignment``: how much structure the images share *at the same place*. Each image is shrunk to
  64 x 64, high-passed (minus its Gaussian blur at sigma :data:`SHADING_SIGMA`, so that shading the
  images share, such as vignetting or a light gradient, does not count) and standardised; the
  variance over pixels of their mean image is then 1 for identical images and ``1/N`` for
  unrelated ones, and ``alignment = (v - 1/N) / (1 - 1/N)`` rescales that to 1 and 0. Cells and
  parts in a fixture (busbars, edges, holes at fixed places) score high; crops of a stationary
  texture score about 0 whatever their number.
* ``native_side``: the median short side in pixels: whether resizing to the model's input would
  throw away most of the pixels (thin and small defects with them).
* ``channels``: 3 only if some image has colour in fact (``colourfulness`` over
  :data:`COLOUR_MIN`); RGB files of gray images train a 1-channel model.

The rule (:func:`choose`): ``alignment >= ALIGNED_MIN`` -> ``aligned`` (the AAE on the whole image,
the default measured on ELPV cells); otherwise a stationary texture: ``native_side >= TILE_FACTOR x``
the whole-image texture recipe's input -> ``texture_tiled`` (AAE on native-scale tiles), else
``texture_repair`` (the CycleGAN repair recipe measured on 128-px texture crops). The thresholds were
set from the properties of the data the project makes offline (ELPV mono, poly and both, the
scikit-image textures, the same with shading and misregistration):
``benchmarks/results/2026-12-07-recipe-properties.md``.

Torch-free: it reads images only.

Example::

    from anomaly.training.recipe import recommend
    r = recommend("data/line3")           # a category folder or a plain folder of normal images
    print(r.preset, "--", r.reason)       # texture_tiled -- stationary texture (alignment 0.00 < 0.15) ...
    r.settings                            # the TrainConfig fields it sets: model, image_size, tile_scale, ...
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from anomaly.data.io import read_image

__all__ = ["Recipe", "measure", "choose", "recommend", "training_images", "MAX_IMAGES", "ALIGNED_MIN",
           "MIN_IMAGES", "TILE_FACTOR", "SHADING_SIGMA", "COLOUR_MIN", "MEASURE_SIDE", "SHRINK_NOTE"]

log = logging.getLogger(__name__)

#: at most this many training images are read (evenly spaced over the sorted list): ~0.5 s for 300-px cells
MAX_IMAGES = 64
#: fewer images than this cannot tell shared structure from chance (4 crops of one texture measured
#: up to 0.150, 8 up to 0.042): the default recipe is kept
MIN_IMAGES = 8
#: side of the gray copies the alignment is measured on
MEASURE_SIDE = 64
#: Gaussian sigma (px at :data:`MEASURE_SIDE`) of the shading removed before the alignment is measured.
#: Unfiltered, texture crops under vignetting or a light gradient measured 0.24-0.43; at 8 px at most
#: 0.066, while cells misplaced by up to 5 % of their side still measured 0.21-0.29 (the results file).
SHADING_SIGMA = 8.0
#: Alignment from which images count as aligned products. Measured: ELPV cells 0.61-0.82 (panels of
#: 3 x 3 cells 0.73; 0.21-0.29 when shifted and rotated by up to 5 %, 0.07-0.08 by up to 10 %),
#: scikit-image texture crops and mosaics at most 0.003 (0.066 under strong vignetting): 0.15 sits
#: between (``benchmarks/results/2026-12-07-recipe-properties.md``).
ALIGNED_MIN = 0.15
#: A texture is tiled when its short side is at least this many times the whole-image texture
#: recipe's input (128 px): resizing would then drop three pixels in four, or more.
TILE_FACTOR = 2
#: whole-image recipes on images this many times their input side get a note in the reason: a
#: defect a few px wide shrinks below one model pixel (thin cracks in 300-px ELPV cells at 64 px are
#: the README's known limit; 8x: 512 px and more at 64)
SHRINK_NOTE = 8
#: mean absolute difference of a pixel's R, G, B from their mean (in [0, 1] units) above which an
#: image has colour in fact; gray images saved as RGB (or JPEG's chroma noise) stay below
COLOUR_MIN = 0.01


@dataclass(frozen=True)
class Recipe:
    """A chosen product preset and why.

    Attributes:
        preset: a :data:`anomaly.training.presets.PRODUCT_PRESETS` name.
        reason: one line naming the measured numbers and the thresholds they were compared with.
        measured: what :func:`measure` returned.
        settings: the :class:`anomaly.training.config.TrainConfig` fields to set: the preset's
            (:meth:`anomaly.training.presets.ProductPreset.settings`) plus ``channels`` measured.
    """

    preset: str
    reason: str
    measured: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    def record(self, chosen_by: str = "auto") -> dict[str, Any]:
        """What the run keeps (``TrainConfig.recipe``, then the sidecar's ``recipe``): JSON-ready."""
        return {"preset": self.preset, "reason": self.reason, "measured": dict(self.measured), "chosen_by": chosen_by}


def training_images(data: str | os.PathLike) -> list[Path]:
    """The normal training images ``anomaly train`` would read from ``data`` (every category's
    ``train/good``, or a plain folder's images). Raises :class:`anomaly.data.folder.DatasetError`
    for a missing folder or one without training images."""
    from anomaly.data.folder import discover

    return [s.path for s in discover(data).train]


def _sample(paths: Sequence[str | os.PathLike], n: int) -> list[Path]:
    """``n`` paths evenly spaced over the sorted list (all of them when there are fewer): the same
    images on every call, from every part of a folder that is sorted by time or by station."""
    ordered = sorted(Path(p) for p in paths)
    if len(ordered) <= n:
        return ordered
    return [ordered[i] for i in np.linspace(0, len(ordered) - 1, n).round().astype(int)]


def _gray_small(image: np.ndarray) -> tuple[np.ndarray, float]:
    """A decoded float image ``(H, W[, 3|4])`` -> (its gray ``(64, 64)`` float32 copy, colourfulness)."""
    img = image.astype(np.float32, copy=False)
    if img.ndim == 3 and img.shape[2] == 4:  # alpha composited on black, as preprocessing does
        img = img[:, :, :3] * img[:, :, 3:4]
    small = cv2.resize(img, (MEASURE_SIDE, MEASURE_SIDE), interpolation=cv2.INTER_AREA)
    if small.ndim == 3:
        colour = float(np.abs(small - small.mean(axis=2, keepdims=True)).mean())
        return cv2.cvtColor(small, cv2.COLOR_RGB2GRAY), colour
    return small, 0.0


def _alignment(grays: np.ndarray) -> float:
    """Shared structure of ``(N, S, S)`` gray images at the same place, about 0 (unrelated) to 1
    (identical): see the module docstring."""
    n = len(grays)
    out = np.empty_like(grays)
    for i, g in enumerate(grays):
        if SHADING_SIGMA > 0:  # 0: no high-pass (how the results file measured the unfiltered variant)
            g = g - cv2.GaussianBlur(g, (0, 0), SHADING_SIGMA)
        out[i] = (g - g.mean()) / max(float(g.std()), 1e-6)
    v = float(out.mean(axis=0).var())
    return (v - 1.0 / n) / (1.0 - 1.0 / n)


def measure(paths: Sequence[str | os.PathLike], *, max_images: int = MAX_IMAGES) -> dict[str, Any]:
    """Cheap properties of normal training images (module docstring says what each means).

    Args:
        paths: the training images (all of them; at most ``max_images``, evenly spaced, are read).
        max_images: how many to read.

    Returns:
        ``{"images": n read, "of": len(paths), "native_side": median short side (px),
        "smallest_side": px, "channels": 1 | 3, "colourfulness": float, "alignment": float | None}``
        (``alignment`` is ``None`` under :data:`MIN_IMAGES` images). Floats are rounded to 4 digits.

    Raises:
        ValueError: ``paths`` is empty.
        anomaly.data.io.ImageReadError: an image that cannot be read (the message names it).
    """
    if not paths:
        raise ValueError("measure() needs at least one training image, got none")
    chosen = _sample(paths, max_images)
    grays, sides, colours = [], [], []
    for p in chosen:
        image = read_image(p)
        sides.append(min(image.shape[:2]))
        g, c = _gray_small(image)
        grays.append(g)
        colours.append(c)
    colourfulness = max(colours)
    alignment = _alignment(np.stack(grays)) if len(grays) >= MIN_IMAGES else None
    measured = {"images": len(chosen), "of": len(paths), "native_side": int(np.median(sides)),
                "smallest_side": int(min(sides)), "channels": 3 if colourfulness > COLOUR_MIN else 1,
                "colourfulness": round(colourfulness, 4),
                "alignment": None if alignment is None else round(alignment, 4)}
    log.info("measured %d of %d training images: %s", len(chosen), len(paths), measured)
    return measured


def choose(measured: dict[str, Any]) -> Recipe:
    """The product preset for ``measured`` (:func:`measure`'s dict) and the reason, by the rule in
    the module docstring."""
    from anomaly.training.presets import get_product_preset

    a, side = measured.get("alignment"), int(measured["native_side"])
    shown = None if a is None else max(a, 0.0)  # the estimate's noise goes below 0 on unrelated images
    colour = "colour" if measured.get("channels") == 3 else "gray"
    if a is None:
        name = "aligned"
        why = (f"only {measured['images']} training images (< {MIN_IMAGES}): too few to measure alignment; "
               "the default whole-image aae at {size} px")
    elif a >= ALIGNED_MIN:
        name = "aligned"
        why = f"aligned {colour} images (alignment {shown:.2f} >= {ALIGNED_MIN}): whole-image aae at {{size}} px"
    else:
        whole = get_product_preset("texture_repair").image_size
        texture = f"stationary {colour} texture (alignment {shown:.2f} < {ALIGNED_MIN})"
        if side >= TILE_FACTOR * whole:
            name = "texture_tiled"
            why = f"{texture} at {side} px (>= {TILE_FACTOR} x {whole}): tiled aae, {{size}} px tiles at native scale"
        else:
            name = "texture_repair"
            why = (f"{texture} at {side} px (< {TILE_FACTOR} x {whole}): CycleGAN repair + segmenter "
                   f"on the whole image at {{size}} px")
    preset = get_product_preset(name)
    why = why.format(size=preset.image_size)
    if preset.tile_scale is None and side >= SHRINK_NOTE * preset.image_size:
        why += (f"; {side} px images shrink {side / preset.image_size:.0f}x, so defects a few px wide may vanish "
                "(--tile-scale 1 scores native-scale tiles)")
    settings = {**preset.settings(), "channels": int(measured["channels"])}
    return Recipe(name, why, dict(measured), settings)


def recommend(data: str | os.PathLike, *, max_images: int = MAX_IMAGES) -> Recipe:
    """:func:`choose` on :func:`measure` of ``data``'s training images (:func:`training_images`)."""
    return choose(measure(training_images(data), max_images=max_images))

"""Texture material from scikit-image's bundled images (no download), for data sets and defect fills.

scikit-image ships three 512x512 grayscale surface photographs with the package itself:
``brick``, ``grass`` and ``gravel`` (:data:`TEXTURES`), and one colour micrograph, ``ihc`` (its
``immunohistochemistry`` sample: brown-stained glands in blue-stained stroma, 512x512 RGB), the
colour texture of :data:`COLOUR_TEXTURES`. :func:`load_texture` returns one of them; the
benchmarks cut their texture-inspection categories from them (``benchmarks/texture_data.py``).

:func:`write_defect_sources` writes scikit-image's other photographs (:data:`SOURCE_PHOTOS`, none
of the textures) as PNGs: an offline stand-in for DTD as the fill of the training synthesizer's
Perlin defects (``TrainConfig(defect_sources=...)``, :func:`anomaly.data.synthetic.load_defect_sources`).

Example::

    brick = load_texture("brick")                       # uint8 (512, 512)
    folder = write_defect_sources("cache/photos")       # 16 PNGs for DefectSynthesizer's fills
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from anomaly.data.io import write_image

__all__ = ["TEXTURES", "COLOUR_TEXTURES", "SOURCE_PHOTOS", "load_texture", "write_defect_sources"]

log = logging.getLogger(__name__)

TEXTURES = ("brick", "grass", "gravel")
#: Colour textures: name -> scikit-image sample. Kept apart from :data:`TEXTURES` so that the grayscale
#: data sets (whose foreign objects are cut from the other :data:`TEXTURES`) never change.
COLOUR_TEXTURES = {"ihc": "immunohistochemistry"}
#: scikit-image's bundled photographs and micrographs (none of :data:`TEXTURES`, which the
#: evaluation's foreign-object defects are cut from): a small offline stand-in for DTD as the fill
#: of the training synthesizer's Perlin defects (:func:`write_defect_sources`).
SOURCE_PHOTOS = ("astronaut", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "hubble_deep_field",
                 "immunohistochemistry", "moon", "page", "retina", "rocket", "stereo_motorcycle", "text")




def load_texture(name: str) -> np.ndarray:
    """One of scikit-image's bundled textures as uint8 ``(H, W)`` (grayscale) or ``(H, W, 3)``.

    Raises:
        ValueError: ``name`` is not one of :data:`TEXTURES` or :data:`COLOUR_TEXTURES`.
        ImportError: scikit-image is not installed.
    """
    if name not in TEXTURES and name not in COLOUR_TEXTURES:
        raise ValueError(f"unknown texture {name!r}; expected one of {', '.join(TEXTURES + tuple(COLOUR_TEXTURES))}")
    try:
        import skimage.data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("texture data sets need scikit-image (pip install scikit-image)") from exc
    return _skimage_uint8(getattr(skimage.data, COLOUR_TEXTURES.get(name, name))())


def _skimage_uint8(image: Any) -> np.ndarray:
    """A scikit-image sample (uint8, bool or float in [0, 1]) as uint8."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image * (255.0 if image.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return image


def write_defect_sources(folder: str | os.PathLike) -> Path:
    """Write :data:`SOURCE_PHOTOS` as PNGs into ``folder`` (kept if already there) and return it.

    For ``TrainConfig(defect_sources=...)``: disjoint from the texture data sets' images, so a
    model trained with these fills and evaluated on the benchmarks' texture data sets is not shown
    the evaluation's foreign objects.

    Raises:
        ImportError: scikit-image is not installed.
    """
    try:
        import skimage.data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the defect source photographs need scikit-image (pip install scikit-image)") from exc
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for name in SOURCE_PHOTOS:
        path = root / f"{name}.png"
        if path.is_file():
            continue
        image = getattr(skimage.data, name)()
        image = _skimage_uint8(image[0] if isinstance(image, tuple) else image)  # stereo_motorcycle: (left, right, disparity)
        write_image(path, image[..., :3] if image.ndim == 3 else image)
    return root

"""Dataset layouts: MVTec-AD-style category folders, several categories, or a plain folder.

Accepted layouts (``discover``):

* **MVTec-AD category**: ``ROOT/train/good/*``, ``ROOT/test/<type>/*`` (``good`` = normal),
  optional ``ROOT/ground_truth/<type>/<name>_mask.png``.
* **Several categories**: ``ROOT/<category>/train/good/*`` … (each an MVTec category); the
  category index is the label that conditional models receive.
* **Plain folder**: every image under ``ROOT`` (recursive) is normal training data.

:class:`ImageDataset` is a plain map-style dataset returning numpy arrays: a torch
``DataLoader`` collates it, while this module stays torch-free.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from anomaly.data.io import list_images, read_image
from anomaly.data.preprocess import Preprocess
from anomaly.data.tiling import random_crop

__all__ = ["DatasetError", "Sample", "DatasetLayout", "discover", "ImageDataset", "CACHE_BYTES"]

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """The folder does not exist or holds no usable images; the message says what was expected."""


@dataclass(frozen=True)
class Sample:
    """One image. ``label`` is 0 normal / 1 anomalous; ``category`` indexes ``DatasetLayout.categories``."""

    path: Path
    label: int = 0
    defect_type: str = "good"
    mask: Path | None = None
    category: int = 0


@dataclass
class DatasetLayout:
    """What :func:`discover` found: kind (``mvtec``, ``multi`` or ``folder``), categories, splits."""

    root: Path
    kind: str
    categories: list[str]
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)


def _is_mvtec(root: Path) -> bool:
    return (root / "train" / "good").is_dir()


def _mvtec(root: Path, category: int) -> tuple[list[Sample], list[Sample]]:
    train = [Sample(p, 0, "good", None, category) for p in list_images(root / "train" / "good")]
    test: list[Sample] = []
    test_root = root / "test"
    if test_root.is_dir():
        for type_dir in sorted(d for d in test_root.iterdir() if d.is_dir()):
            kind = type_dir.name
            for p in list_images(type_dir):
                mask = root / "ground_truth" / kind / f"{p.stem}_mask.png"
                test.append(Sample(p, int(kind != "good"), kind, mask if mask.is_file() else None, category))
    return train, test


def discover(root: str | os.PathLike) -> DatasetLayout:
    """Find the layout of ``root`` (see module docstring).

    Raises:
        DatasetError: ``root`` is missing, or there are no training images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (expected an MVTec-style category folder or a folder of images)")
    if _is_mvtec(root):
        train, test = _mvtec(root, 0)
        layout = DatasetLayout(root, "mvtec", [root.name], train, test)
    else:
        cats = sorted(d for d in root.iterdir() if d.is_dir() and _is_mvtec(d))
        if cats:
            layout = DatasetLayout(root, "multi", [c.name for c in cats])
            for i, c in enumerate(cats):
                tr, te = _mvtec(c, i)
                layout.train += tr
                layout.test += te
        else:
            layout = DatasetLayout(root, "folder", [root.name], [Sample(p) for p in list_images(root)])
    if not layout.train:
        where = "train/good" if layout.kind != "folder" else "the folder (searched recursively)"
        raise DatasetError(f"{root}: no training images in {where}; expected image files such as .png or .jpg")
    return layout


#: default size limit of :class:`ImageDataset`'s cache: 4 GiB (262,144 uint8 images of 64², 21,845 RGB of 256²)
CACHE_BYTES = 4 << 30


def _quantize(image: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A preprocessed float32 image in [0, 1] held in the source's integer type (rounded), or
    as it is for float sources."""
    if dtype == np.uint8:
        return np.rint(image * 255.0).astype(np.uint8)
    if dtype == np.uint16:
        return np.rint(image * 65535.0).astype(np.uint16)
    return image


def _to_float(held: np.ndarray) -> np.ndarray:
    if held.dtype == np.uint8:
        return held.astype(np.float32) / 255.0
    if held.dtype == np.uint16:
        return held.astype(np.float32) / 65535.0
    return held


class ImageDataset:
    """Map-style dataset of preprocessed images.

    ``ds[i]`` is a dict: ``image`` ``(C, S, S)`` float32, ``label`` int64 (the category, for
    conditional models), ``anomalous`` int64, and ``mask`` ``(1, S, S)`` float32 when
    ``with_masks`` (zeros where an image has no mask file).

    Args:
        samples: the images.
        preprocess: the shared :class:`Preprocess`.
        augment: optional ``f(image (C,S,S), rng) -> image`` applied to training images only.
        with_masks: also load ground-truth masks (resized with nearest neighbour).
        seed: seeds the augmentation generator per index, so epochs differ but runs repeat.
        cache: keep preprocessed images in memory after the first read (training reads every
            image once per epoch; decoding again each time wastes most of a CPU's time). They are
            held in the source file's pixel type — an 8-bit file as uint8, a 16-bit one as uint16
            (the preprocessed values rounded to that depth: at most half a grey level off) — a
            quarter (half) of float32's memory, and converted to float32 per item. At most
            ``cache_bytes`` are held; images beyond it are decoded on every read (logged once).
        cache_bytes: the cache's size limit (default :data:`CACHE_BYTES`).
        crops_per_image: with a tiled ``preprocess`` (:attr:`Preprocess.tiled`), each image gives
            this many ``(C, S, S)`` crops per epoch (``len(ds)`` = images x crops), cut at random
            places of the image at its tiling scale; the cache holds the whole scaled images.
            ``None``: as many as the tiles that would cover the first image without overlap
            (``ceil(H' W' / S^2)``), so an epoch sees about every pixel once.
        fixed_crops: the crops of a tiled dataset are the same on every read (validation);
            else new places on every read (training).
    """

    def __init__(self, samples: Sequence[Sample], preprocess: Preprocess,
                 augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
                 with_masks: bool = False, seed: int = 0, cache: bool = False, cache_bytes: int = CACHE_BYTES,
                 crops_per_image: int | None = None, fixed_crops: bool = False) -> None:
        if with_masks and preprocess.tiled:
            raise ValueError("masks of a tiled dataset are not supported: score tiled images with the runtime, "
                             "which returns maps at the image's scale")
        if crops_per_image is not None and crops_per_image < 1:
            raise ValueError(f"crops_per_image must be >= 1, got {crops_per_image}")
        self.samples = list(samples)
        self.fixed_crops = bool(fixed_crops)
        self._crops = crops_per_image
        self.preprocess = preprocess
        self.augment = augment
        self.with_masks = with_masks
        self.seed = seed
        self.cache = cache
        self.cache_bytes = int(cache_bytes)
        self._cached: dict[int, np.ndarray] = {}
        self._cached_bytes = 0
        self._cache_full_logged = False
        self._calls = 0

    @property
    def crops_per_image(self) -> int:
        """Crops each image gives per epoch (1 for a whole-image preprocessing)."""
        if not self.preprocess.tiled:
            return 1
        if self._crops is None:
            if not self.samples:
                return 1
            raw = read_image(self.samples[0].path, raw=True)
            h, w = self.preprocess.input_size(raw.shape[0], raw.shape[1])
            s = self.preprocess.image_size
            self._crops = max(1, -(-h * w // (s * s)))
            log.info("tiled training: %d crops of %d px per image of %dx%d px (at scale %g) per epoch",
                     self._crops, s, h, w, self.preprocess.tile_scale)
        return self._crops

    def __len__(self) -> int:
        return len(self.samples) * self.crops_per_image

    @property
    def cached_bytes(self) -> int:
        """Bytes the cache holds now."""
        return self._cached_bytes

    def _store(self, i: int, held: np.ndarray) -> bool:
        """Keep ``held`` for image ``i`` unless the cache is full; whether it was kept."""
        if self._cached_bytes + held.nbytes > self.cache_bytes:
            if not self._cache_full_logged:
                log.warning("image cache full at %d of %d images (%.0f MB, the limit is %.0f MB): the others are "
                            "decoded on every read (slower epochs); raise cache_bytes if memory allows",
                            len(self._cached), len(self.samples), self._cached_bytes / 1e6, self.cache_bytes / 1e6)
                self._cache_full_logged = True
            return False
        self._cached[i] = held
        self._cached_bytes += held.nbytes
        return True

    def load_mask(self, sample: Sample) -> np.ndarray:
        """Ground-truth mask ``(1, S, S)`` in {0, 1} (zeros without a mask file)."""
        s = self.preprocess.image_size
        if sample.mask is None:
            return np.zeros((1, s, s), np.float32)
        import cv2

        m = read_image(sample.mask)
        if m.ndim == 3:
            m = m.max(axis=2)
        m = cv2.resize((m > 0.5).astype(np.float32), (s, s), interpolation=cv2.INTER_NEAREST)
        return m[None]

    def __getitem__(self, index: int) -> dict:
        n = len(self.samples)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        i = index % n  # a tiled epoch visits every image crops_per_image times
        sample = self.samples[i]
        tiled = self.preprocess.tiled
        crop = None
        if tiled:  # the crop's place: new on every read for training, fixed per index for validation
            self._calls += not self.fixed_crops
            crop_rng = np.random.default_rng((self.seed, index, 0 if self.fixed_crops else self._calls, 7))
            crop = lambda a: random_crop(a, self.preprocess.image_size, crop_rng)  # noqa: E731
        if self.cache and i in self._cached:
            held = self._cached[i]
            image = _to_float(crop(held) if crop else held)  # crop first: a tile, not the whole image, converted
        elif self.cache:
            raw = read_image(sample.path, raw=True)
            held = _quantize(self.preprocess(raw), raw.dtype)  # preprocess: the same input as from float pixels
            # every epoch sees the held values, the first as well (unless the cache is full)
            image = _to_float(held) if self._store(i, held) else self.preprocess(raw)
            image = crop(image) if crop else image
        else:
            image = self.preprocess.load(sample.path)
            image = crop(image) if crop else image
        if self.augment is not None:
            self._calls += 1
            rng = np.random.default_rng((self.seed, index, self._calls))
            image = np.ascontiguousarray(self.augment(image.copy(), rng))
        item = {"image": image, "label": np.int64(sample.category), "anomalous": np.int64(sample.label)}
        if self.with_masks:
            item["mask"] = self.load_mask(sample)
        return item

"""The one preprocessing definition, shared by training, calibration and the deployed runtime.

``decode -> colour mode -> resize with anti-aliasing -> scale to [0, 1] -> (C, H, W) float32``.
The exported ONNX graph starts where this ends, so scores cannot drift between training and
deployment (a test feeds the same files through both paths). The settings travel in the
sidecar (``Preprocess.to_dict``/``from_dict``).

Example::

    pre = Preprocess(image_size=128, channels=1)
    x = pre.load("cell.png")          # (1, 128, 128) float32 in [0, 1]

A *tiled* preprocessing (``tile_scale`` set) keeps the image at that pixel scale instead of
shrinking it to ``S x S``: ``x`` is ``(C, H', W')`` with ``H' = round(H * tile_scale)``, and the
model sees ``S x S`` tiles of it (:mod:`anomaly.data.tiling`)::

    pre = Preprocess(image_size=128, channels=1, tile_scale=1.0)
    x = pre.load("part.png")           # (1, 1200, 1600): native pixels
    tiles, grid = pre.tiles(x)         # (T, 1, 128, 128), [(y, x), ...]
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Sequence

import cv2
import numpy as np

from anomaly.data.io import read_image
from anomaly.data.tiling import extract_tiles, overlap_px, tile_grid

__all__ = ["Preprocess"]

#: uint8 -> float32 in [0, 1]: bit for bit what ``x.astype(np.float32) / 255.0`` gives
_UINT8_TO_UNIT = np.arange(256, dtype=np.float32) / 255.0


@dataclass(frozen=True)
class Preprocess:
    """Image -> model input.

    Attributes:
        image_size: square side S of the model input (of each tile, when tiled).
        channels: 1 (grayscale) or 3 (RGB). Other inputs are converted: RGB -> gray by luma,
            gray -> RGB by repetition, alpha dropped (composited on black).
        tile_scale: ``None``: the whole image is resized to ``S x S``. A number in (0, 4]: the
            image is resized by this factor (1 = native pixels, 0.5 = half) and scored in
            overlapping ``S x S`` tiles; an image whose scaled short side is under ``S`` is
            enlarged (aspect kept) to ``S`` on that side.
        tile_overlap: fraction of a tile shared with each neighbour in the tiling grid, in [0, 0.75].
    """

    image_size: int = 128
    channels: int = 1
    tile_scale: float | None = None
    tile_overlap: float = 0.25

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.tile_scale is not None and not 0.0 < float(self.tile_scale) <= 4.0:
            raise ValueError(f"tile_scale must be in (0, 4] (1 = native pixels) or None, got {self.tile_scale}")
        overlap_px(self.image_size, self.tile_overlap)  # validates the fraction

    @property
    def tiled(self) -> bool:
        """Whether images are scored in tiles at :attr:`tile_scale` (else resized whole)."""
        return self.tile_scale is not None

    @property
    def overlap(self) -> int:
        """The tiling grid's overlap in px."""
        return overlap_px(self.image_size, self.tile_overlap)

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H', W')`` of the preprocessed array for an original of ``height x width`` px:
        ``(S, S)`` for whole-image models; the scaled size (short side at least ``S``) when tiled."""
        s = self.image_size
        if not self.tiled:
            return s, s
        f = float(self.tile_scale)  # type: ignore[arg-type]
        f = max(f, s / max(1, min(height, width)))  # the short side reaches one tile
        return max(s, int(round(height * f))), max(s, int(round(width * f)))

    def tiles(self, x: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """The tiling grid of a preprocessed ``(C, H', W')`` array: ``(T, C, S, S)`` tiles and their
        top-left corners ``[(y, x), ...]`` (see :mod:`anomaly.data.tiling`)."""
        grid = tile_grid(x.shape[1], x.shape[2], self.image_size, self.overlap)
        return extract_tiles(x, grid, self.image_size), grid

    def convert(self, image: np.ndarray) -> np.ndarray:
        """Colour conversion of a float ``(H, W[, 1|3|4])`` image to ``(H, W, channels)``."""
        img = image
        if img.ndim == 3 and img.shape[2] == 4:  # drop alpha, composited on black
            img = img[:, :, :3] * img[:, :, 3:4]
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
            raise ValueError(f"expected an image of shape (H, W) or (H, W, 1|3|4), got {image.shape}")
        if self.channels == 1:
            if img.ndim == 3:
                # (no copy: a float32 image is read as it is; copying a 2048 px RGB image cost 6 ms)
                img = cv2.cvtColor(img.astype(np.float32, copy=False), cv2.COLOR_RGB2GRAY)
            return img[:, :, None]
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        return img

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Preprocess a decoded image (float in [0, 1] or uint8/uint16) -> ``(C, S, S)`` float32
        (``(C, H', W')`` when tiled, :meth:`input_size`)."""
        img = image
        if img.dtype == np.uint8:
            # a table of the 256 values x / 255: the same float32 bits as dividing, without two
            # image-sized temporaries (that step was 40 % of preprocessing a 300 px cell)
            img = cv2.LUT(np.ascontiguousarray(img), _UINT8_TO_UNIT) if img.size else img.astype(np.float32) / 255.0
        elif img.dtype == np.uint16:
            img = img.astype(np.float32) / 65535.0
        img = self.convert(img.astype(np.float32, copy=False))
        h, w = img.shape[:2]
        if h == 0 or w == 0:
            raise ValueError(f"empty image of shape {image.shape}")
        th, tw = self.input_size(h, w)
        # INTER_AREA averages source pixels when shrinking (anti-aliasing); cubic when growing.
        interp = cv2.INTER_AREA if (h >= th and w >= tw) else cv2.INTER_CUBIC
        if (th, tw) != (h, w):
            img = cv2.resize(img, (tw, th), interpolation=interp)
        elif np.may_share_memory(img, image):  # no resampling: a copy, since the clip below works in place
            img = img.copy()
        if img.ndim == 2:
            img = img[:, :, None]
        img = np.clip(img, 0.0, 1.0, out=img)  # resize returned a fresh float32 array
        return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """Read and preprocess one file -> ``(C, S, S)``. Raises ``ImageReadError``."""
        return self(read_image(path))

    def load_batch(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Read and preprocess files -> ``(N, C, S, S)`` (whole-image preprocessing only: tiled
        images differ in size; use :meth:`load_tiles`)."""
        if self.tiled:
            raise ValueError("load_batch() stacks whole images; a tiled preprocessing gives images of their own "
                             "size: use load_tiles()")
        return np.stack([self.load(p) for p in paths]) if paths else np.zeros((0, self.channels, self.image_size, self.image_size), np.float32)

    def load_tiles(self, paths: Sequence[str | os.PathLike], max_tiles_per_image: int | None = None,
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Read files and cut each into its tiling grid -> ``(T, C, S, S)`` tiles and ``(T,)``
        int64 index of the image each came from. ``max_tiles_per_image`` keeps an evenly spaced
        subset of a large image's grid (bounding memory for statistics over many images)."""
        parts, owner = [], []
        for i, p in enumerate(paths):
            tiles, _ = self.tiles(self.load(p))
            if max_tiles_per_image is not None and len(tiles) > max_tiles_per_image:
                tiles = tiles[np.linspace(0, len(tiles) - 1, max_tiles_per_image).round().astype(int)]
            parts.append(tiles)
            owner.append(np.full(len(tiles), i, np.int64))
        if not parts:
            s = self.image_size
            return np.zeros((0, self.channels, s, s), np.float32), np.zeros(0, np.int64)
        return np.concatenate(parts), np.concatenate(owner)

    def to_dict(self) -> dict:
        """Settings for the sidecar (the tiling keys only for a tiled preprocessing)."""
        d = asdict(self)
        if not self.tiled:
            d.pop("tile_scale")
            d.pop("tile_overlap")
        return {**d, "range": [0.0, 1.0], "layout": "NCHW", "resize": "area-down/cubic-up"}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        """Rebuild from :meth:`to_dict` output (extra keys are descriptive)."""
        scale = d.get("tile_scale")
        return cls(image_size=int(d["image_size"]), channels=int(d["channels"]),
                   tile_scale=None if scale is None else float(scale), tile_overlap=float(d.get("tile_overlap", 0.25)))

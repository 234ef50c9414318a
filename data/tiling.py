"""Native-resolution tiling: cut an image into overlapping model-sized tiles, stitch their maps.

A whole-image model sees every image shrunk to ``S x S`` (64-256 px), where a 2 px scratch on a
2,000 px part is gone before the model looks. A tiled bundle instead keeps the image at a stated
pixel scale (:attr:`anomaly.data.preprocess.Preprocess.tile_scale`, 1 = native pixels), trains on
random ``S x S`` crops of it, and at inference scores a grid of overlapping tiles whose maps are
blended into one map of the (scaled) image. The ONNX graph stays a tile-in, map-out graph; the
cutting and stitching are numpy, here, so the runtime stays torch-free and the training side
(export's statistics, parity) uses the very same grid.

Blending: each tile's map is weighted by a separable ramp that falls linearly over the overlap to
the tile's edges (:func:`blend_window`), so every pixel is a weighted mean of the tiles that cover
it and the tiles' border effects (reflect padding of the smoothing, the decoder's edges) fade out.
Where only one tile covers a pixel (the image's own borders) its value is that tile's. A signal
that the tiles agree on (a crop of one global map) is stitched back exactly.

Example::

    grid = tile_grid(1200, 1600, tile=128, overlap=32)     # [(y, x), ...] top-left corners
    tiles = extract_tiles(x, grid, 128)                       # (T, C, 128, 128) from x (C, 1200, 1600)
    st = Stitcher((1200, 1600), 128, overlap=32)
    st.add(maps, grid)                                        # maps (T, 1, 128, 128) or (T, 128, 128)
    full = st.result()                                        # (1200, 1600) float32
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["axis_positions", "tile_grid", "extract_tiles", "blend_window", "Stitcher", "random_crop", "overlap_px"]

#: a tile's weight never falls below this at its edge, so a pixel covered by one tile only (the
#: image's borders) keeps that tile's value instead of 0 / 0
MIN_WEIGHT = 1e-3


def overlap_px(tile: int, overlap: float) -> int:
    """Overlap in pixels of tiles ``tile`` px a side for a fraction ``overlap`` in [0, 0.75]."""
    if not 0.0 <= overlap <= 0.75:
        raise ValueError(f"tile overlap must be a fraction in [0, 0.75], got {overlap}")
    return int(round(tile * overlap))


def axis_positions(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles ``tile`` long covering ``[0, length)`` with at least ``overlap`` px
    shared between neighbours, spread evenly; the last tile ends at ``length``.

    Raises:
        ValueError: ``length`` < ``tile``, or ``overlap`` not in ``[0, tile)``.
    """
    if length < tile:
        raise ValueError(f"an image side of {length} px is smaller than the tile ({tile} px)")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, {tile}), got {overlap}")
    if length == tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    return [int(round(v)) for v in np.linspace(0, length - tile, n)]


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Top-left corners ``(y, x)`` of the tiles covering an ``height x width`` image, row by row."""
    return [(y, x) for y in axis_positions(height, tile, overlap) for x in axis_positions(width, tile, overlap)]


def extract_tiles(image: np.ndarray, positions: Sequence[tuple[int, int]], tile: int) -> np.ndarray:
    """``(T, C, tile, tile)`` float32 tiles of ``image`` ``(C, H, W)`` at ``positions``."""
    if image.ndim != 3:
        raise ValueError(f"expected an image (C, H, W), got shape {image.shape}")
    out = np.empty((len(positions), image.shape[0], tile, tile), np.float32)
    for i, (y, x) in enumerate(positions):
        out[i] = image[:, y:y + tile, x:x + tile]
    return out


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """``(tile, tile)`` float32 weights: 1 inside, falling linearly over the ``overlap`` px next
    to each edge to :data:`MIN_WEIGHT` (the outer product of two 1-d ramps)."""
    i = np.arange(tile, dtype=np.float64) + 0.5
    if overlap > 0:
        ramp = np.minimum(1.0, np.minimum(i, tile - i) / overlap)
    else:
        ramp = np.ones(tile)
    ramp = np.maximum(ramp, MIN_WEIGHT)
    return np.outer(ramp, ramp).astype(np.float32)


class Stitcher:
    """Accumulates tile maps into one blended map of a ``(H, W)`` image.

    Memory: two float32 arrays of ``H x W`` (``C x H x W`` for ``channels`` > 1): 96 MB for a
    12-MP image, whatever the number of tiles, which arrive in batches.

    Args:
        size: ``(H, W)`` of the (scaled) image the tiles were cut from.
        tile: tile side in px.
        overlap: overlap in px the grid was made with (sets the blending ramp).
        channels: channels of the maps (1 for anomaly maps, C for reconstructions).
    """

    def __init__(self, size: tuple[int, int], tile: int, overlap: int, channels: int = 1) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.tile = int(tile)
        self.channels = int(channels)
        self.window = blend_window(self.tile, int(overlap))
        self._sum = np.zeros((self.channels, *self.size), np.float32)
        self._weight = np.zeros(self.size, np.float32)

    def add(self, maps: np.ndarray, positions: Sequence[tuple[int, int]]) -> None:
        """Add tile maps ``(T, channels, tile, tile)`` (or ``(T, tile, tile)`` for one channel)
        cut at ``positions``."""
        m = np.asarray(maps, np.float32)
        if m.ndim == 3:
            m = m[:, None]
        t = self.tile
        if m.shape[1:] != (self.channels, t, t) or len(m) != len(positions):
            raise ValueError(f"expected {len(positions)} maps of shape ({self.channels}, {t}, {t}), got {m.shape}")
        w = self.window
        for mi, (y, x) in zip(m, positions):
            self._sum[:, y:y + t, x:x + t] += mi * w
            self._weight[y:y + t, x:x + t] += w

    def result(self) -> np.ndarray:
        """The blended map ``(H, W)`` (``(channels, H, W)`` for several channels), float32.

        Raises:
            ValueError: a pixel no tile covered.
        """
        if not (self._weight > 0).all():
            raise ValueError("some pixels were covered by no tile (add the maps of every grid position)")
        out = self._sum / self._weight
        return out[0] if self.channels == 1 else out


def random_crop(image: np.ndarray, tile: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly placed ``(C, tile, tile)`` crop of ``image`` ``(C, H, W)`` (a copy)."""
    _, h, w = image.shape
    if h < tile or w < tile:
        raise ValueError(f"cannot crop {tile} px tiles from an image of {h}x{w} px")
    y = int(rng.integers(0, h - tile + 1))
    x = int(rng.integers(0, w - tile + 1))
    return np.ascontiguousarray(image[:, y:y + tile, x:x + tile])

"""Local texture statistics and their distance to normal ones: a map part with no learning.

A reconstructor repairs what looks wrong *at the pixel*; a patch of a foreign texture whose grain
resembles the surface (a bit of gravel in grass, one more dark stone in gravel) passes through the
repair and the segmenter alike. Its local *statistics* (contrast, gradient energy, the scale of its
blobs) still differ from every normal neighbourhood. :class:`StatisticsMap` measures that:

* :func:`texture_statistics`: 9 statistics per pixel of the image's luma: at Gaussian scales 2 and
  4 px the local mean, the local standard deviation and the gradient energy (the square root of the
  Gaussian-weighted mean of Sobel ``gx² + gy²``), and the magnitude of the scale-normalised Laplacian
  of Gaussian at 1, 2 and 4 px, smoothed at twice its scale;
* each statistic standardised by its mean and std over the normal training images' pixels, and a
  bank of ``K`` k-means centres of those standardised vectors (:func:`fit_statistics_bank`);
* the map: the Euclidean distance of each vector to its nearest centre, on a quarter-resolution grid
  (the statistics 2x2-average-pooled), bilinearly upsampled to the input size (``(N, 1, H, W)``).

(The statistics are computed at half resolution, see :func:`texture_statistics`.)

:class:`anomaly.scoring.Scorer` adds it as one more standardised part of the map
(``Scorer(texture="stats")``, ``anomaly train|export --texture-stats``). Measured in
``benchmarks/results/2026-12-04-quality-texture-stats.md``.

Everything in the forward pass is torch and traces to ONNX; fitting the bank uses scikit-learn.
"""
from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["STATISTICS", "MIN_SIDE", "texture_statistics", "fit_statistics_bank", "StatisticsMap"]

log = logging.getLogger(__name__)

#: names of the channels of :func:`texture_statistics`, in order.
STATISTICS = ("mean_s2", "std_s2", "grad_s2", "mean_s4", "std_s4", "grad_s4", "log_s1", "log_s2", "log_s4")
#: the smallest image side the statistics take: the widest window (sigma 4 on the half-resolution grid,
#: radius 12) must fit its reflect padding, and the quarter-resolution grid keeps 8 cells a side.
MIN_SIDE = 32

_LUMA = (0.299, 0.587, 0.114)  # BT.601


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    from anomaly.scoring import gaussian_blur

    return gaussian_blur(x, sigma)


def _conv3(x: torch.Tensor, kernels: list[list[list[float]]]) -> torch.Tensor:
    """``(N, 1, H, W)`` -> ``(N, K, H, W)``: 3x3 kernels with reflect padding."""
    k = torch.tensor(kernels, dtype=x.dtype, device=x.device).unsqueeze(1)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k)


def texture_statistics(x: torch.Tensor) -> torch.Tensor:
    """``(N, 9, H/2, W/2)`` local statistics (:data:`STATISTICS`) of images ``(N, C, H, W)`` in [0, 1].

    RGB images are reduced to BT.601 luma, other channel counts to their mean. The gradients and the
    finest Laplacian are taken at full resolution, then everything is 2x2-average-pooled and the
    Gaussian windows (whose scales are given in full-resolution pixels) applied at half resolution:
    a quarter of the work, for windows of 2 px and more that a half-resolution grid resolves.

    Raises:
        ValueError: a side below :data:`MIN_SIDE`.
    """
    if min(x.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"texture statistics need images of at least {MIN_SIDE} px a side, got {tuple(x.shape[-2:])}")
    if x.shape[1] == 3:
        g = F.conv2d(x, torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1))
    else:
        g = x.mean(1, keepdim=True)
    grad = _conv3(g, [[[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]],
                      [[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]]])
    laplace = [[[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]]
    fine_log = _conv3(_blur(g, 1.0), laplace).abs()
    # half resolution: luma, its square, gradient energy, |LoG| at 1 px
    h = F.avg_pool2d(torch.cat([g, g * g, (grad * grad).sum(1, keepdim=True), fine_log], 1), 2)
    out = []
    smooth = {}
    for s in (2.0, 4.0):
        b = _blur(h[:, :3], s / 2)
        m = b[:, 0:1]
        smooth[s] = m
        out += [m, (b[:, 1:2] - m * m).clamp_min(0.0).sqrt(), b[:, 2:3].clamp_min(0.0).sqrt()]
    out.append(_blur(h[:, 3:4], 1.0))  # |LoG| at 1 px, smoothed at 2 px
    for s in (2.0, 4.0):  # scale-normalised in half-resolution pixels: (s/2)^2 * (half-res Laplacian)
        out.append(_blur((_conv3(smooth[s], laplace) * (s * s / 4)).abs(), s))
    return torch.cat(out, 1)


def _query_grid(x: torch.Tensor) -> torch.Tensor:
    """``(N, 9, H/4, W/4)``: the statistics 2x2-average-pooled once more, the grid the map is measured
    on (a sixteenth of the pixels: the nearest-centre search is the costly step, and on grass a
    quarter-resolution grid measured level with a half-resolution one, 2026-12-04)."""
    return F.avg_pool2d(texture_statistics(x), 2)


#: at most this many grid vectors of one image feed the bank (all of a 128² image's 32 x 32 grid): keeps the
#: fit's memory bounded for large images (a 1024² image has 65,536).
MAX_VECTORS_PER_IMAGE = 1024


@torch.no_grad()
def fit_statistics_bank(batches: Iterable[torch.Tensor], centres: int = 1024, samples: int = 60000,
                        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean ``(9,)``, std ``(9,)`` and ``(K, 9)`` k-means centres of normal images' statistics.

    Args:
        batches: normal training images, ``(B, C, H, W)`` float tensors in [0, 1].
        centres: ``K``; with no more vectors than that (a handful of small images), the vectors
            themselves are the bank.
        samples: pixel vectors drawn (uniformly, ``seed``) for the k-means. Images whose grid has more
            than :data:`MAX_VECTORS_PER_IMAGE` vectors contribute a random subset of that many.
        seed: of the sample and the k-means.

    Raises:
        ValueError: no images.
    """
    from sklearn.cluster import MiniBatchKMeans

    thin = np.random.default_rng(seed + 1)
    feats = []
    for b in batches:
        grid = _query_grid(b).permute(0, 2, 3, 1).reshape(b.shape[0], -1, len(STATISTICS)).numpy()
        if grid.shape[1] > MAX_VECTORS_PER_IMAGE:
            grid = np.stack([g[thin.choice(len(g), MAX_VECTORS_PER_IMAGE, replace=False)] for g in grid])
        feats.append(grid.reshape(-1, len(STATISTICS)))
    if not feats:
        raise ValueError("texture statistics need at least one normal training image")
    f = np.concatenate(feats).astype(np.float64)
    mean, std = f.mean(0), f.std(0) + 1e-6
    if len(f) <= centres:
        bank = (f - mean) / std
        log.info("texture statistics: all %d training vectors are the bank (<= %d centres)", len(f), centres)
    else:
        rng = np.random.default_rng(seed)
        pick = (f[rng.choice(len(f), min(samples, len(f)), replace=False)] - mean) / std
        bank = MiniBatchKMeans(centres, random_state=seed, n_init=1, batch_size=4096).fit(pick).cluster_centers_
        log.info("texture statistics: %d centres from %d of %d training vectors", centres, len(pick), len(f))
    return (torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32),
            torch.as_tensor(bank, dtype=torch.float32))


class StatisticsMap(nn.Module):
    """``(N, C, H, W)`` images -> ``(N, 1, H, W)`` distance of their local statistics to the
    nearest normal centre (in standardised units). Empty until :meth:`set_bank`."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(len(STATISTICS)))
        self.register_buffer("std", torch.ones(len(STATISTICS)))
        self.register_buffer("centres", torch.zeros(0, len(STATISTICS)))

    def set_bank(self, mean: torch.Tensor, std: torch.Tensor, centres: torch.Tensor) -> None:
        """Store what :func:`fit_statistics_bank` returned."""
        if centres.ndim != 2 or centres.shape[1] != len(STATISTICS) or len(centres) < 1:
            raise ValueError(f"centres must be (K >= 1, {len(STATISTICS)}), got {tuple(centres.shape)}")
        self.mean.copy_(mean.reshape(-1))
        self.std.copy_(std.reshape(-1))
        self.centres = centres.detach().float().clone()

    @property
    def fitted(self) -> bool:
        return self.centres.shape[0] > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise ValueError("texture statistics need set_bank() with normal training images' statistics first")
        h, w = x.shape[-2:]
        f = _query_grid(x)
        f = (f - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        n, d, hh, ww = f.shape
        q = f.reshape(n, d, hh * ww).transpose(1, 2)  # (N, Q, D)
        c = self.centres
        # |q - c|^2 = |q|^2 + (|c|^2 - 2 q.c): one (N, Q, K) product, [q, 1] @ [-2c, |c|^2]^T, its
        # minimum over K, then |q|^2 (the same for every centre). Not the (N, Q, K, D) of exact
        # differences: the vectors are standardised (norms of a few units), so the cancellation
        # stays ~1e-5 of a squared unit.
        aug_q = torch.cat([q, torch.ones_like(q[:, :, :1])], 2)
        aug_c = torch.cat([-2.0 * c, (c * c).sum(1, keepdim=True)], 1)
        d2 = (aug_q @ aug_c.t()).min(2).values + (q * q).sum(2)
        dist = d2.clamp_min(0.0).sqrt().reshape(n, 1, hh, ww)
        return F.interpolate(dist, size=(h, w), mode="bilinear", align_corners=False)

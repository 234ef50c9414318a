"""Residual scoring: how an image and its reconstruction become an anomaly map and a score.

Everything here is torch and traceable to ONNX: the exported graph is
``reconstruct -> residual -> (per-pixel normalisation) -> Gaussian smoothing -> map + score``.
Thresholds are *not* here; they live in the bundle's sidecar.

Residual kinds:
    ``l1``   mean over channels of |x - x_hat|
    ``l2``   mean over channels of (x - x_hat)^2
    ``ssim`` 1 - SSIM(x, x_hat) (Wang et al., 2004; 11x11 Gaussian window, sigma 1.5)
    ``gms``  1 - gradient-magnitude similarity (Xue et al., 2014; Sobel gradients)
    ``ms``   multi-scale GMS: mean of ``gms`` at scales 1, 1/2, 1/4, upsampled back (as in RIAD,
             Zavrtanik et al., 2021)
    ``l1_ssim`` mean of ``l1`` and ``ssim``
    ``learned`` the model's own defect probability ``model.defect_map(x, x_hat)`` in [0, 1] (a
             segmenter trained on synthetic defect masks, as DRAEM; models built with one only)
    ``<kind>_learned`` (``l1_learned``, …) the sum of ``<kind>`` and ``learned``, each standardised
             by its mean and std over normal validation images (:meth:`Scorer.set_mix_statistics`),
             so neither scale dominates: the residual finds what the repair removed, the segmenter
             what passes through it

Colour space of the ``l1`` / ``l2`` differences (``Scorer(colour=...)``, RGB models only):
    ``rgb``  per R, G, B channel (the default)
    ``ycc``  per BT.601 Y, Cb, Cr channel: the two chroma differences get two of the three votes, so
             a change of hue at the same brightness weighs more than in RGB, where luma dominates. On the
             ``ihc`` colour texture (3 seeds, ``l1`` + per-pixel normalisation, AE and AAE) it raised
             image AUROC by 0.07-0.08, pixel AUROC by 0.03-0.05 and AUPRO by 0.04-0.06, and lowered
             cracks (pure brightness) by 0.03; with ``l1_ssim`` it lowered every figure; with the
             CycleGAN repair's ``l1_learned`` / ``l1_ssim_learned`` it raised every figure
             (``benchmarks/results/2026-12-04-quality-colour.md``).
             ``ssim``, ``gms``, ``ms`` and ``learned`` are unchanged by it.

Texture statistics (``Scorer(texture=...)``, one more part of the map):
    ``none``  the map is the residual's (the default)
    ``stats`` the residual's map plus ``texture_weight`` times the distance of the input's local
              texture statistics to those of normal training images
              (:class:`anomaly.texture_stats.StatisticsMap`, fitted by :meth:`Scorer.set_statistics_bank`),
              each standardised on normal validation images (:meth:`Scorer.set_mix_statistics`). It
              finds patches of a foreign texture that pass through the repair; on grass it raised the
              CycleGAN repair's ``learned`` map's pixel AUROC and AUPRO
              (``benchmarks/results/2026-12-04-quality-texture-stats.md``)

Line filters (``Scorer(line_length=L)``, one more part of the map):
    ``0``     off (the default)
    ``L > 0`` the residual's first part, per-pixel normalised, filtered by a bank of
              :data:`LINE_ORIENTATIONS` straight 1 px lines of ``L`` px (each kernel of unit norm, so
              white noise keeps its spread) and the largest response over orientations kept,
              standardised on normal validation images and added to the map with ``line_weight``.
              A scratch or crack a pixel or two wide at a contrast near the residual's noise sums
              coherently along its length (about sqrt(L) times the noise's gain), where grain does
              not; see ``benchmarks/results/2026-12-08-tiling-thin-defects.md``

Latent scores (``Scorer(latent=...)``, image score only; the map is unchanged):
    ``none`` the image score is the map's aggregate
    ``knn``  the map's aggregate plus the mean Euclidean distance of the image's code
             ``model.encode(x)`` to its ``latent_k`` nearest codes of normal training images
             (:meth:`Scorer.set_latent_bank`), each standardised on normal validation images
             (:meth:`Scorer.set_score_mix`). An AAE's adversary shapes its codes to a prior, so a
             code far from every normal code flags an image even where the decoder's output is
             close to the input (measured in ``benchmarks/results/2026-11-22-quality-latent-knn.md``)

Example::

    scorer = Scorer(residual="ssim", smoothing_sigma=2.0, aggregate="topk")
    amap, score = scorer(x, x_hat)      # (N, 1, H, W), (N,)
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from anomaly.texture_stats import MIN_SIDE, StatisticsMap

__all__ = [
    "RESIDUALS",
    "PIXEL_RESIDUALS",
    "COLOUR_SPACES",
    "AGGREGATES",
    "ScoreOutput",
    "gaussian_kernel",
    "gaussian_blur",
    "ssim_map",
    "gms_map",
    "residual_map",
    "Scorer",
    "ReconstructionScorer",
    "TTA_MODES",
    "LATENT_SCORES",
    "TEXTURE_SCORES",
    "LINE_ORIENTATIONS",
    "line_kernels",
    "encode_decode",
    "FlipAveraged",
    "scoring_graph",
]

PIXEL_RESIDUALS = ("l1", "l2", "ssim", "gms", "ms", "l1_ssim")  # computed from x and x_hat alone
RESIDUALS = PIXEL_RESIDUALS + ("learned",) + tuple(f"{k}_learned" for k in PIXEL_RESIDUALS)
AGGREGATES = ("max", "mean", "topk")
COLOUR_SPACES = ("rgb", "ycc")
TTA_MODES = ("none", "flips")  # test-time augmentation of the exported graph (see FlipAveraged)
LATENT_SCORES = ("none", "knn")  # image-score term from the encoder's code (see Scorer)
TEXTURE_SCORES = ("none", "stats")  # map part from local texture statistics (see Scorer)
LINE_ORIENTATIONS = 8  # straight-line filters of the ``line`` part, evenly spaced over 180 degrees


def line_kernels(length: int, orientations: int = LINE_ORIENTATIONS, supersample: int = 8) -> torch.Tensor:
    """``(orientations, 1, L', L')`` float32 kernels (``L'`` = ``length`` rounded up to odd): a 1 px
    wide straight segment of ``length`` px through the centre at each angle, drawn anti-aliased by
    supersampling, each scaled to unit L2 norm."""
    if int(length) < 2:
        raise ValueError(f"line length must be >= 2 px, got {length}")
    size = int(length) | 1
    c = (size - 1) / 2
    sub = (torch.arange(size * supersample, dtype=torch.float64) + 0.5) / supersample - 0.5  # pixel coordinates
    yy, xx = torch.meshgrid(sub, sub, indexing="ij")
    out = []
    for i in range(orientations):
        a = torch.pi * i / orientations
        dx, dy = torch.cos(torch.tensor(a, dtype=torch.float64)), torch.sin(torch.tensor(a, dtype=torch.float64))
        along = (xx - c) * dx + (yy - c) * dy
        across = -(xx - c) * dy + (yy - c) * dx
        inside = ((across.abs() <= 0.5) & (along.abs() <= length / 2)).to(torch.float64)
        k = inside.reshape(size, supersample, size, supersample).mean((1, 3))
        out.append(k / k.square().sum().sqrt())
    return torch.stack(out)[:, None].float()


def encode_decode(model: nn.Module, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z (N, D), x_hat (N, C, H, W))`` from one encoder pass: ``model.decode(model.encode(x))``,
    which is what ``forward`` computes in ``eval()`` for the autoencoder family (AE, VAE, AAE and
    their conditional variants).

    Raises:
        ValueError: ``model`` has no ``encode``/``decode`` pair (e.g. a CycleGAN repair generator).
    """
    if not (hasattr(model, "encode") and hasattr(model, "decode")):
        raise ValueError(f"a latent score needs a model with encode() and decode() (ae, vae, aae, cvae, cond_aae); "
                         f"got {type(model).__name__}")
    z = model.encode(x, cond)
    return z, model.decode(z, cond)


class ScoreOutput(NamedTuple):
    """Outputs of the exported graph; the field names are the ONNX output names.

    Attributes:
        anomaly_map: ``(N, 1, H, W)`` float, higher = more anomalous.
        score: ``(N,)`` raw image score (aggregate of the map).
        reconstruction: ``(N, C, H, W)`` the model's ``x_hat`` ("what it should look like").
    """

    anomaly_map: torch.Tensor
    score: torch.Tensor
    reconstruction: torch.Tensor


def gaussian_kernel(sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """1-D normalised Gaussian ``(K,)`` with radius ``int(truncate * sigma + 0.5)`` (SciPy's rule,
    so ``sigma=1.5, truncate=3.5`` gives the 11-tap window of Wang et al.'s SSIM)."""
    radius = max(1, int(truncate * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _separable(x: torch.Tensor, k1d: torch.Tensor, pad_mode: str = "reflect") -> torch.Tensor:
    """Depthwise separable convolution of ``(N, C, H, W)`` with a 1-D kernel, same size out."""
    c = x.shape[1]
    r = k1d.numel() // 2
    kx = k1d.view(1, 1, 1, -1).repeat(c, 1, 1, 1).to(x)
    ky = k1d.view(1, 1, -1, 1).repeat(c, 1, 1, 1).to(x)
    x = F.pad(x, (r, r, r, r), mode=pad_mode)
    return F.conv2d(F.conv2d(x, kx, groups=c), ky, groups=c)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of ``(N, C, H, W)`` with reflect padding; ``sigma <= 0`` is identity."""
    if sigma <= 0:
        return x
    return _separable(x, gaussian_kernel(sigma))


def ssim_map(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5, data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel SSIM ``(N, 1, H, W)`` (mean over channels) of images in ``[0, data_range]``."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    k = gaussian_kernel(sigma, truncate=3.5)  # 11 taps for sigma 1.5, as in Wang et al.
    # Two formulations of the five local means, bit-for-bit the same values: exported graphs blur
    # a 5C-channel stack with one depthwise convolution pair (onnxruntime: +9-20 % images/s for the
    # default AAE at 128² batch 16, and it lets its NCHWc layout pay off), eager torch blurs the
    # five maps one by one (12 % faster there than the stack). Each engine gets its faster one,
    # so the torch-vs-onnxruntime comparison of `anomaly bench` is fair; parity tests hold both.
    if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
        stats = _separable(torch.cat([a, b, a * a, b * b, a * b], 1), k).split(a.shape[1], 1)
    else:
        stats = tuple(_separable(t, k) for t in (a, b, a * a, b * b, a * b))
    mu_a, mu_b, e_aa, e_bb, e_ab = stats
    var_a = e_aa - mu_a**2
    var_b = e_bb - mu_b**2
    cov = e_ab - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(1, keepdim=True)


def _gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    gx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 4.0
    k = torch.stack([gx, gx.t()]).unsqueeze(1).repeat(c, 1, 1, 1).to(x)  # (2C, 1, 3, 3)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k, groups=c)
    return torch.sqrt(g[:, 0::2] ** 2 + g[:, 1::2] ** 2 + 1e-12)


def gms_map(a: torch.Tensor, b: torch.Tensor, c: float = 0.0026) -> torch.Tensor:
    """Gradient-magnitude similarity ``(N, 1, H, W)`` in (0, 1]; 1 where the edges agree."""
    ga, gb = _gradient_magnitude(a), _gradient_magnitude(b)
    return ((2 * ga * gb + c) / (ga**2 + gb**2 + c)).mean(1, keepdim=True)


#: BT.601 RGB -> (Y, Cb, Cr), without offsets (it maps differences); rows sum to 1, 0, 0.
_YCC = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def _difference(x: torch.Tensor, x_hat: torch.Tensor, colour: str) -> torch.Tensor:
    """``x - x_hat`` ``(N, C, H, W)``, in YCbCr when ``colour == "ycc"`` (a fixed 1x1 convolution)."""
    d = x - x_hat
    if colour == "rgb":
        return d
    if d.shape[1] != 3:
        raise ValueError(f"colour {colour!r} needs an RGB model (3 channels), got {d.shape[1]} channel(s)")
    return F.conv2d(d, torch.tensor(_YCC, dtype=d.dtype, device=d.device)[:, :, None, None])


def residual_map(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l1", model: nn.Module | None = None,
                 colour: str = "rgb") -> torch.Tensor:
    """Raw residual ``(N, 1, H, W)`` of kind ``kind`` (see module docstring).

    ``model`` is needed only for ``learned`` (its ``defect_map`` method reads ``x`` and ``x_hat``).
    ``colour`` (:data:`COLOUR_SPACES`) is the space of the ``l1`` / ``l2`` differences.

    Raises:
        ValueError: unknown kind or colour space, ``learned`` without a segmenter, or ``ycc`` on a
            grayscale model.
    """
    if colour not in COLOUR_SPACES:
        raise ValueError(f"unknown colour space {colour!r}; expected one of {COLOUR_SPACES}")
    if kind == "learned":
        if model is None or not hasattr(model, "defect_map") or not hasattr(model, "segmenter"):
            raise ValueError("residual 'learned' needs a model with a segmenter "
                             "(e.g. cyclegan with model kwarg segmenter=true); got "
                             f"{type(model).__name__ if model is not None else 'no model'}")
        return model.defect_map(x, x_hat)
    if kind.endswith("_learned") and kind[: -len("_learned")] in PIXEL_RESIDUALS:
        raise ValueError(f"residual {kind!r} is a sum of two standardised maps: use Scorer, not residual_map")
    if kind == "l1":
        return _difference(x, x_hat, colour).abs().mean(1, keepdim=True)
    if kind == "l2":
        return (_difference(x, x_hat, colour) ** 2).mean(1, keepdim=True)
    if kind == "ssim":
        return 1.0 - ssim_map(x, x_hat)
    if kind == "gms":
        return 1.0 - gms_map(x, x_hat)
    if kind == "ms":
        h, w = x.shape[-2:]
        out = 1.0 - gms_map(x, x_hat)
        for f in (2, 4):
            a, b = F.avg_pool2d(x, f), F.avg_pool2d(x_hat, f)
            out = out + F.interpolate(1.0 - gms_map(a, b), size=(h, w), mode="bilinear", align_corners=False)
        return out / 3.0
    if kind == "l1_ssim":
        return 0.5 * (_difference(x, x_hat, colour).abs().mean(1, keepdim=True) + 1.0 - ssim_map(x, x_hat))
    raise ValueError(f"unknown residual {kind!r}; expected one of {RESIDUALS}")


class Scorer(nn.Module):
    """Residual -> normalised, smoothed anomaly map -> image score.

    Args:
        residual: one of :data:`RESIDUALS`.
        smoothing_sigma: Gaussian sigma in pixels of the model input (0 disables).
        aggregate: ``max``, ``mean`` or ``topk`` (mean of the top ``topk_fraction`` of pixels).
        topk_fraction: fraction of pixels averaged by ``topk``.
        image_size: ``(H, W)``; needed for ``topk`` (k is fixed in the graph) and for per-pixel
            normalisation.
        latent: one of :data:`LATENT_SCORES`; ``knn`` needs :meth:`set_latent_bank` and
            :meth:`set_score_mix` before use.
        latent_k: neighbours averaged by ``knn``.
        colour: one of :data:`COLOUR_SPACES`: the space of the ``l1`` / ``l2`` differences (``ycc``
            needs an RGB model and a residual with an ``l1`` or ``l2`` part).
        texture: one of :data:`TEXTURE_SCORES`; ``stats`` needs :meth:`set_statistics_bank` and
            :meth:`set_mix_statistics` before use, and images of at least
            :data:`anomaly.texture_stats.MIN_SIDE` px a side.
        texture_weight: the weight of the standardised ``stats`` part in the map's sum (the
            residual's parts weigh 1).

    The optional per-pixel normalisation (``set_normalization``) stores the mean and std of the
    residual of *normal* validation images at each pixel; dividing by them removes the model's
    own persistent reconstruction errors (edges, busbars) from the map. For a mixed residual
    (``l1_learned``) it applies to the first part, and ``set_mix_statistics`` must be called
    before use: each part is standardised by its global mean/std on normal images, then summed.
    """

    def __init__(self, *, residual: str = "l1", smoothing_sigma: float = 4.0, aggregate: str = "max",
                 topk_fraction: float = 0.01, image_size: tuple[int, int] = (64, 64),
                 latent: str = "none", latent_k: int = 5, colour: str = "rgb", texture: str = "none",
                 texture_weight: float = 0.5, line_length: int = 0, line_weight: float = 1.0) -> None:
        super().__init__()
        if int(line_length) < 0 or int(line_length) == 1:
            raise ValueError(f"line_length must be 0 (off) or >= 2 px, got {line_length}")
        if not float(line_weight) > 0:
            raise ValueError(f"line_weight must be > 0, got {line_weight}")
        if texture not in TEXTURE_SCORES:
            raise ValueError(f"unknown texture score {texture!r}; expected one of {TEXTURE_SCORES}")
        if not float(texture_weight) > 0:
            raise ValueError(f"texture_weight must be > 0, got {texture_weight}")
        if colour not in COLOUR_SPACES:
            raise ValueError(f"unknown colour space {colour!r}; expected one of {COLOUR_SPACES}")
        if latent not in LATENT_SCORES:
            raise ValueError(f"unknown latent score {latent!r}; expected one of {LATENT_SCORES}")
        if int(latent_k) < 1:
            raise ValueError(f"latent_k must be >= 1, got {latent_k}")
        if residual not in RESIDUALS:
            raise ValueError(f"unknown residual {residual!r}; expected one of {RESIDUALS}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}; expected one of {AGGREGATES}")
        self.residual = residual
        base = residual[: -len("_learned")] if residual.endswith("_learned") else residual
        if colour != "rgb" and base not in ("l1", "l2", "l1_ssim"):
            raise ValueError(f"colour {colour!r} changes the l1 / l2 differences only; residual {residual!r} has none "
                             f"(use l1, l2, l1_ssim or their _learned sums)")
        self.colour = colour
        self.smoothing_sigma = float(smoothing_sigma)
        self.aggregate = aggregate
        self.topk_fraction = float(topk_fraction)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.register_buffer("pixel_mean", torch.zeros(1, 1, *self.image_size))
        self.register_buffer("pixel_std", torch.ones(1, 1, *self.image_size))
        self.normalized = False
        self.parts: tuple[str, ...] = (residual[: -len("_learned")], "learned") if residual.endswith("_learned") else (residual,)
        self.texture = texture
        self.texture_weight = float(texture_weight)
        self.line_length = int(line_length)
        self.line_weight = float(line_weight)
        if self.line_length:
            if self.line_length > min(self.image_size):
                raise ValueError(f"line_length {self.line_length} is longer than the model input {self.image_size}")
            self.parts = self.parts + ("line",)
            self.register_buffer("line_bank", line_kernels(self.line_length))
        if texture == "stats":
            if min(self.image_size) < MIN_SIDE:
                raise ValueError(f"texture statistics need images of at least {MIN_SIDE} px a side; "
                                 f"image size is {self.image_size}")
            self.parts = self.parts + ("stats",)
            self.statistics = StatisticsMap()
        weights = [self.texture_weight if p == "stats" else self.line_weight if p == "line" else 1.0 for p in self.parts]
        self.register_buffer("mix_weight", torch.tensor(weights))
        self.register_buffer("mix_mean", torch.zeros(len(self.parts)))
        self.register_buffer("mix_std", torch.ones(len(self.parts)))
        self.mixed = False
        self.latent = latent
        self.latent_k = int(latent_k)
        self.register_buffer("latent_bank", torch.zeros(0, 0))
        self.register_buffer("latent_labels", torch.zeros(0, dtype=torch.int64))
        self.latent_conditional = False
        self.register_buffer("score_mean", torch.zeros(2))
        self.register_buffer("score_std", torch.ones(2))
        self.score_mixed = False

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-3) -> None:
        """Use per-pixel ``mean``/``std`` ``(1, 1, H, W)`` of normal residuals (before smoothing)."""
        self.pixel_mean.copy_(mean.reshape(self.pixel_mean.shape))
        self.pixel_std.copy_(std.reshape(self.pixel_std.shape).clamp_min(eps))
        self.normalized = True

    def set_mix_statistics(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        """Mean and std ``(P,)`` of each part of a mixed residual over normal images (after
        per-pixel normalisation and smoothing), one scalar per part."""
        self.mix_mean.copy_(mean.reshape(self.mix_mean.shape))
        self.mix_std.copy_(std.reshape(self.mix_std.shape).clamp_min(eps))
        self.mixed = True

    def set_statistics_bank(self, mean: torch.Tensor, std: torch.Tensor, centres: torch.Tensor) -> None:
        """Store the normal texture statistics (:func:`anomaly.texture_stats.fit_statistics_bank`)
        that the ``stats`` part measures against.

        Raises:
            ValueError: the scorer has no ``stats`` part, or ``centres`` is not ``(K, 9)``.
        """
        if self.texture != "stats":
            raise ValueError("set_statistics_bank() is for a scorer with texture='stats'")
        self.statistics.set_bank(mean, std, centres)

    def set_latent_bank(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Store the codes ``(M, D)`` of normal training images that ``knn`` measures against;
        with ``labels`` ``(M,)`` (conditional models) an image is compared with its own class only.

        Raises:
            ValueError: fewer than ``latent_k`` codes (in any class, with labels).
        """
        codes = codes.detach().float().reshape(codes.shape[0], -1)
        if len(codes) < self.latent_k:
            raise ValueError(f"latent knn needs at least latent_k={self.latent_k} training codes, got {len(codes)}")
        if labels is not None:
            labels = labels.detach().long().reshape(-1)
            counts = torch.bincount(labels)
            present = counts[counts > 0]
            if len(labels) != len(codes) or int(present.min()) < self.latent_k:
                raise ValueError(f"latent knn needs one label per code and at least latent_k={self.latent_k} codes "
                                 f"per class; got {len(labels)} labels, per-class counts {counts.tolist()}")
        self.latent_bank = codes.clone()
        self.latent_labels = labels.clone() if labels is not None else torch.zeros(0, dtype=torch.int64)
        self.latent_conditional = labels is not None

    def set_score_mix(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        """Mean and std ``(2,)`` over normal validation images of the map's aggregate and of the
        latent distance; :meth:`combine` standardises both with them."""
        self.score_mean.copy_(mean.reshape(2))
        self.score_std.copy_(std.reshape(2).clamp_min(eps))
        self.score_mixed = True

    def latent_distance(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """``(N,)``: mean Euclidean distance of each code ``z (N, D)`` to its ``latent_k`` nearest
        bank codes (of the same class when the bank has labels)."""
        if self.latent_bank.numel() == 0:
            raise ValueError("latent knn needs set_latent_bank() with codes of normal training images first")
        z = z.reshape(z.shape[0], -1)
        bank = self.latent_bank
        # exact differences (N, M, D), not |z|^2 - 2 z.b + |b|^2: the expansion cancels badly for the
        # near neighbours that decide the score, and onnxruntime and torch then disagree by ~1e-3
        d2 = ((z[:, None, :] - bank[None]) ** 2).sum(2)
        if self.latent_conditional:
            if label is None:
                raise ValueError("this scorer's bank is per class: pass the label")
            # other classes' codes are pushed out of reach instead of masked (traceable, fixed shapes)
            d2 = d2 + (label.reshape(-1, 1) != self.latent_labels[None]).to(d2.dtype) * 1e12
        nearest = torch.topk(d2, self.latent_k, dim=1, largest=False).values
        return nearest.clamp_min(0.0).sqrt().mean(1)

    def combine(self, map_score: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """Image score ``(N,)``: the sum of the standardised map aggregate and latent distance."""
        if not self.score_mixed:
            raise ValueError("latent knn needs set_score_mix() from normal validation images first")
        return (map_score - self.score_mean[0]) / self.score_std[0] + (distance - self.score_mean[1]) / self.score_std[1]

    def raw_residual(self, x: torch.Tensor, x_hat: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """``(N, 1, H, W)`` residual before normalisation and smoothing (``model``: see
        :func:`residual_map`); for a mixed residual, its first part (what per-pixel
        normalisation applies to)."""
        return residual_map(x, x_hat, self.parts[0], model, self.colour)

    def components(self, x: torch.Tensor, x_hat: torch.Tensor, model: nn.Module | None = None,
                   texture: bool = True) -> list[torch.Tensor]:
        """The parts ``(N, 1, H, W)`` of the map before smoothing: the first per-pixel normalised
        (when set), then (mixed residuals only) the segmenter's map, then (``texture="stats"``, and
        ``texture`` left on) the texture statistics' distance."""
        r = self.raw_residual(x, x_hat, model)
        if self.normalized:
            r = (r - self.pixel_mean) / self.pixel_std
        return [r] + [self.statistics(x) if kind == "stats" else self.line_response(r) if kind == "line"
                      else residual_map(x, x_hat, kind, model)
                      for kind in self.parts[1:] if texture or kind != "stats"]

    def line_response(self, r: torch.Tensor) -> torch.Tensor:
        """``(N, 1, H, W)``: the largest response of ``r`` ``(N, 1, H, W)`` to the bank of straight
        line filters (reflect padding), over the orientations."""
        pad = self.line_bank.shape[-1] // 2
        resp = F.conv2d(F.pad(r, (pad, pad, pad, pad), mode="reflect"), self.line_bank)
        return resp.amax(1, keepdim=True)

    def unsmoothed_map(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The map ``(N, 1, H, W)`` before smoothing from the first ``len(parts)`` parts of
        :meth:`components`: the part itself when it is the only one, else the weighted sum of the
        standardised parts (smoothing is linear, so the map is the sum of the standardised smoothed
        parts whose statistics :meth:`set_mix_statistics` holds)."""
        if len(self.parts) == 1:
            return parts[0]
        if not self.mixed:
            raise ValueError(f"residual {self.residual!r} needs set_mix_statistics() from normal images first")
        return sum(self.mix_weight[i] * (p - self.mix_mean[i]) / self.mix_std[i] for i, p in enumerate(parts))

    def texture_term(self, x: torch.Tensor) -> torch.Tensor:
        """The texture statistics' weighted, standardised part ``(N, 1, H, W)`` (``texture="stats"``)."""
        i = len(self.parts) - 1  # the statistics are the last part
        return self.mix_weight[i] * (self.statistics(x) - self.mix_mean[i]) / self.mix_std[i]

    def anomaly_map(self, x: torch.Tensor, x_hat: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """The smoothed (and normalised / standardised) map ``(N, 1, H, W)``."""
        return gaussian_blur(self.unsmoothed_map(self.components(x, x_hat, model)), self.smoothing_sigma)

    def image_score(self, amap: torch.Tensor) -> torch.Tensor:
        """The image score ``(N,)`` of a map ``(N, 1, H, W)``: its max, mean or top-k mean."""
        flat = amap.flatten(1)
        if self.aggregate == "max":
            return flat.max(1).values
        if self.aggregate == "mean":
            return flat.mean(1)
        k = max(1, int(round(self.topk_fraction * self.image_size[0] * self.image_size[1])))
        return flat.topk(k, dim=1).values.mean(1)

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor,
                model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(map (N, 1, H, W), the map's aggregate (N,))``. A ``knn`` latent term needs the code as
        well: :class:`ReconstructionScorer` adds it (:meth:`combine`)."""
        amap = self.anomaly_map(x, x_hat, model)
        return amap, self.image_score(amap)

    def config(self) -> dict:
        """The scorer's settings, as stored in checkpoints and the sidecar."""
        out = {"residual": self.residual, "smoothing_sigma": self.smoothing_sigma, "aggregate": self.aggregate,
               "topk_fraction": self.topk_fraction, "normalized": self.normalized, "colour": self.colour}
        if self.mixed:
            out["mix"] = {"parts": list(self.parts), "mean": self.mix_mean.tolist(), "std": self.mix_std.tolist(),
                          "weight": self.mix_weight.tolist()}
        if self.line_length:
            out["line_length"] = self.line_length
            out["line_weight"] = self.line_weight
        out["texture"] = self.texture
        if self.texture != "none":
            out["texture_weight"] = self.texture_weight
            out["texture_stats"] = {"centres": int(self.statistics.centres.shape[0])}
        out["latent"] = self.latent
        if self.latent != "none":
            out["latent_k"] = self.latent_k
            out["latent_bank"] = {"codes": int(self.latent_bank.shape[0]), "dim": int(self.latent_bank.shape[1]),
                                  "per_class": self.latent_conditional}
            out["score_mix"] = {"parts": ["map", "latent"], "mean": self.score_mean.tolist(), "std": self.score_std.tolist()}
        return out


class ReconstructionScorer(nn.Module):
    """The exported graph: ``image (N, C, H, W) [, label (N,)] -> ScoreOutput``.

    Args:
        model: a zoo reconstructor with ``forward(x, cond=None) -> x_hat``.
        scorer: a :class:`Scorer`.
    """

    def __init__(self, model: nn.Module, scorer: Scorer) -> None:
        super().__init__()
        self.model = model
        self.scorer = scorer

    def forward(self, image: torch.Tensor, label: torch.Tensor | None = None) -> ScoreOutput:
        if self.scorer.latent == "none":
            x_hat = self.model(image, label)
            amap, score = self.scorer(image, x_hat, self.model)
            return ScoreOutput(amap, score, x_hat)
        z, x_hat = encode_decode(self.model, image, label)
        amap = self.scorer.anomaly_map(image, x_hat, self.model)
        score = self.scorer.combine(self.scorer.image_score(amap), self.scorer.latent_distance(z, label))
        return ScoreOutput(amap, score, x_hat)


class FlipAveraged(nn.Module):
    """Test-time augmentation: the map averaged over the image and its three flips.

    The graph runs the reconstructor once on a batch of ``4N`` views (as is, left-right,
    up-down, both), flips each view's map back, averages the four and scores the average with
    the scorer's own aggregate. The flips are exactly those of ``anomaly train --augment flip``,
    so every view is an orientation the model trained on (rotations are not: a brick wall turned
    by 90 degrees is not a normal brick wall). Averaging removes the part of the map that depends
    on the orientation, mostly the repair's noise at the texture's grain; it costs four times the
    inference. The texture statistics part (``texture="stats"``), which commutes with the flips, is
    measured on the un-flipped view only (see :meth:`forward`). ``reconstruction`` is the un-flipped
    view's, and so is the code a ``knn`` latent score measures (the bank holds codes of un-flipped
    training images).

    Args and shapes as :class:`ReconstructionScorer`: ``image (N, C, H, W) [, label (N,)] -> ScoreOutput``.
    """

    def __init__(self, model: nn.Module, scorer: Scorer) -> None:
        super().__init__()
        self.model = model
        self.scorer = scorer

    def forward(self, image: torch.Tensor, label: torch.Tensor | None = None) -> ScoreOutput:
        model, scorer = self.model, self.scorer
        views = torch.cat([image, image.flip(-1), image.flip(-2), image.flip(-2, -1)], 0)
        labels = None if label is None else label.repeat(4)
        if scorer.latent == "none":
            x_hat = model(views, labels)
        else:
            z, x_hat = encode_decode(model, views, labels)
        if scorer.texture == "none":
            m = scorer.anomaly_map(views, x_hat, model)
            maps = m.reshape(4, -1, *m.shape[1:])  # (4, N, 1, H, W)
            amap = (maps[0] + maps[1].flip(-1) + maps[2].flip(-2) + maps[3].flip(-2, -1)) / 4
        else:
            # The texture statistics do not look at the reconstruction and commute with the flips
            # (symmetric filters, reflect padding, 2x2 pooling: views flipped back differ by 2e-5 on a
            # map of ~3.6), so the average of the four views is the un-flipped view's: measured once
            # (a quarter of the cost) and added to the average of the other parts before smoothing,
            # which commutes with the flips too. The texture rows of 2026-12-04-quality-texture-stats.md came out
            # the same to 4 digits (2026-12-04-quality-texture-stats-tta-brick.md).
            m = scorer.unsmoothed_map(scorer.components(views, x_hat, model, texture=False))
            maps = m.reshape(4, -1, *m.shape[1:])
            r = (maps[0] + maps[1].flip(-1) + maps[2].flip(-2) + maps[3].flip(-2, -1)) / 4
            amap = gaussian_blur(r + scorer.texture_term(image), scorer.smoothing_sigma)
        score = scorer.image_score(amap)
        if scorer.latent != "none":
            score = scorer.combine(score, scorer.latent_distance(z[: image.shape[0]], label))
        return ScoreOutput(amap, score, x_hat.reshape(4, -1, *x_hat.shape[1:])[0])


def scoring_graph(model: nn.Module, scorer: Scorer, tta: str = "none") -> nn.Module:
    """The graph that export traces: :class:`ReconstructionScorer`, wrapped in
    :class:`FlipAveraged` when ``tta == "flips"``.

    Raises:
        ValueError: ``tta`` is not one of :data:`TTA_MODES`.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {tta!r}; expected one of {TTA_MODES}")
    return FlipAveraged(model, scorer) if tta == "flips" else ReconstructionScorer(model, scorer)

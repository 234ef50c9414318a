"""Evaluation-only synthetic defects, kept with the benchmarks and apart from training's generator.

:class:`EvalDefectGenerator` draws the defects of the benchmarks' texture test splits
(``texture_data.make_texture_dataset``, used by ``benchmarks/quality.py``): shaded elliptical holes
and dents, branching random-walk cracks, foreign-object patches of another texture with blurred
edges, clusters of colour / brightness spots, and (colour images only) discoloured blotches whose
luma is unchanged. The product trains with :class:`anomaly.data.synthetic.DefectSynthesizer`; this
module is not installed with it.

It also draws the defects a line meets and a whole-image reconstruction misses
(:data:`FAINT_EVAL_KINDS`, used by ``benchmarks/thin_defects.py``): 1-3 px scratches and branching
cracks, diffuse haze, dust and smear, each at a requested width and contrast-to-noise ratio (CNR:
the mean absolute change inside the mask over the image's local noise std, :func:`local_noise_std`).
:meth:`EvalDefectGenerator.generate` returns, with the image and mask, the defect's kind, width in
px and measured CNR (an :class:`EvalDefect`), so that results can be binned by width and CNR.

Why a second generator that shares no code with training's
---------------------------------------------------------
A model trained to undo :class:`anomaly.data.synthetic.DefectSynthesizer`'s corruptions becomes very
good at exactly those shapes and blending statistics. If the benchmark's defects were drawn by the
same code (or by the same primitives with other parameters), the benchmark would reward memorising
our own augmentation rather than detecting anomalies, and would overstate what to expect on a real
line. So this generator is written independently, in its own module that imports nothing from
:mod:`anomaly.data.synthetic`: different shape primitives (ellipses with a surface-normal shading
model, random walks, polygons; never Perlin thresholds, polylines, Bezier curves or cut-and-paste of
the image itself), different appearance models (shading, darkening, alpha-composited foreign
texture, truncated Gaussians) and its own helpers, down to the layout ones (shape checks,
``(C, H, W)`` <-> ``(H, W, C)``). A test checks that it calls none of the training code. Real defect
images, when available, remain the better benchmark.

All randomness comes from the ``numpy.random.Generator`` passed in, so outputs are reproducible.
Torch-free (numpy + OpenCV).

Example::

    import sys; sys.path.insert(0, "benchmarks")
    from eval_defects import EvalDefectGenerator

    bad, gt = EvalDefectGenerator()(image, np.random.default_rng(0), kind="crack")   # image (C, H, W) in [0, 1]
    d = EvalDefectGenerator(FAINT_EVAL_KINDS).generate(image, rng, "thin_crack", width=1, cnr=2.0)
    d.record()   # {'kind': 'thin_crack', 'width_px': 1.0, 'cnr': 2.0, 'noise_std': ..., 'cnr_requested': 2.0}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

__all__ = ["EvalDefectGenerator", "EvalDefect", "EVAL_KINDS", "COLOUR_EVAL_KINDS", "FAINT_EVAL_KINDS",
           "THIN_EVAL_KINDS", "local_noise_std", "measured_cnr", "inscribed_width"]

EVAL_KINDS = ("hole", "crack", "foreign", "spot")
#: Evaluation defects that exist only in colour: ``"discolour"`` changes hue and saturation at an
#: unchanged luma, so a grayscale model cannot see it by construction. Kept out of
#: :data:`EVAL_KINDS` so that the grayscale benchmarks' files never change.
COLOUR_EVAL_KINDS = ("discolour",)
#: Thin and faint defects, drawn at a requested width (px) and contrast-to-noise ratio (CNR = mean
#: absolute change inside the mask / the image's local noise std, :func:`local_noise_std`): the
#: defects a line sees and a whole-image reconstruction misses. Kept out of :data:`EVAL_KINDS` (their
#: own benchmark, ``benchmarks/thin_defects.py``) so the existing data sets' files never change.
FAINT_EVAL_KINDS = ("thin_scratch", "thin_crack", "haze", "dust", "smear")
#: The kinds whose width is drawn from ``widths`` (1-3 px); dust specks take their diameter from it too.
THIN_EVAL_KINDS = ("thin_scratch", "thin_crack", "dust")
_ALL_KINDS = EVAL_KINDS + COLOUR_EVAL_KINDS + FAINT_EVAL_KINDS

#: Gaussian sigma (px) of the high-pass that :func:`local_noise_std` measures the noise on: the
#: fine grain a 1-3 px defect competes with, not the texture's coarse structure.
NOISE_SIGMA = 2.0
#: Pixels around a defect's mask (and the mask itself, on the clean image) that its noise is measured on.
NOISE_RADIUS = 8
#: Floor on the noise std: half a grey level of 8-bit data (a perfectly flat image still quantises).
NOISE_FLOOR = 0.5 / 255.0


# --------------------------------------------------------------------------------------------
# Layout helpers (no randomness, no appearance model)
# --------------------------------------------------------------------------------------------

def _check_chw(image: np.ndarray, who: str) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[0] not in (1, 3):
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"{who}: expected an image of shape (C, H, W) with C in (1, 3), got {shape}")
    if image.shape[1] < 8 or image.shape[2] < 8:
        raise ValueError(f"{who}: image {image.shape} is too small; expected H, W >= 8")


def _to_hwc(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` -> contiguous float32 ``(H, W, C)``."""
    return np.ascontiguousarray(image.transpose(1, 2, 0), dtype=np.float32)


def _to_chw(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` -> contiguous float32 ``(C, H, W)``."""
    if image.ndim == 2:
        image = image[:, :, None]
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def _as_hwc_channels(texture: np.ndarray, channels: int) -> np.ndarray:
    """A texture image -> float32 ``(H, W, channels)`` in [0, 1].

    Accepts ``(H, W)``, ``(H, W, 1|3|4)`` (as :func:`anomaly.data.io.read_image` returns) or ``(1|3, H, W)``
    (as :class:`anomaly.data.preprocess.Preprocess` returns); uint8 / uint16 / float.
    """
    t = np.asarray(texture)
    if t.dtype == np.uint8:
        t = t.astype(np.float32) / 255.0
    elif t.dtype == np.uint16:
        t = t.astype(np.float32) / 65535.0
    else:
        t = np.clip(t.astype(np.float32), 0.0, 1.0)
    if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[2] not in (1, 3, 4):
        t = t.transpose(1, 2, 0)
    if t.ndim == 2:
        t = t[:, :, None]
    if t.ndim != 3 or t.shape[2] not in (1, 3, 4):
        raise ValueError(f"texture: expected (H, W), (H, W, C) or (C, H, W) with C in 1/3/4, got {texture.shape}")
    if t.shape[2] == 4:
        t = t[:, :, :3]
    if channels == 1 and t.shape[2] == 3:
        t = cv2.cvtColor(np.ascontiguousarray(t), cv2.COLOR_RGB2GRAY)[:, :, None]
    elif channels == 3 and t.shape[2] == 1:
        t = np.repeat(t, 3, axis=2)
    return np.ascontiguousarray(t, dtype=np.float32)



def _gray(img: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` -> ``(H, W)``: the channel mean (what the defects' CNR is stated on)."""
    return img.mean(axis=2) if img.ndim == 3 else img


def local_noise_std(image: np.ndarray, mask: np.ndarray, radius: int = NOISE_RADIUS,
                    sigma: float = NOISE_SIGMA) -> float:
    """The local noise std of ``image`` around a defect's ``mask``: what a thin defect's contrast is measured against.

    The noise is the image's fine grain: the residual ``g - G_sigma * g`` of the gray image ``g`` (the
    channel mean) after a Gaussian low-pass, whose std is taken over the mask and every pixel within
    ``radius`` px of it, and divided by the high-pass's gain on white noise (so flat image plus white
    noise of std s gives s). Measure it on the image *without* the defect. Floored at
    :data:`NOISE_FLOOR` (half a grey level), so that a perfectly flat image still has a finite CNR.

    Args:
        image: ``(C, H, W)`` (C in 1, 3) or ``(H, W)`` float in [0, 1].
        mask: ``(H, W)`` or ``(1, H, W)``, non-zero = defect; must not be empty.
        radius: the neighbourhood around the mask, px.
        sigma: the low-pass's Gaussian sigma, px.

    Returns:
        The noise std in image units (1.0 = full scale).
    """
    img = np.asarray(image, np.float32)
    g = img.mean(axis=0) if img.ndim == 3 else img
    m = np.asarray(mask).reshape(g.shape) > 0
    if not m.any():
        raise ValueError("local_noise_std: the mask is empty; expected at least one defect pixel")
    half = int(np.ceil(4 * sigma))
    k = cv2.getGaussianKernel(2 * half + 1, sigma).astype(np.float64)[:, 0]
    low = cv2.sepFilter2D(np.ascontiguousarray(g), cv2.CV_32F, k, k, borderType=cv2.BORDER_REFLECT)
    resid = g - low
    gain = np.sqrt(1.0 - 2.0 * k[half] ** 2 + (k ** 2).sum() ** 2)  # std of (delta - G) * white noise
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    region = cv2.dilate(m.astype(np.uint8), disc) > 0
    return max(float(resid[region].std() / gain), NOISE_FLOOR)


def measured_cnr(clean: np.ndarray, defective: np.ndarray, mask: np.ndarray) -> float:
    """CNR of a defect as it is in the pixels: mean absolute change of the gray image inside ``mask``
    over :func:`local_noise_std` of ``clean``. Use it after quantising (8-bit files) to record what
    was written. ``clean``, ``defective``: ``(C, H, W)`` or ``(H, W)`` float in [0, 1]; ``mask``: ``(H, W)``
    or ``(1, H, W)``."""
    a, b = np.asarray(clean, np.float32), np.asarray(defective, np.float32)
    ga, gb = (a.mean(axis=0) if a.ndim == 3 else a), (b.mean(axis=0) if b.ndim == 3 else b)
    m = np.asarray(mask).reshape(ga.shape) > 0
    return float(np.abs(gb - ga)[m].mean() / local_noise_std(ga, m))


def inscribed_width(mask: np.ndarray) -> float:
    """Width of a mask in px: the diameter of its widest inscribed disc (``2 * max(distance) - 1``
    on the pixel grid, so a 1-px line gives 1, a 3-px line 3, a disc of diameter d about d).
    ``mask``: ``(H, W)`` or ``(1, H, W)``, non-zero = defect."""
    m = (np.asarray(mask).reshape(np.asarray(mask).shape[-2:]) > 0).astype(np.uint8)
    if not m.any():
        raise ValueError("inscribed_width: the mask is empty")
    dist = cv2.distanceTransform(np.pad(m, 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return float(2.0 * dist.max() - 1.0)


@dataclass(frozen=True)
class EvalDefect:
    """One generated evaluation defect and what it is.

    Attributes:
        image: ``(C, H, W)`` float32 in [0, 1], the defective image.
        mask: ``(1, H, W)`` float32 in {0, 1}, never empty.
        kind: the defect kind.
        width_px: its width in px: the drawn width of a thin kind (stroke or speck diameter), the
            stroke width of a smear, :func:`inscribed_width` of the mask otherwise.
        cnr: contrast-to-noise ratio as measured: mean absolute change of the gray image (channel
            mean) inside the mask, after clipping to [0, 1], over :func:`local_noise_std` of the
            image without the defect.
        noise_std: that local noise std (image units).
        cnr_requested: the CNR the generator was asked for (faint kinds), ``None`` for the others.
    """

    image: np.ndarray
    mask: np.ndarray
    kind: str
    width_px: float
    cnr: float
    noise_std: float
    cnr_requested: float | None = None

    def record(self) -> dict:
        """The JSON-able description (kind, width, CNR, noise) without the arrays."""
        return {"kind": self.kind, "width_px": round(float(self.width_px), 3), "cnr": round(float(self.cnr), 4),
                "noise_std": round(float(self.noise_std), 6),
                "cnr_requested": None if self.cnr_requested is None else round(float(self.cnr_requested), 4)}


# --------------------------------------------------------------------------------------------
# Evaluation defects
# --------------------------------------------------------------------------------------------


def _eval_supersampling(h: int, w: int) -> int:
    """Sub-pixel factor of the thin strokes' rendering: 8, less for large images (bounded memory)."""
    return int(max(2, min(8, 4096 // max(h, w))))


def _eval_stroke_coverage(h: int, w: int, paths: Sequence[np.ndarray], width: float) -> np.ndarray:
    """Share of each pixel covered by strokes of ``width`` px along ``paths`` (each ``(N, 2)`` of x, y
    pixel-centre coordinates): ``(H, W)`` float32 in [0, 1], rendered ``ss`` times finer and area-averaged."""
    ss = _eval_supersampling(h, w)
    canvas = np.zeros((h * ss, w * ss), np.uint8)
    thickness = max(1, int(round(width * ss)))
    for pts in paths:
        fine = np.round(np.asarray(pts, np.float64) * ss + (ss - 1) / 2.0).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(canvas, [fine], False, 255, thickness, cv2.LINE_8)
    return cv2.resize(canvas.astype(np.float32) / 255.0, (w, h), interpolation=cv2.INTER_AREA)


def _eval_disc_coverage(h: int, w: int, centres: np.ndarray, diameter: float) -> np.ndarray:
    """Share of each pixel covered by discs of ``diameter`` px at ``centres`` ``(N, 2)`` (x, y): ``(H, W)``."""
    ss = _eval_supersampling(h, w)
    canvas = np.zeros((h * ss, w * ss), np.uint8)
    r = max(1, int(round(diameter * ss / 2.0)))
    for x, y in np.asarray(centres, np.float64):
        cv2.circle(canvas, (int(round(x * ss + (ss - 1) / 2.0)), int(round(y * ss + (ss - 1) / 2.0))), r, 255, -1, cv2.LINE_8)
    return cv2.resize(canvas.astype(np.float32) / 255.0, (w, h), interpolation=cv2.INTER_AREA)


def _eval_arc(centre: np.ndarray, radius: float, a0: float, a1: float) -> np.ndarray:
    """Points ``(N, 2)`` every half pixel along a circular arc from angle ``a0`` to ``a1``."""
    n = max(2, int(abs(a1 - a0) * radius * 2) + 1)
    t = np.linspace(a0, a1, n)
    return np.stack([centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)], axis=1)


def _eval_stroke_path(h: int, w: int, length: float, rng: np.random.Generator) -> np.ndarray:
    """A straight segment (60 %) or a circular arc of about ``length`` px whose middle lies in the
    central 70 % of the image: ``(N, 2)`` x, y points."""
    mid = np.array([rng.uniform(0.15, 0.85) * (w - 1), rng.uniform(0.15, 0.85) * (h - 1)])
    heading = rng.uniform(0, np.pi)
    if rng.random() < 0.6:
        d = 0.5 * length * np.array([np.cos(heading), np.sin(heading)])
        n = max(2, int(length * 2))
        return mid[None] + np.linspace(-1.0, 1.0, n)[:, None] * d[None]
    span = rng.uniform(0.4, 1.2)  # radians of arc: a gently to clearly curved scratch
    radius = length / span
    side = 1 if rng.random() < 0.5 else -1
    centre = mid + side * radius * np.array([-np.sin(heading), np.cos(heading)])
    a_mid = np.arctan2(mid[1] - centre[1], mid[0] - centre[0])
    return _eval_arc(centre, radius, a_mid - span / 2, a_mid + span / 2)




def _eval_procedural_texture(h: int, w: int, c: int, rng: np.random.Generator) -> np.ndarray:
    """A texture unlike natural surfaces: oriented gratings, checkers or dots, ``(H, W, C)``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(3.0, 9.0)
    r = xx * np.cos(theta) + yy * np.sin(theta)
    style = int(rng.integers(3))
    if style == 0:
        tex = 0.5 + 0.5 * np.sin(2 * np.pi * r / period)
    elif style == 1:
        q = -xx * np.sin(theta) + yy * np.cos(theta)
        tex = ((np.floor(r / period) + np.floor(q / period)) % 2).astype(np.float32)
    else:
        q = -xx * np.sin(theta) + yy * np.cos(theta)
        tex = (np.sin(2 * np.pi * r / period) * np.sin(2 * np.pi * q / period) > 0.3).astype(np.float32)
    tex = tex * rng.uniform(0.3, 0.8) + rng.uniform(0.0, 0.3)
    out = np.repeat(tex[:, :, None], c, axis=2)
    if c == 3:
        out = out * rng.uniform(0.3, 1.0, size=(1, 1, 3))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _eval_random_walk(start: np.ndarray, heading: float, n_steps: int, step: float, wiggle: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points ``(n_steps + 1, 2)`` of a correlated random walk and the heading at each point."""
    turns = rng.normal(0.0, wiggle, size=n_steps)
    headings = heading + np.cumsum(turns)
    steps = step * np.stack([np.cos(headings), np.sin(headings)], axis=1)
    pts = np.vstack([start, start + np.cumsum(steps, axis=0)])
    return pts, np.concatenate([[heading], headings])


class EvalDefectGenerator:
    """Evaluation defects, independent of :class:`anomaly.data.synthetic.DefectSynthesizer` (see module docstring).

    Kinds (``EVAL_KINDS``):

    * ``"hole"``: an elliptical dent shaded by a directional light from its surface normals, or
      (sometimes) a through-hole with a dark floor and a shaded inner wall.
    * ``"crack"``: a dark, thin, correlated random walk with random branches.
    * ``"foreign"``: a polygonal or elliptical patch of another texture (``foreign_textures``, or
      procedural gratings / checkers / dots) composited with blurred edges.
    * ``"spot"``: a cluster of truncated-Gaussian brightness (gray) or colour (RGB) spots.
    * ``"discolour"`` (``COLOUR_EVAL_KINDS``, RGB images only): a blotch of overlapping ellipses,
      blurred at the edge, whose chroma is rotated and rescaled in the YCbCr plane while its luma
      (BT.601, what :class:`anomaly.data.preprocess.Preprocess` converts RGB to gray with) stays the same:
      a stain, burn or wrong coating that a grayscale model cannot see.

    Thin and faint kinds (``FAINT_EVAL_KINDS``), each drawn at a width (``widths``, px) and a
    contrast-to-noise ratio (CNR, log-uniform in ``cnr_range``) against the image's own
    :func:`local_noise_std` around the defect:

    * ``"thin_scratch"``: a straight or circular-arc stroke of 1-3 px, brighter or darker.
    * ``"thin_crack"``: a branching correlated random walk of 1-3 px, darker (mostly).
    * ``"haze"``: a large soft veil (one or two anisotropic Gaussians, sigma 15-35 % of the side):
      brightness shifted and local contrast slightly lowered; no edge anywhere. Its mask is the
      half-maximum region.
    * ``"dust"``: 15-80 specks of one diameter (the width, 1-3 px), scattered in a cluster or over
      the whole image, all brighter or all darker.
    * ``"smear"``: a soft streak (stroke 4-12 px wide, Gaussian-blurred profile) that shifts
      brightness and blurs the texture under it, as a wiped smudge does. Mask: half maximum.

    The change field is scaled so that the mean absolute change of the gray image inside the mask
    is ``cnr * local_noise_std``; :meth:`generate` reports the CNR measured after clipping.

    Args:
        kinds: subset of ``EVAL_KINDS + COLOUR_EVAL_KINDS + FAINT_EVAL_KINDS`` drawn from uniformly
            when ``kind`` is not given.
        foreign_textures: images for ``"foreign"`` patches (same formats as
            ``anomaly.data.synthetic.DefectSynthesizer``'s ``texture_source``).
        size_range: defect extent as a fraction of the image side, ``(low, high)``.
        cnr_range: ``(low, high)`` of the faint kinds' CNR, drawn log-uniformly.
        widths: the thin kinds' widths in px, drawn uniformly.

    Call: ``gen(image (C, H, W) float32 in [0, 1], rng, kind=None) -> (defective (C, H, W)
    float32 in [0, 1], mask (1, H, W) float32 in {0, 1})``. The mask is never empty.
    :meth:`generate` returns the same pair plus what the defect is (an :class:`EvalDefect`).
    """

    def __init__(self, kinds: Sequence[str] = EVAL_KINDS, foreign_textures: Sequence[np.ndarray] | None = None,
                 size_range: tuple[float, float] = (0.1, 0.3), cnr_range: tuple[float, float] = (0.5, 8.0),
                 widths: Sequence[int] = (1, 2, 3)) -> None:
        kinds = tuple(kinds)
        unknown = [k for k in kinds if k not in _ALL_KINDS]
        if not kinds or unknown:
            raise ValueError(f"EvalDefectGenerator: unknown kinds {unknown or '(none given)'}; "
                             f"expected a subset of {_ALL_KINDS}")
        if not 0.0 < size_range[0] <= size_range[1] <= 1.0:
            raise ValueError(f"EvalDefectGenerator: size_range must satisfy 0 < low <= high <= 1, got {size_range}")
        if not 0.0 < cnr_range[0] <= cnr_range[1]:
            raise ValueError(f"EvalDefectGenerator: cnr_range must satisfy 0 < low <= high, got {cnr_range}")
        widths = tuple(int(x) for x in widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"EvalDefectGenerator: widths must be positive integers (px), got {widths}")
        self.kinds = kinds
        self.foreign_textures = list(foreign_textures) if foreign_textures is not None else None
        self.size_range = (float(size_range[0]), float(size_range[1]))
        self.cnr_range = (float(cnr_range[0]), float(cnr_range[1]))
        self.widths = widths

    def __repr__(self) -> str:
        n = 0 if self.foreign_textures is None else len(self.foreign_textures)
        return (f"EvalDefectGenerator(kinds={self.kinds}, foreign_textures={n}, size_range={self.size_range}, "
                f"cnr_range={self.cnr_range}, widths={self.widths})")

    def __call__(self, image: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        d = self.generate(image, rng, kind)
        return d.image, d.mask

    def generate(self, image: np.ndarray, rng: np.random.Generator, kind: str | None = None, *,
                 width: float | None = None, cnr: float | None = None) -> EvalDefect:
        """One defect on ``image`` ``(C, H, W)`` float in [0, 1], with its kind, width and measured CNR.

        ``width`` (px) and ``cnr`` fix what the faint kinds otherwise draw from ``widths`` and
        ``cnr_range`` (``width`` applies to the thin kinds only; both are ignored by the other kinds,
        whose width and CNR are measured). Randomness comes from ``rng`` alone.
        """
        _check_chw(image, "EvalDefectGenerator")
        if kind is None:
            kind = self.kinds[int(rng.integers(len(self.kinds)))]
        elif kind not in _ALL_KINDS:
            raise ValueError(f"EvalDefectGenerator: unknown kind {kind!r}; expected one of {_ALL_KINDS}")
        if kind in COLOUR_EVAL_KINDS and image.shape[0] != 3:
            raise ValueError(f"EvalDefectGenerator: {kind!r} changes colour at constant luma and needs an RGB "
                             f"(3, H, W) image, got {image.shape[0]} channel(s)")
        if cnr is not None and not cnr > 0:
            raise ValueError(f"EvalDefectGenerator: cnr must be > 0, got {cnr}")
        if width is not None and not width >= 1:
            raise ValueError(f"EvalDefectGenerator: width must be >= 1 px, got {width}")
        img = _to_hwc(np.clip(image, 0.0, 1.0))
        requested = None
        if kind in FAINT_EVAL_KINDS:
            if cnr is None:
                lo, hi = self.cnr_range
                cnr = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            requested = float(cnr)
            if kind in THIN_EVAL_KINDS and width is None:
                width = float(self.widths[int(rng.integers(len(self.widths)))])
            delta, mask, width_px = getattr(self, f"_make_{kind}")(img, rng, width)
            if not mask.any():  # cannot happen for sane sizes; keep the contract anyway
                raise RuntimeError(f"EvalDefectGenerator: empty {kind} mask for image {image.shape}")
            noise = local_noise_std(_gray(img), mask)
            unit = float(np.abs(_gray(delta))[mask > 0].mean())
            out = img + delta * (requested * noise / max(unit, 1e-12))
        else:
            out, mask = getattr(self, f"_make_{kind}")(img, rng)
            if not mask.any():
                raise RuntimeError(f"EvalDefectGenerator: empty {kind} mask for image {image.shape}")
            noise = local_noise_std(_gray(img), mask)
            width_px = inscribed_width(mask)
        out = np.clip(out, 0.0, 1.0)
        measured = float(np.abs(_gray(out) - _gray(img))[mask > 0].mean() / noise)
        return EvalDefect(image=_to_chw(out), mask=mask[None].astype(np.float32), kind=kind, width_px=float(width_px),
                          cnr=measured, noise_std=noise, cnr_requested=requested)

    def _extent(self, size: int, rng: np.random.Generator) -> float:
        return rng.uniform(*self.size_range) * size

    def _make_hole(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w, c = img.shape
        size = min(h, w)
        a = max(2.5, self._extent(size, rng) / 2)
        b = max(2.0, a * rng.uniform(0.5, 1.0))
        cy, cx = rng.uniform(a + 1, h - a - 1), rng.uniform(a + 1, w - a - 1)
        phi = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(phi) + dy * np.sin(phi)) / a
        v = (-dx * np.sin(phi) + dy * np.cos(phi)) / b
        r2 = u * u + v * v
        mask = (r2 <= 1.0).astype(np.float32)
        if not mask.any():
            mask[int(round(cy)), int(round(cx))] = 1.0
        # Paraboloid dent z = -depth * (1 - r^2); normals from its gradient, Lambertian shading
        # relative to the flat surface (ratio = 1 outside the dent).
        depth = rng.uniform(0.25, 0.6)  # depth at the centre relative to the half-axes
        dzdx = 2 * depth * (u * np.cos(phi) - v * np.sin(phi) * a / b)
        dzdy = 2 * depth * (u * np.sin(phi) + v * np.cos(phi) * a / b)
        light_az, light_el = rng.uniform(0, 2 * np.pi), rng.uniform(np.radians(35), np.radians(60))
        lx, ly, lz = np.cos(light_az) * np.cos(light_el), np.sin(light_az) * np.cos(light_el), np.sin(light_el)
        norm = np.sqrt(dzdx ** 2 + dzdy ** 2 + 1.0)
        shade = np.clip((-dzdx * lx - dzdy * ly + lz) / (norm * lz), 0.15, 1.8)
        # The dented material is pressed smooth: soften the texture inside.
        k = max(3, (int(size * 0.03) | 1))
        smooth = cv2.GaussianBlur(img, (k, k), 0)
        if smooth.ndim == 2:
            smooth = smooth[:, :, None]
        base = 0.5 * img + 0.5 * smooth
        out_in = base * shade[:, :, None]
        if rng.random() < 0.4:  # through-hole: dark floor inside an inner ellipse
            floor = r2 <= rng.uniform(0.3, 0.6)
            out_in = np.where(floor[:, :, None], img * rng.uniform(0.05, 0.25) + 0.02, out_in)
        m = mask[:, :, None]
        return img * (1 - m) + out_in * m, mask

    def _make_crack(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w, c = img.shape
        size = min(h, w)
        mask8 = np.zeros((h, w), np.uint8)
        length = rng.uniform(1.5, 3.5) * self._extent(size, rng)
        step = max(1.0, size / 96)
        start = rng.uniform(0.2, 0.8, size=2) * [w - 1, h - 1]
        pending = [(start, rng.uniform(0, 2 * np.pi), int(length / step), 0)]
        width = 1 if size < 160 else 2
        while pending:
            p0, heading, n, depth = pending.pop()
            if n < 2:
                continue
            pts, headings = _eval_random_walk(np.asarray(p0, np.float64), heading, n, step, 0.22, rng)
            cv2.polylines(mask8, [np.round(pts).astype(np.int32).reshape(-1, 1, 2)], False, 1,
                          max(1, width - depth), cv2.LINE_8)
            if depth < 2:
                for i in np.flatnonzero(rng.random(n) < 0.035):
                    turn = rng.uniform(0.35, 1.1) * (1 if rng.random() < 0.5 else -1)
                    pending.append((pts[i], headings[i] + turn, int((n - i) * rng.uniform(0.2, 0.5)), depth + 1))
        mask = mask8.astype(np.float32)
        if not mask.any():
            mask[int(start[1]), int(start[0])] = 1.0
        darkness = rng.uniform(0.1, 0.4)
        m = mask[:, :, None]
        return img * (1 - m) + m * (img * darkness), mask

    def _make_foreign(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w, c = img.shape
        size = min(h, w)
        radius = max(3.0, self._extent(size, rng) / 2)
        cy, cx = rng.uniform(radius, h - radius), rng.uniform(radius, w - radius)
        shape8 = np.zeros((h, w), np.uint8)
        if rng.random() < 0.6:  # irregular convex polygon
            n = int(rng.integers(5, 10))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = radius * rng.uniform(0.6, 1.0, n)
            poly = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)
            cv2.fillPoly(shape8, [np.round(poly).astype(np.int32)], 1)
        else:
            axes = (int(round(radius)), int(round(radius * rng.uniform(0.4, 1.0))))
            cv2.ellipse(shape8, (int(round(cx)), int(round(cy))), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        sigma = rng.uniform(0.8, 2.5)
        alpha = cv2.GaussianBlur(shape8.astype(np.float32), (0, 0), sigma)
        mask = (alpha > 0.5).astype(np.float32)
        if not mask.any():
            mask = shape8.astype(np.float32)
            alpha = mask.copy()
        if self.foreign_textures:
            tex = _as_hwc_channels(self.foreign_textures[int(rng.integers(len(self.foreign_textures)))], c)
            th, tw = tex.shape[:2]
            y0, x0 = int(rng.integers(0, max(1, th - h) + 1)), int(rng.integers(0, max(1, tw - w) + 1))
            patch = cv2.resize(tex[y0:y0 + h, x0:x0 + w], (w, h), interpolation=cv2.INTER_AREA)
            if patch.ndim == 2:
                patch = patch[:, :, None]
        else:
            patch = _eval_procedural_texture(h, w, c, rng)
        # Make the object stand out from its surroundings: move its mean away from the local mean.
        sel = mask > 0
        local, own = img[sel].mean(axis=0), patch[sel].mean(axis=0)
        gap = rng.uniform(0.12, 0.3)
        target = np.where(local > 0.5, local - gap, local + gap)
        patch = np.clip(patch + (target - own)[None, None, :] * (np.abs(own - local) < gap), 0.0, 1.0)
        a = alpha[:, :, None]
        return img * (1 - a) + patch * a, mask

    def _make_spot(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w, c = img.shape
        size = min(h, w)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        extent = self._extent(size, rng)
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        profile = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(1, 4))):
            sy, sx = cy + rng.normal(0, extent / 3), cx + rng.normal(0, extent / 3)
            sigma = max(1.5, extent / 4 * rng.uniform(0.5, 1.0))
            profile = np.maximum(profile, np.exp(-((yy - sy) ** 2 + (xx - sx) ** 2) / (2 * sigma ** 2)))
        cut = 0.2
        # Truncated (no tails), then flattened: a visible spot with a soft but definite edge.
        profile = np.where(profile > cut, np.sqrt(profile), 0.0).astype(np.float32)
        mask = (profile > 0).astype(np.float32)
        if c == 1:
            amp = rng.uniform(0.3, 0.5)
            local = float(img[mask > 0].mean()) if mask.any() else 0.5
            tint = np.array([amp if local < 0.5 else -amp], np.float32)
        else:
            tint = rng.uniform(-0.5, 0.5, size=3).astype(np.float32)
            tint *= rng.uniform(0.3, 0.5) / (np.abs(tint).max() + 1e-6)
        return img + profile[:, :, None] * tint[None, None, :], mask

    def _make_discolour(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w, _ = img.shape
        size = min(h, w)
        extent = self._extent(size, rng)
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        shape8 = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(2, 5))):  # a blotch: overlapping ellipses around one centre
            ey, ex = cy + rng.normal(0, extent / 5), cx + rng.normal(0, extent / 5)
            axes = (max(2, int(round(extent / 2 * rng.uniform(0.5, 1.0)))), max(2, int(round(extent / 2 * rng.uniform(0.3, 0.8)))))
            cv2.ellipse(shape8, (int(round(ex)), int(round(ey))), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        alpha = cv2.GaussianBlur(shape8.astype(np.float32), (0, 0), rng.uniform(1.0, 3.0))
        alpha[alpha < 0.1] = 0.0  # the mask holds every pixel the blotch visibly changes
        mask = (alpha > 0).astype(np.float32)
        if not mask.any():
            mask, alpha = shape8.astype(np.float32), shape8.astype(np.float32)
        # BT.601 luma and chroma (the Y of cv2's RGB2GRAY / RGB2YCrCb, without its 0.5 offsets).
        r, g, b = img[:, :, 0], img[:, :, 1], img[:, :, 2]
        y = 0.299 * r + 0.587 * g + 0.114 * b
        cb, cr = 0.564 * (b - y), 0.713 * (r - y)
        # New chroma: rotated by 60-180 degrees, rescaled, plus a small cast so that gray areas change too.
        theta = rng.uniform(np.pi / 3, np.pi) * (1 if rng.random() < 0.5 else -1)
        scale = rng.uniform(0.8, 1.5)
        cast_dir = rng.uniform(0, 2 * np.pi)
        cast = rng.uniform(0.04, 0.08)
        ncb = scale * (np.cos(theta) * cb - np.sin(theta) * cr) + cast * np.cos(cast_dir)
        ncr = scale * (np.sin(theta) * cb + np.cos(theta) * cr) + cast * np.sin(cast_dir)
        a = alpha.astype(np.float32)
        ncb, ncr = cb + a * (ncb - cb), cr + a * (ncr - cr)
        dr, db = 1.403 * ncr, 1.773 * ncb
        chroma = np.stack([dr, -(0.299 * dr + 0.114 * db) / 0.587, db], axis=2)  # RGB minus luma: zero luma exactly
        # Pull the chroma toward gray where it would leave [0, 1]: the luma stays exactly the same.
        yy = y[:, :, None]
        room = np.where(chroma > 0, (1.0 - yy) / np.maximum(chroma, 1e-12), np.where(chroma < 0, yy / np.maximum(-chroma, 1e-12), np.inf))
        t = np.minimum(1.0, room.min(axis=2, keepdims=True))
        out = yy + t * chroma
        out[mask == 0] = img[mask == 0]  # bit-identical where the blotch does not reach
        return out.astype(np.float32), mask


    # ---------------------------------------------------------------- thin and faint kinds
    # Each returns (change field (H, W, C) at an arbitrary scale, mask (H, W), width px); generate()
    # scales the field to the requested CNR.

    def _make_thin_scratch(self, img: np.ndarray, rng: np.random.Generator,
                           width: float) -> tuple[np.ndarray, np.ndarray, float]:
        h, w, c = img.shape
        length = rng.uniform(0.3, 0.9) * min(h, w)
        cover = _eval_stroke_coverage(h, w, [_eval_stroke_path(h, w, length, rng)], width)
        sign = 1.0 if rng.random() < 0.5 else -1.0
        return np.repeat((sign * cover)[:, :, None], c, axis=2), (cover > 0.5).astype(np.float32), float(width)

    def _make_thin_crack(self, img: np.ndarray, rng: np.random.Generator,
                         width: float) -> tuple[np.ndarray, np.ndarray, float]:
        h, w, c = img.shape
        size = min(h, w)
        length = rng.uniform(0.4, 1.0) * size
        step = max(1.0, size / 128)
        start = rng.uniform(0.2, 0.8, size=2) * [w - 1, h - 1]
        paths, pending = [], [(start, rng.uniform(0, 2 * np.pi), int(length / step), 0)]
        while pending:
            p0, heading, n, depth = pending.pop()
            if n < 2:
                continue
            pts, headings = _eval_random_walk(np.asarray(p0, np.float64), heading, n, step, 0.05 * np.sqrt(step), rng)
            paths.append(pts)
            if depth < 2:
                for i in np.flatnonzero(rng.random(n) < 0.02):
                    turn = rng.uniform(0.4, 1.2) * (1 if rng.random() < 0.5 else -1)
                    pending.append((pts[i], headings[i] + turn, int((n - i) * rng.uniform(0.15, 0.4)), depth + 1))
        cover = _eval_stroke_coverage(h, w, paths, width)
        mask = (cover > 0.5).astype(np.float32)
        if not mask.any():  # a walk that left the image at once: draw its first point
            x, y = np.clip(np.round(start).astype(int), 0, [w - 1, h - 1])
            cover[y, x] = mask[y, x] = 1.0
        sign = -1.0 if rng.random() < 0.8 else 1.0  # cracks are mostly dark (EL: no current crosses them)
        return np.repeat((sign * cover)[:, :, None], c, axis=2), mask, float(width)

    def _make_haze(self, img: np.ndarray, rng: np.random.Generator,
                   width: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        h, w, c = img.shape
        size = min(h, w)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        veil = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(1, 3))):
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            s1 = rng.uniform(0.15, 0.35) * size
            s2 = s1 * rng.uniform(0.5, 1.0)
            phi = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)
            v = -(xx - cx) * np.sin(phi) + (yy - cy) * np.cos(phi)
            veil = np.maximum(veil, np.exp(-0.5 * ((u / s1) ** 2 + (v / s2) ** 2)))
        mask = (veil > 0.5).astype(np.float32)
        # Brightness shift plus a little lost contrast (pulled toward the local mean), both under the veil.
        local = cv2.GaussianBlur(img, (0, 0), max(2.0, size / 16))
        if local.ndim == 2:
            local = local[:, :, None]
        detail = img - local
        scale = float(np.abs(_gray(detail)).mean()) + 1e-6
        sign = 1.0 if rng.random() < 0.5 else -1.0
        beta = rng.uniform(0.0, 0.5)
        delta = veil[:, :, None] * (sign - beta * detail / scale)
        return delta.astype(np.float32), mask, inscribed_width(mask)

    def _make_dust(self, img: np.ndarray, rng: np.random.Generator,
                   width: float) -> tuple[np.ndarray, np.ndarray, float]:
        h, w, c = img.shape
        d = float(width)
        n = int(rng.integers(15, 81))
        if rng.random() < 0.5:  # a cluster
            radius = rng.uniform(0.15, 0.4) * min(h, w)
            centre = np.array([rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h])
        else:  # spread over the whole image
            radius, centre = None, None
        # Odd diameters centred on a pixel, even ones on a pixel corner: every speck covers its pixels alike.
        off = 0.0 if int(round(d)) % 2 else 0.5
        gap = d + 2.0
        pts: list[np.ndarray] = []
        for _ in range(n * 20):
            if len(pts) >= n:
                break
            if radius is None:
                p = np.array([rng.uniform(2, w - 3), rng.uniform(2, h - 3)])
            else:
                a, r = rng.uniform(0, 2 * np.pi), radius * np.sqrt(rng.random())
                p = np.clip(centre + r * np.array([np.cos(a), np.sin(a)]), [2, 2], [w - 3, h - 3])
            p = np.floor(p) + off
            if all(np.abs(p - q).max() >= gap for q in pts):  # specks apart: each stays one speck
                pts.append(p)
        cover = _eval_disc_coverage(h, w, np.array(pts), d)
        sign = 1.0 if rng.random() < 0.5 else -1.0
        return np.repeat((sign * cover)[:, :, None], c, axis=2), (cover > 0.5).astype(np.float32), d

    def _make_smear(self, img: np.ndarray, rng: np.random.Generator,
                    width: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        h, w, c = img.shape
        size = min(h, w)
        stroke = float(rng.uniform(4.0, 12.0))
        length = rng.uniform(0.3, 0.8) * size
        cover = _eval_stroke_coverage(h, w, [_eval_stroke_path(h, w, length, rng)], stroke)
        profile = cv2.GaussianBlur(cover, (0, 0), stroke / 3.0)
        profile /= max(float(profile.max()), 1e-6)
        mask = (profile > 0.5).astype(np.float32)
        smudged = cv2.GaussianBlur(img, (0, 0), stroke / 2.0)
        if smudged.ndim == 2:
            smudged = smudged[:, :, None]
        detail = smudged - img
        scale = float(np.abs(_gray(detail)).mean()) + 1e-6
        sign = 1.0 if rng.random() < 0.5 else -1.0
        delta = profile[:, :, None] * (sign + rng.uniform(0.3, 1.0) * detail / scale)
        return delta.astype(np.float32), mask, stroke

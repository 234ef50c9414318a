"""Synthetic defects: one generator to *train* repair models, another, separate one to *evaluate*.

Reconstruction models trained on normal images only can be taught to *repair* anomalies by
showing them corrupted normals and asking for the clean original back (DRAEM, Zavrtanik et al.,
"DRAEM - A discriminatively trained reconstruction embedding for surface anomaly detection",
ICCV 2021; CutPaste, Li et al., "CutPaste: Self-Supervised Learning for Anomaly Detection and
Localization", CVPR 2021). This module holds:

* :func:`perlin_noise` — fractal (octave) Perlin gradient noise in numpy, ``(H, W)`` in [-1, 1].
* :class:`DefectSynthesizer` — the **training** corruptions:

  - ``"perlin"``: a thresholded-Perlin-noise region filled with foreign content blended at a
    random opacity (DRAEM). The content comes from ``texture_source`` images (DRAEM uses DTD) or,
    without them, from a cropped / rotated / block-shuffled / colour-jittered copy of the image
    itself, so no external data set is needed.
  - ``"scratch"``: thin bright or dark polylines and Bezier curves.
  - ``"stain"``: one smooth, noise-edged blob with an intensity (and, in colour, tint) shift.
  - ``"cutpaste"``: a rectangle of the image cut and pasted elsewhere, optionally rotated and
    colour-jittered (CutPaste and its "scar" variant).

* :class:`EvalDefectGenerator` — the **evaluation** defects: shaded elliptical holes and dents,
  branching random-walk cracks, foreign-object patches of another texture with blurred edges,
  clusters of colour / brightness spots, and (colour images only) discoloured blotches whose
  luma is unchanged.
* :class:`SyntheticDefectDataset` — wraps a map-style dataset of normal images and yields
  ``{"image": defective, "target": clean, "mask": (1, S, S), ...}`` for the trainer.

Why two generators that share no code path
------------------------------------------
A model trained to undo :class:`DefectSynthesizer`'s corruptions becomes very good at exactly
those shapes and blending statistics. If the benchmark's defects were drawn by the same code (or
by the same primitives with other parameters), the benchmark would reward memorising our own
augmentation rather than detecting anomalies, and would overstate what to expect on a real line.
So :class:`EvalDefectGenerator` is written independently: different shape primitives (ellipses
with a surface-normal shading model, random walks, polygons; never Perlin thresholds, polylines,
Bezier curves or cut-and-paste of the image itself), different appearance models (shading,
darkening, alpha-composited foreign texture, truncated Gaussians) and its own private helpers.
Only trivial layout helpers (shape checks, ``(C, H, W)`` <-> ``(H, W, C)``) are shared. A test
checks that the evaluation code calls none of the training helpers. Real defect images, when
available, remain the better benchmark.

All randomness comes from the ``numpy.random.Generator`` passed in, so outputs are reproducible.
Torch-free (numpy + OpenCV), like the rest of :mod:`data`.

Example::

    rng = np.random.default_rng(0)
    synth = DefectSynthesizer(p_defect=0.5)
    defective, mask = synth(image, rng)          # image (C, H, W) float32 in [0, 1]
    train_ds = SyntheticDefectDataset(ImageDataset(layout.train, pre), synth, seed=0)
    bad, gt = EvalDefectGenerator()(image, rng, kind="crack")

    # DRAEM's way: fill the Perlin regions with other textures (a folder such as DTD)
    synth = DefectSynthesizer(texture_source=load_defect_sources("textures/"))
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

__all__ = [
    "perlin_noise",
    "DefectSynthesizer",
    "EvalDefectGenerator",
    "SyntheticDefectDataset",
    "load_defect_sources",
    "TRAIN_KINDS",
    "EVAL_KINDS",
    "COLOUR_EVAL_KINDS",
]

log = logging.getLogger(__name__)

TRAIN_KINDS = ("perlin", "scratch", "stain", "cutpaste")
EVAL_KINDS = ("hole", "crack", "foreign", "spot")
#: Evaluation defects that exist only in colour: ``"discolour"`` changes hue and saturation at an
#: unchanged luma, so a grayscale model cannot see it by construction. Kept out of
#: :data:`EVAL_KINDS` so that the grayscale benchmarks' files never change.
COLOUR_EVAL_KINDS = ("discolour",)


# --------------------------------------------------------------------------------------------
# Trivial shared helpers (layout only: no randomness, no appearance model)
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


# --------------------------------------------------------------------------------------------
# Perlin noise
# --------------------------------------------------------------------------------------------

def _fade(t: np.ndarray) -> np.ndarray:
    # Perlin's improved interpolant 6t^5 - 15t^4 + 10t^3 (zero 1st and 2nd derivative at 0, 1).
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _perlin_octave(h: int, w: int, res: int, rng: np.random.Generator) -> np.ndarray:
    """One octave of 2-D gradient noise with ``res`` lattice cells per side -> ``(H, W)``."""
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(res + 1, res + 1))
    gx, gy = np.cos(angles), np.sin(angles)
    y = (np.arange(h, dtype=np.float64) + 0.5) * res / h
    x = (np.arange(w, dtype=np.float64) + 0.5) * res / w
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    yf, xf = (y - yi)[:, None], (x - xi)[None, :]
    y0, x0 = yi[:, None], xi[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        # dot(gradient at lattice corner, offset from that corner)
        return gx[y0 + dy, x0 + dx] * (xf - dx) + gy[y0 + dy, x0 + dx] * (yf - dy)

    u, v = _fade(xf), _fade(yf)
    top = corner(0, 0) + u * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + u * (corner(1, 1) - corner(1, 0))
    return top + v * (bottom - top)


def perlin_noise(shape: tuple[int, int], scale: int, rng: np.random.Generator,
                 octaves: int = 4, persistence: float = 0.5) -> np.ndarray:
    """Fractal Perlin noise: a sum of octaves of gradient noise.

    Args:
        shape: ``(H, W)`` of the output.
        scale: lattice cells per side at the coarsest octave (1 = one smooth bump, 32 = fine
            grain); octave ``k`` uses ``scale * 2**k`` cells, stopping at 2 pixels per cell.
        rng: source of the random lattice gradients.
        octaves: number of octaves summed.
        persistence: amplitude ratio between successive octaves.

    Returns:
        ``(H, W)`` float32 in [-1, 1] (normalised by the largest value the octave sum can take,
        so typical values are well inside the range).
    """
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"perlin_noise: shape must be positive, got {shape}")
    if scale < 1:
        raise ValueError(f"perlin_noise: scale must be >= 1, got {scale}")
    total = np.zeros((h, w), np.float64)
    amp, amp_sum, res = 1.0, 0.0, int(scale)
    for k in range(max(1, octaves)):
        if k > 0 and res > max(h, w) / 2:
            break
        total += amp * _perlin_octave(h, w, res, rng)
        amp_sum += amp
        amp *= persistence
        res *= 2
    # A 2-D Perlin octave lies in [-sqrt(1/2), sqrt(1/2)].
    return np.clip(total / (amp_sum * math.sqrt(0.5)), -1.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Training defects
# --------------------------------------------------------------------------------------------

def load_defect_sources(folder: str | os.PathLike, max_images: int = 256, max_side: int = 256) -> list[np.ndarray]:
    """Read a folder of images to fill :class:`DefectSynthesizer`'s ``"perlin"`` regions with.

    DRAEM fills its training defects with textures from DTD, a set that has nothing to do with the
    product, so that the repair model is shown foreign content rather than only the perturbed
    copies of the product itself that the default fill makes. Any folder of images serves
    (textures, photographs); it must not hold the defects that will be evaluated. Measured on this
    project's texture benchmark (scikit-image photographs as sources): no change either way
    (``benchmarks/results/quality_session5.md``).

    Args:
        folder: searched recursively for image files.
        max_images: at most this many are kept, spread evenly over the sorted file list (memory
            stays bounded whatever the folder's size).
        max_side: larger images are shrunk (area interpolation) to this longest side: the
            synthesizer cuts 30-100 % crops and resizes them to the training size anyway.

    Returns:
        ``(H, W)`` or ``(H, W, 3|4)`` uint8 arrays, as :func:`anomaly.data.io.read_image` orders channels.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        anomaly.data.folder.DatasetError: it holds no readable image.
        ValueError: ``max_images`` / ``max_side`` < 1.
    """
    from anomaly.data.folder import DatasetError
    from anomaly.data.io import ImageReadError, list_images, read_image

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"defect sources: {root} is not a folder")
    if max_images < 1 or max_side < 1:
        raise ValueError(f"defect sources: max_images and max_side must be >= 1, got {max_images}, {max_side}")
    files = list_images(root)
    if len(files) > max_images:
        files = [files[i] for i in np.linspace(0, len(files) - 1, max_images).round().astype(int)]
    out: list[np.ndarray] = []
    for f in files:
        try:
            img = read_image(f, raw=True)
        except ImageReadError as exc:
            log.warning("defect sources: skipping %s", exc)
            continue
        if img.dtype == np.uint16:
            img = (img >> 8).astype(np.uint8)
        elif img.dtype != np.uint8:
            img = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        h, w = img.shape[:2]
        if max(h, w) > max_side:
            scale = max_side / max(h, w)
            img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        out.append(img)
    if not out:
        raise DatasetError(f"defect sources: no readable images in {root}")
    log.info("defect sources: %d images from %s", len(out), root)
    return out


class DefectSynthesizer:
    """Training-time corruptions for repair models (DRAEM / CutPaste style).

    Args:
        kinds: which corruptions to draw from (subset of ``TRAIN_KINDS``), uniformly.
        p_defect: probability that an image is corrupted; otherwise it is returned unchanged
            with an all-zero mask, so the model also learns the identity on normal images.
        texture_source: optional foreign images for ``"perlin"`` fills (``(H, W)``,
            ``(H, W, C)`` or ``(C, H, W)``, uint8 or float in [0, 1]); without them the fill is a
            transformed copy of the image itself.
        max_defects: up to this many corruptions are applied to one defective image.
        min_area: smallest defect area as a fraction of the image (masks are re-drawn below it).
        opacity: ``(low, high)`` range of the fill's opacity for ``"perlin"`` (DRAEM draws the
            blend factor of the original in [0, 0.8], i.e. opacity in [0.2, 1]).

    Call: ``synth(image (C, H, W) float32 in [0, 1], rng) -> (defective (C, H, W) float32
    in [0, 1], mask (1, H, W) float32 in {0, 1})``. Changes are confined to the mask.
    """

    def __init__(self, kinds: Sequence[str] = TRAIN_KINDS, p_defect: float = 0.5,
                 texture_source: Sequence[np.ndarray] | None = None, max_defects: int = 1,
                 min_area: float = 0.002, opacity: tuple[float, float] = (0.3, 1.0)) -> None:
        kinds = tuple(kinds)
        unknown = [k for k in kinds if k not in TRAIN_KINDS]
        if not kinds or unknown:
            raise ValueError(f"DefectSynthesizer: unknown kinds {unknown or '(none given)'}; expected a subset of {TRAIN_KINDS}")
        if not 0.0 <= p_defect <= 1.0:
            raise ValueError(f"DefectSynthesizer: p_defect must be in [0, 1], got {p_defect}")
        if max_defects < 1:
            raise ValueError(f"DefectSynthesizer: max_defects must be >= 1, got {max_defects}")
        self.kinds = kinds
        self.p_defect = float(p_defect)
        self.texture_source = list(texture_source) if texture_source is not None else None
        self.max_defects = int(max_defects)
        self.min_area = float(min_area)
        self.opacity = (float(opacity[0]), float(opacity[1]))

    def __repr__(self) -> str:
        n = 0 if self.texture_source is None else len(self.texture_source)
        return (f"DefectSynthesizer(kinds={self.kinds}, p_defect={self.p_defect}, textures={n}, "
                f"max_defects={self.max_defects})")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        _check_chw(image, "DefectSynthesizer")
        c, h, w = image.shape
        clean = np.clip(image.astype(np.float32, copy=False), 0.0, 1.0)
        if rng.random() >= self.p_defect:
            return clean.copy(), np.zeros((1, h, w), np.float32)
        img = _to_hwc(clean)
        mask = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(1, self.max_defects + 1))):
            kind = self.kinds[int(rng.integers(len(self.kinds)))]
            img, m = getattr(self, f"_{kind}")(img, rng)
            mask = np.maximum(mask, m)
        return _to_chw(np.clip(img, 0.0, 1.0)), mask[None].astype(np.float32)

    def apply(self, image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Apply one corruption ``kind`` unconditionally (useful for tests and previews).

        Returns ``(defective (C, H, W), mask (1, H, W))`` as :meth:`__call__`.
        """
        if kind not in TRAIN_KINDS:
            raise ValueError(f"DefectSynthesizer.apply: unknown kind {kind!r}; expected one of {TRAIN_KINDS}")
        _check_chw(image, "DefectSynthesizer")
        img, m = getattr(self, f"_{kind}")(_to_hwc(np.clip(image, 0.0, 1.0)), rng)
        return _to_chw(np.clip(img, 0.0, 1.0)), m[None].astype(np.float32)

    # -- masks ---------------------------------------------------------------------------------

    def _min_pixels(self, h: int, w: int) -> int:
        return max(4, int(self.min_area * h * w))

    def _perlin_mask(self, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        """Thresholded, randomly rotated Perlin noise -> ``(H, W)`` float32 {0, 1} (DRAEM)."""
        for _ in range(8):
            scale = int(2 ** rng.integers(1, 5))  # 2..16 lattice cells (DRAEM: 2**0..2**5 on 256 px)
            noise = perlin_noise((h, w), scale, rng, octaves=int(rng.integers(1, 4)))
            rot = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-90, 90)), 1.0)
            noise = cv2.warpAffine(noise, rot, (w, h), borderMode=cv2.BORDER_REFLECT)
            z = (noise - noise.mean()) / (noise.std() + 1e-8)
            mask = (z > rng.uniform(0.6, 1.6)).astype(np.float32)
            if mask.sum() >= self._min_pixels(h, w):
                return mask
        # Fall back to the top 5 % of the last noise field: never an empty mask.
        return (z >= np.quantile(z, 0.95)).astype(np.float32)

    # -- fills ---------------------------------------------------------------------------------

    @staticmethod
    def _jitter(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
        """Brightness / contrast / gamma (and per-channel gain in colour) jitter, (H, W, C)."""
        out = img
        mean = out.mean(axis=(0, 1), keepdims=True)
        out = (out - mean) * rng.uniform(1 - 0.5 * strength, 1 + 0.5 * strength) + mean
        out = out + rng.uniform(-0.3, 0.3) * strength
        if out.shape[2] == 3:
            out = out * rng.uniform(1 - 0.3 * strength, 1 + 0.3 * strength, size=(1, 1, 3))
        out = np.clip(out, 0.0, 1.0) ** rng.uniform(1 - 0.5 * strength, 1 + 0.8 * strength)
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def _anomaly_source(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Foreign content of the image's size ``(H, W, C)``: a texture, or a transformed self-crop."""
        h, w, c = img.shape
        if self.texture_source:
            tex = _as_hwc_channels(self.texture_source[int(rng.integers(len(self.texture_source)))], c)
        else:
            tex = img
        th, tw = tex.shape[:2]
        frac = rng.uniform(0.3, 1.0)
        ch, cw = max(4, int(th * frac)), max(4, int(tw * frac))
        y0, x0 = int(rng.integers(0, th - ch + 1)), int(rng.integers(0, tw - cw + 1))
        src = cv2.resize(tex[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
        if src.ndim == 2:
            src = src[:, :, None]
        src = np.rot90(src, int(rng.integers(4))) if h == w else src
        if rng.random() < 0.5:
            src = src[:, ::-1]
        src = np.ascontiguousarray(src)
        if not self.texture_source and rng.random() < 0.5:
            # Shuffle a grid of blocks: destroys the structure the model could otherwise copy.
            g = int(rng.integers(2, 5))
            bh, bw = h // g, w // g
            blocks = [src[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw].copy() for i in range(g) for j in range(g)]
            order = rng.permutation(len(blocks))
            for k, b in enumerate(order):
                i, j = divmod(k, g)
                src[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw] = blocks[b]
        src = self._jitter(src, rng)
        if rng.random() < 0.2:
            src = 1.0 - src
        return src

    # -- kinds ---------------------------------------------------------------------------------

    def _perlin(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        # DRAEM: I_a = (1 - M) * I + (1 - beta) * (M * A) + beta * (M * I), opacity = 1 - beta.
        h, w, _ = img.shape
        mask = self._perlin_mask(h, w, rng)
        source = self._anomaly_source(img, rng)
        alpha = rng.uniform(*self.opacity)
        m = mask[:, :, None]
        out = img * (1 - m) + m * (alpha * source + (1 - alpha) * img)
        return out, mask

    def _scratch(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w, c = img.shape
        size = min(h, w)
        mask8 = np.zeros((h, w), np.uint8)
        for _ in range(8):
            for _ in range(int(rng.integers(1, 4))):
                thickness = int(rng.integers(1, max(2, size // 64) + 1))
                if rng.random() < 0.5:  # quadratic Bezier curve
                    p = rng.uniform(0, 1, size=(3, 2)) * [w - 1, h - 1]
                    t = np.linspace(0, 1, 40)[:, None]
                    pts = (1 - t) ** 2 * p[0] + 2 * (1 - t) * t * p[1] + t ** 2 * p[2]
                else:  # short random polyline
                    n = int(rng.integers(2, 6))
                    start = rng.uniform(0, 1, 2) * [w - 1, h - 1]
                    steps = rng.normal(0, size * 0.15, size=(n - 1, 2))
                    pts = np.vstack([start, start + np.cumsum(steps, axis=0)])
                cv2.polylines(mask8, [np.round(pts).astype(np.int32).reshape(-1, 1, 2)], False, 1, thickness, cv2.LINE_8)
            if mask8.sum() >= 4:
                break
        mask = mask8.astype(np.float32)
        bright = rng.random() < 0.5
        value = rng.uniform(0.75, 1.0, size=(1, 1, c)) if bright else rng.uniform(0.0, 0.25, size=(1, 1, c))
        if c == 3 and rng.random() < 0.7:
            value = np.full((1, 1, 3), value.mean())
        alpha = rng.uniform(0.6, 1.0)
        m = mask[:, :, None] * alpha
        return img * (1 - m) + m * value, mask

    def _stain(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w, c = img.shape
        size = min(h, w)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        for _ in range(8):
            cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
            ry, rx = rng.uniform(0.05, 0.2, size=2) * size
            theta = rng.uniform(0, np.pi)
            dy, dx = yy - cy, xx - cx
            u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
            v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
            # Elliptic bump with a Perlin-wobbled edge.
            field = 1.0 - np.sqrt(u * u + v * v) + 0.35 * perlin_noise((h, w), int(rng.integers(2, 6)), rng, octaves=2)
            mask = (field > 0).astype(np.float32)
            if mask.sum() >= self._min_pixels(h, w):
                break
        # Weight: strongest in the middle, at least 0.5 of the shift up to the edge.
        inner = np.clip(field / (field.max() + 1e-6), 0.0, 1.0)
        weight = mask * (0.5 + 0.5 * inner)
        delta = rng.uniform(0.15, 0.4) * (1 if rng.random() < 0.5 else -1)
        shift = np.full((1, 1, c), delta, np.float32)
        if c == 3:
            shift = shift * rng.uniform(0.4, 1.6, size=(1, 1, 3))
        return img + weight[:, :, None] * shift, mask

    def _cutpaste(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        # CutPaste: area ratio in [0.02, 0.15], aspect ratio log-uniform in [0.3, 3.3];
        # "scar" variant rotated by up to +-45 degrees.
        h, w, c = img.shape
        for _ in range(20):
            area = rng.uniform(0.02, 0.15) * h * w
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
            ph = int(np.clip(round(math.sqrt(area * aspect)), 3, h - 2))
            pw = int(np.clip(round(math.sqrt(area / aspect)), 3, w - 2))
            angle = float(rng.uniform(-45, 45)) if rng.random() < 0.5 else 0.0
            rad = math.radians(angle)
            bw = abs(pw * math.cos(rad)) + abs(ph * math.sin(rad))
            bh = abs(pw * math.sin(rad)) + abs(ph * math.cos(rad))
            if bw >= w - 1 or bh >= h - 1:
                continue
            sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
            src_c = (sx + pw / 2, sy + ph / 2)
            tgt_c = (rng.uniform(bw / 2, w - bw / 2), rng.uniform(bh / 2, h - bh / 2))
            if math.hypot(tgt_c[0] - src_c[0], tgt_c[1] - src_c[1]) < 0.5 * max(ph, pw):
                continue
            mat = cv2.getRotationMatrix2D(src_c, angle, 1.0)
            mat[:, 2] += (tgt_c[0] - src_c[0], tgt_c[1] - src_c[1])
            rect = np.zeros((h, w), np.float32)
            rect[sy:sy + ph, sx:sx + pw] = 1.0
            mask = (cv2.warpAffine(rect, mat, (w, h), flags=cv2.INTER_LINEAR) > 0.5).astype(np.float32)
            if mask.sum() < self._min_pixels(h, w):
                continue
            moved = cv2.warpAffine(img, mat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            if moved.ndim == 2:
                moved = moved[:, :, None]
            moved = self._jitter(moved, rng, strength=0.3)
            m = mask[:, :, None]
            return img * (1 - m) + m * moved, mask
        log.debug("cutpaste: no placement found for a %dx%d image, using a stain instead", h, w)
        return self._stain(img, rng)


# --------------------------------------------------------------------------------------------
# Evaluation defects (independent of everything above except the layout helpers)
# --------------------------------------------------------------------------------------------

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
    """Evaluation defects, independent of :class:`DefectSynthesizer` (see module docstring).

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

    Args:
        kinds: subset of ``EVAL_KINDS + COLOUR_EVAL_KINDS`` drawn from uniformly when ``kind`` is
            not given.
        foreign_textures: images for ``"foreign"`` patches (same formats as
            ``DefectSynthesizer.texture_source``).
        size_range: defect extent as a fraction of the image side, ``(low, high)``.

    Call: ``gen(image (C, H, W) float32 in [0, 1], rng, kind=None) -> (defective (C, H, W)
    float32 in [0, 1], mask (1, H, W) float32 in {0, 1})``. The mask is never empty.
    """

    def __init__(self, kinds: Sequence[str] = EVAL_KINDS, foreign_textures: Sequence[np.ndarray] | None = None,
                 size_range: tuple[float, float] = (0.1, 0.3)) -> None:
        kinds = tuple(kinds)
        unknown = [k for k in kinds if k not in EVAL_KINDS + COLOUR_EVAL_KINDS]
        if not kinds or unknown:
            raise ValueError(f"EvalDefectGenerator: unknown kinds {unknown or '(none given)'}; "
                             f"expected a subset of {EVAL_KINDS + COLOUR_EVAL_KINDS}")
        if not 0.0 < size_range[0] <= size_range[1] <= 1.0:
            raise ValueError(f"EvalDefectGenerator: size_range must satisfy 0 < low <= high <= 1, got {size_range}")
        self.kinds = kinds
        self.foreign_textures = list(foreign_textures) if foreign_textures is not None else None
        self.size_range = (float(size_range[0]), float(size_range[1]))

    def __repr__(self) -> str:
        n = 0 if self.foreign_textures is None else len(self.foreign_textures)
        return f"EvalDefectGenerator(kinds={self.kinds}, foreign_textures={n}, size_range={self.size_range})"

    def __call__(self, image: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        _check_chw(image, "EvalDefectGenerator")
        if kind is None:
            kind = self.kinds[int(rng.integers(len(self.kinds)))]
        elif kind not in EVAL_KINDS + COLOUR_EVAL_KINDS:
            raise ValueError(f"EvalDefectGenerator: unknown kind {kind!r}; expected one of {EVAL_KINDS + COLOUR_EVAL_KINDS}")
        if kind in COLOUR_EVAL_KINDS and image.shape[0] != 3:
            raise ValueError(f"EvalDefectGenerator: {kind!r} changes colour at constant luma and needs an RGB "
                             f"(3, H, W) image, got {image.shape[0]} channel(s)")
        img = _to_hwc(np.clip(image, 0.0, 1.0))
        out, mask = getattr(self, f"_make_{kind}")(img, rng)
        if not mask.any():  # cannot happen for sane sizes; keep the contract anyway
            raise RuntimeError(f"EvalDefectGenerator: empty {kind} mask for image {image.shape}")
        return _to_chw(np.clip(out, 0.0, 1.0)), mask[None].astype(np.float32)

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


# --------------------------------------------------------------------------------------------
# Dataset wrapper
# --------------------------------------------------------------------------------------------

class SyntheticDefectDataset:
    """Map-style dataset: corrupt each normal image with a :class:`DefectSynthesizer`.

    ``ds[i]`` is the wrapped item with ``image`` replaced by the defective image and two keys
    added: ``target`` (the clean image, ``(C, S, S)``) and ``mask`` (``(1, S, S)`` float32 in
    {0, 1}); other keys (``label``, ``anomalous``, …) pass through unchanged.

    Reproducibility: the defect for index ``i`` is drawn from a generator seeded by
    ``(seed, epoch, i, k)`` where ``k`` counts this process's draws of ``i``. In one process each
    epoch therefore sees fresh defects and a rerun repeats them; with DataLoader workers (which
    copy the dataset) call :meth:`set_epoch` before each epoch so that epochs still differ.

    Args:
        base: a map-style dataset whose items are dicts with ``"image"`` ``(C, S, S)`` float in
            [0, 1] (e.g. :class:`anomaly.data.folder.ImageDataset`).
        synthesizer: the corruption (default: ``DefectSynthesizer()``).
        seed: base seed.
    """

    def __init__(self, base: Any, synthesizer: DefectSynthesizer | None = None, seed: int = 0) -> None:
        self.base = base
        self.synthesizer = synthesizer if synthesizer is not None else DefectSynthesizer()
        self.seed = int(seed)
        self.epoch = 0
        self._draws: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's defects (and restart the per-index draw counters)."""
        self.epoch = int(epoch)
        self._draws.clear()

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        if not isinstance(item, dict) or "image" not in item:
            raise TypeError(f"SyntheticDefectDataset: base[{i}] must be a dict with an 'image' key, got {type(item).__name__}")
        i = int(i) % len(self) if len(self) else int(i)
        k = self._draws.get(i, 0)
        self._draws[i] = k + 1
        rng = np.random.default_rng((self.seed, self.epoch, i, k))
        clean = np.asarray(item["image"], dtype=np.float32)
        defective, mask = self.synthesizer(clean, rng)
        out = dict(item)
        out["image"] = defective
        out["target"] = clean
        out["mask"] = mask
        return out

"""Synthetic training defects: corrupted normal images that repair models learn to undo.

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

* :class:`SyntheticDefectDataset` — wraps a map-style dataset of normal images and yields
  ``{"image": defective, "target": clean, "mask": (1, S, S), ...}`` for the trainer.

The benchmarks' evaluation defects are drawn by a separate generator that shares no code with
this one and lives with the benchmarks (``benchmarks/eval_defects.py``): a benchmark drawn with
training's own shapes would reward memorising them rather than detecting anomalies.

All randomness comes from the ``numpy.random.Generator`` passed in, so outputs are reproducible.
Torch-free (numpy + OpenCV), like the rest of :mod:`anomaly.data`.

Example::

    rng = np.random.default_rng(0)
    synth = DefectSynthesizer(p_defect=0.5)
    defective, mask = synth(image, rng)          # image (C, H, W) float32 in [0, 1]
    train_ds = SyntheticDefectDataset(ImageDataset(layout.train, pre), synth, seed=0)

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
    "SyntheticDefectDataset",
    "load_defect_sources",
    "TRAIN_KINDS",
]

log = logging.getLogger(__name__)

TRAIN_KINDS = ("perlin", "scratch", "stain", "cutpaste")


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
    (``benchmarks/results/2026-11-21-quality-foreign-texture-blobs.md``).

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

"""High-resolution inspection images built from real photographs, for native-resolution benchmarks.

A whole-image model shrinks every image to its input side (64-256 px) before it looks; a 1-3 px
scratch on a 1024 px part is then an eighth of a pixel wide. To measure what native-resolution
tiling (``anomaly train --tile-scale 1``) gains over that, the benchmark needs images that are
large *at their native pixel scale*: never upsampled (an upsampled image is smooth at the pixel
level, and a 1-px defect drawn on it would stand out as no real one does). This module builds
them, in MVTec-AD layout, from real pictures only:

* ``brick_hr``, ``grass_hr``, ``gravel_hr``: mosaics of scikit-image's 512x512 texture photographs
  (:func:`anomaly.data.textures.load_texture`). A mosaic is a grid of ``cell x cell`` crops
  copied pixel for pixel (random places, random horizontal / vertical flips, a random grid
  offset), so every normal image is different and the pixel scale is the photograph's. Training
  mosaics are cut from the left ``train_fraction`` of the photograph's columns, test mosaics from
  the rest (:func:`column_bands`): no test pixel was ever seen in training. The cells' seams are
  part of every normal image, training and test alike.
* ``elpv_panel`` (mono cells), ``elpv_panel_poly``: panels of real functional ELPV cells
  (defect probability 0, 300x300 px each), ``g x g`` cells with ``g = size // 300`` (3x3 = 900 px
  for ``size`` 1024, 6x6 = 1,800 px for 2048), cells drawn without repetition within a panel.
  Training panels use the cells of :func:`anomaly.data.elpv.prepare_elpv`'s ``train/good``, test
  panels those of its ``test/good``: disjoint sets of cells.

Test images: ``n_test_good`` normal ones, and for each faint evaluation kind
(``eval_defects.FAINT_EVAL_KINDS``: 1-3 px scratches and cracks, haze, dust, smear) ``n_per_kind``
defective ones, each a normal test image (``j % n_test_good``) with one defect drawn at native
resolution by ``eval_defects.EvalDefectGenerator`` (never by training's synthesizer). Nothing but
the defect tells a defective image from its normal twin. ``manifest.json`` records every image's
source (mosaic cells or panel cells) and each defect's kind, width (px) and CNR, measured on the
8-bit file as written.

Example::

    import sys; sys.path.insert(0, "benchmarks")
    from highres_data import make_highres_dataset

    root = make_highres_dataset("/tmp/hr/brick_hr", "brick_hr", size=1024, seed=0)
    # root/train/good/000.png (1024x1024), root/test/{good,thin_scratch,...}/000.png, root/ground_truth/...
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling benchmark modules, however this one is loaded
    sys.path.insert(0, str(Path(__file__).resolve().parent))

__all__ = ["HR_TEXTURES", "PANELS", "HIGHRES", "ELPV_CELL", "column_bands", "texture_mosaic", "cell_panel",
           "panel_grid", "make_highres_dataset"]

log = logging.getLogger(__name__)

#: mosaics of scikit-image's texture photographs, by data set name -> texture
HR_TEXTURES = {"brick_hr": "brick", "grass_hr": "grass", "gravel_hr": "gravel"}
#: panels of functional ELPV cells, by data set name -> cell type
PANELS = {"elpv_panel": "mono", "elpv_panel_poly": "poly"}
HIGHRES = tuple(HR_TEXTURES) + tuple(PANELS)
#: side of an ELPV cell image, px
ELPV_CELL = 300
_FORMAT = 1  # bump whenever the generated files change, so cached data sets are rebuilt


def column_bands(width: int, train_fraction: float = 0.6) -> tuple[tuple[int, int], tuple[int, int]]:
    """The source columns ``[x0, x1)`` of the training and of the test crops: the left
    ``train_fraction`` of ``width`` and the rest. Disjoint, so a test mosaic holds no training pixel."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    split = int(round(train_fraction * width))
    if not 0 < split < width:
        raise ValueError(f"a source {width} px wide leaves an empty band at train_fraction {train_fraction}")
    return (0, split), (split, width)


def texture_mosaic(source: np.ndarray, size: int, cell: int, columns: tuple[int, int], rng: np.random.Generator,
                   flips: bool = True) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A ``(size, size)`` mosaic of ``cell x cell`` crops of ``source[:, columns[0]:columns[1]]`` at native scale.

    The grid starts at a random offset in ``(-cell, 0]`` on each axis, so its seams move from image
    to image; each cell is a crop copied pixel for pixel from a random place of the band (never
    resized), flipped horizontally and / or vertically at random (``flips``).

    Args:
        source: ``(H, W)`` or ``(H, W, C)`` uint8 photograph.
        size: side of the mosaic, px.
        cell: side of the crops, px; must fit in the band (``columns``) and in ``H``.
        columns: the source columns ``[x0, x1)`` crops are cut from.
        rng: all randomness.
        flips: random flips of each crop.

    Returns:
        ``(mosaic, cells)``: the uint8 mosaic ``(size, size[, C])`` and one record per cell,
        ``{"at": [y, x] (top-left in the mosaic, may be negative), "box": [y0, x0, y1, x1] (in the
        source), "hflip": bool, "vflip": bool}``; :func:`_rebuild` puts them together again.
    """
    h, w = source.shape[:2]
    x0, x1 = int(columns[0]), int(columns[1])
    if not 0 <= x0 < x1 <= w:
        raise ValueError(f"columns {columns} are not a band of a source {w} px wide")
    if cell < 8 or cell > x1 - x0 or cell > h:
        raise ValueError(f"a {cell} px cell does not fit in the {h}x{x1 - x0} px band (columns {x0}-{x1}); "
                         f"expected 8 <= cell <= {min(h, x1 - x0)}")
    if size < 8:
        raise ValueError(f"size must be >= 8 px, got {size}")
    oy, ox = (int(v) for v in rng.integers(0, cell, size=2))
    out = np.zeros((size, size) + source.shape[2:], source.dtype)
    cells = []
    for py in range(-oy, size, cell):
        for px in range(-ox, size, cell):
            sy = int(rng.integers(0, h - cell + 1))
            sx = int(rng.integers(x0, x1 - cell + 1))
            hflip = bool(flips and rng.random() < 0.5)
            vflip = bool(flips and rng.random() < 0.5)
            rec = {"at": [py, px], "box": [sy, sx, sy + cell, sx + cell], "hflip": hflip, "vflip": vflip}
            _paste(out, _cell_pixels(source, rec), py, px)
            cells.append(rec)
    return out, cells


def _cell_pixels(source: np.ndarray, rec: dict[str, Any]) -> np.ndarray:
    y0, x0, y1, x1 = rec["box"]
    patch = source[y0:y1, x0:x1]
    if rec["hflip"]:
        patch = patch[:, ::-1]
    if rec["vflip"]:
        patch = patch[::-1]
    return patch


def _paste(canvas: np.ndarray, patch: np.ndarray, y: int, x: int) -> None:
    """Copy ``patch`` into ``canvas`` with its top-left corner at ``(y, x)``, clipped to the canvas."""
    ph, pw = patch.shape[:2]
    h, w = canvas.shape[:2]
    cy0, cx0, cy1, cx1 = max(y, 0), max(x, 0), min(y + ph, h), min(x + pw, w)
    if cy0 < cy1 and cx0 < cx1:
        canvas[cy0:cy1, cx0:cx1] = patch[cy0 - y:cy1 - y, cx0 - x:cx1 - x]


def _rebuild(source: np.ndarray, size: int, cells: Sequence[dict[str, Any]]) -> np.ndarray:
    """The mosaic that :func:`texture_mosaic`'s ``cells`` records describe (for checks)."""
    out = np.zeros((size, size) + source.shape[2:], source.dtype)
    for rec in cells:
        _paste(out, _cell_pixels(source, rec), *rec["at"])
    return out


def panel_grid(size: int, cell: int = ELPV_CELL) -> int:
    """Cells per panel side: the most whole ``cell`` px cells that fit in ``size`` (at least 1)."""
    return max(1, int(size) // int(cell))


def cell_panel(cells: Sequence[np.ndarray], grid: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """A ``grid x grid`` panel of cell images, row by row, drawn from ``cells`` without repetition.

    Args:
        cells: the pool, each ``(h, w)`` uint8 of one shape.
        grid: cells per side.
        rng: picks the cells.

    Returns:
        ``(panel (grid * h, grid * w) uint8, indices of the cells used, row by row)``.
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if len(cells) < grid * grid:
        raise ValueError(f"a {grid}x{grid} panel needs {grid * grid} distinct cells, the pool holds {len(cells)}")
    shapes = {np.asarray(c).shape for c in cells}
    if len(shapes) != 1:
        raise ValueError(f"cells of one shape expected, got shapes {sorted(shapes)}")
    idx = [int(i) for i in rng.choice(len(cells), size=grid * grid, replace=False)]
    rows = [np.concatenate([cells[i] for i in idx[r * grid:(r + 1) * grid]], axis=1) for r in range(grid)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0)), idx


def _read_gray(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise RuntimeError(f"{path}: unreadable image")
    return img


def _normal_sources(name: str, root: Path, size: int, cell: int, train_fraction: float, seed: int
                    ) -> tuple[dict[str, Callable[[np.random.Generator], tuple[np.ndarray, dict]]], dict]:
    """Per split (``train``, ``test``) a function ``(rng) -> (normal image, record)``, and what to
    record about the sources in the manifest."""
    if name in HR_TEXTURES:
        from anomaly.data.textures import load_texture

        source = load_texture(HR_TEXTURES[name])
        if source.ndim == 3:
            source = cv2.cvtColor(source, cv2.COLOR_RGB2GRAY)
        train_cols, test_cols = column_bands(source.shape[1], train_fraction)

        def mosaic(columns: tuple[int, int]):
            def make(rng: np.random.Generator) -> tuple[np.ndarray, dict]:
                img, cells = texture_mosaic(source, size, cell, columns, rng)
                return img, {"cells": cells}
            return make

        info = {"source": f"skimage.data.{HR_TEXTURES[name]}()", "source_shape": list(source.shape),
                "train_columns": list(train_cols), "test_columns": list(test_cols)}
        return {"train": mosaic(train_cols), "test": mosaic(test_cols)}, info
    if name in PANELS:
        from anomaly.data.elpv import prepare_elpv

        src = prepare_elpv(root.parent / "elpv_cells", cell_type=PANELS[name], seed=seed)
        grid = panel_grid(size)
        pools: dict[str, tuple[list[str], list[np.ndarray]]] = {}
        for split in ("train", "test"):
            files = sorted((src / split / "good").iterdir())
            pools[split] = ([f.name for f in files], [_read_gray(f) for f in files])

        def panel(split: str):
            names, cells = pools[split]

            def make(rng: np.random.Generator) -> tuple[np.ndarray, dict]:
                img, idx = cell_panel(cells, grid, rng)
                return img, {"cells": [f"{split}/good/{names[i]}" for i in idx]}
            return make

        info = {"source": f"elpv-dataset, functional {PANELS[name]} cells (prepare_elpv seed {seed})",
                "grid": grid, "train_cells": len(pools["train"][0]), "test_cells": len(pools["test"][0])}
        return {"train": panel("train"), "test": panel("test")}, info
    raise ValueError(f"unknown high-resolution data set {name!r}; expected one of {HIGHRES}")


def make_highres_dataset(root: str | os.PathLike, name: str, size: int = 1024, n_train: int = 40,
                         n_test_good: int = 30, n_per_kind: int = 30, seed: int = 0, *,
                         kinds: Sequence[str] | None = None, cnr_range: tuple[float, float] = (0.5, 8.0),
                         cell: int = 128, train_fraction: float = 0.6) -> Path:
    """Write the MVTec-AD-style category ``name`` (see module docstring) into ``root``; reused when
    it is already there with the same parameters.

    Args:
        root: the category folder (its parent also holds the ELPV split for the panels).
        name: one of :data:`HIGHRES`.
        size: side of the mosaics (px); the panels hold ``size // 300`` cells a side.
        n_train: normal training images.
        n_test_good: normal test images.
        n_per_kind: defective test images per kind, the normal test images in turn plus a defect.
        seed: seeds every random choice (and the ELPV split); the same arguments give the same files.
        kinds: the defect kinds (default ``eval_defects.FAINT_EVAL_KINDS``).
        cnr_range: contrast-to-noise range of the defects, drawn log-uniformly.
        cell: side of a mosaic's crops, px (textures only).
        train_fraction: share of the photograph's columns, from the left, for training (textures only).

    Returns:
        ``Path(root)``.

    Raises:
        ValueError: an unknown name or kind, counts below 1, cells that do not fit.
        FileExistsError: ``root`` holds files that this function did not write.
    """
    from anomaly.data.io import atomic_write, write_image
    from eval_defects import FAINT_EVAL_KINDS, EvalDefectGenerator, measured_cnr
    from texture_data import recorded_params

    if name not in HIGHRES:
        raise ValueError(f"unknown high-resolution data set {name!r}; expected one of {HIGHRES}")
    kinds = tuple(kinds or FAINT_EVAL_KINDS)
    if min(n_train, n_test_good) < 1 or n_per_kind < 0:
        raise ValueError(f"need n_train, n_test_good >= 1 and n_per_kind >= 0, got {n_train}, {n_test_good}, {n_per_kind}")
    if size < 64:
        raise ValueError(f"size must be >= 64 px, got {size}")
    root = Path(root)
    params = {"format": _FORMAT, "name": name, "size": int(size), "n_train": int(n_train),
              "n_test_good": int(n_test_good), "n_per_kind": int(n_per_kind), "seed": int(seed),
              "kinds": list(kinds), "cnr_range": [float(cnr_range[0]), float(cnr_range[1])]}
    if name in HR_TEXTURES:
        params |= {"cell": int(cell), "train_fraction": float(train_fraction)}
    manifest_path = root / "manifest.json"
    recorded = recorded_params(manifest_path)
    ours = recorded is not None
    if ours:
        if recorded == params:
            return root
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: exists and is not empty, nor a data set written by make_highres_dataset")

    sources, info = _normal_sources(name, root, size, cell, train_fraction, seed)
    gen = EvalDefectGenerator(kinds=kinds, cnr_range=cnr_range)
    stream = HIGHRES.index(name)
    train_rng, good_rng, bad_rng = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, 17, stream]).spawn(3))
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)
    records: dict[str, dict] = {}
    try:
        for i in range(n_train):
            img, rec = sources["train"](train_rng)
            write_image(tmp / f"train/good/{i:03d}.png", img)
            records[f"train/good/{i:03d}.png"] = rec
        normals = []
        for i in range(n_test_good):
            img, rec = sources["test"](good_rng)
            write_image(tmp / f"test/good/{i:03d}.png", img)
            records[f"test/good/{i:03d}.png"] = rec
            normals.append(img)
        for kind in kinds:
            for j in range(n_per_kind):
                base = normals[j % n_test_good]
                clean = base.astype(np.float32)[None] / 255.0
                d = gen.generate(clean, bad_rng, kind)
                written = np.clip(np.round(d.image[0] * 255.0), 0, 255).astype(np.uint8)
                rel = f"test/{kind}/{j:03d}.png"
                write_image(tmp / rel, written)
                write_image(tmp / f"ground_truth/{kind}/{j:03d}_mask.png", (d.mask[0] > 0.5).astype(np.uint8) * 255)
                records[rel] = {**d.record(), "source": f"test/good/{j % n_test_good:03d}.png",
                                "cnr": round(measured_cnr(clean, written[None].astype(np.float32) / 255.0, d.mask), 4)}
        with atomic_write(tmp / "manifest.json", "w", encoding="utf-8") as fh:
            json.dump({"params": params, **info, "crops": records}, fh, indent=1)
        if root.exists():  # ours with other parameters, or an empty folder
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: wrote %s (%d train, %d normal test, %d defective test images of %d px)",
             root, name, n_train, n_test_good, n_per_kind * len(kinds), size)
    return root

"""Thin and faint defects: results binned by defect width and contrast-to-noise, at a fixed normal-pixel FPR.

A quality figure averaged over gross defects (holes, stains, foreign patches) says nothing about the
defects a line loses money on: 1-3 px scratches and cracks a few grey levels above the noise, haze,
dust and smear. This benchmark draws those with the evaluation-only generator
(``benchmarks/eval_defects.py``, :data:`eval_defects.FAINT_EVAL_KINDS`, apart from training's
:mod:`anomaly.data.synthetic`), trains the product exactly as a user would (``anomaly train --data
CAT --model aae`` with its defaults, then ``anomaly export``), scores the test images through the
deployed :class:`anomaly.deploy.runtime.Runtime`, and reports, per defect kind, per width bin (1, 2,
3, >3 px), per CNR bin (<1, 1-2, 2-4, >4) and per width x CNR cell:

* **image AUROC** of the normal test images against that group's defective images
  (:func:`anomaly.metrics.image_metrics`);
* **pixel recall at 1 % normal-pixel FPR**: the threshold is the 99th percentile of the anomaly-map
  values of the *normal* test images' pixels; recall is the share of the group's defect pixels
  above it (pooled over the group), and ``per-defect`` the mean of each defect's own share.

Maps are judged at the test images' native resolution (the runtime's model-resolution map is
resized to the mask's size, bilinearly): a 1-px crack is a 1-px mask, not a mask shrunk with the
image until it disappears.

Data sets (built once under ``--cache``):

* ``brick``, ``grass``, ``gravel``: ``texture_data.make_texture_dataset`` crops of scikit-image's
  texture photographs at native scale (``--texture-size`` px), test defects of the faint kinds only;
  ``--control`` also scores the same bundle on the same normal crops with the usual gross defects
  (holes, cracks, foreign patches, spots), binned the same way: what the model does find;
* ``elpv_mono``, ``elpv_poly``: the real ELPV cells (:func:`anomaly.data.elpv.prepare_elpv`; 300 px),
  whose normal test cells each get one faint defect: the defective test set is the normal test set
  plus a defect, cell for cell (``test/<kind>``), so nothing but the defect tells them apart.
* ``brick_hr``, ``grass_hr``, ``gravel_hr`` (``--hr-size`` px mosaics of the texture photographs at
  native scale, training and test cut from disjoint columns) and ``elpv_panel``,
  ``elpv_panel_poly`` (3x3 panels of real functional cells, 900 px; training and test panels from
  disjoint cells): large images for native-resolution tiling, built by ``benchmarks/highres_data.py``;
  ``--hr-test N`` normal test images and N per faint kind, each a normal test image plus a defect.

Configurations (``--configs``, ``--config NAME=OPTIONS``): several ``anomaly train`` settings
trained and scored on the same data, each within ``--max-minutes`` of wall clock or, fairer on a
shared machine, ``--cpu-minutes`` of CPU (spent in resumed segments), e.g. the whole-image resize
baseline against native-resolution tiling::

    whole     --model aae --image-size 128
    tiled     --model aae --image-size 64 --tile-scale 1
    tiled128  --model aae --image-size 128 --tile-scale 1

With more than one, a side-by-side table follows the per-configuration tables: per kind, width
bin, CNR bin and kind x bin, every configuration's image AUROC and pixel recall and the winner by
how much; and a cost table: epochs the budget allowed, CPU and wall seconds, and the runtime's
scoring time per test image, wall and CPU (decode, tiling, inference, stitching; one thread).

Examples (the first two are what ``benchmarks/results/2026-12-07-thin-faint-baseline.md`` holds; it
had no time budget, which ``--max-minutes 0`` restores)::

    python benchmarks/thin_defects.py --datasets brick --epochs 100 --texture-test 100 --control --max-minutes 0 --out bench_thin
    python benchmarks/thin_defects.py --datasets elpv_mono --epochs 60 --max-minutes 0 --out bench_thin_elpv
    python benchmarks/thin_defects.py --datasets brick_hr,elpv_panel --configs whole,tiled,tiled128 \\
        --epochs 1000 --cpu-minutes 4 --out bench_tiling --discard-models

Output: markdown tables on stdout and ``OUT/results.md``, every image's record (kind, width, CNR,
score, own recall) and the groups' metrics in ``OUT/results.json`` (one row per data set, seed and
configuration), with the exact command.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(Path(__file__).resolve().parent)):  # the package, and sibling benchmark modules
    if _p not in sys.path:
        sys.path.insert(0, _p)

TEXTURES = ("brick", "grass", "gravel")
ELPV = ("elpv_mono", "elpv_poly")
#: (label, low, high): a width w (px) falls in the bin with low <= w < high.
WIDTH_BINS: tuple[tuple[str, float, float], ...] = (("1", 0.0, 1.5), ("2", 1.5, 2.5), ("3", 2.5, 3.5),
                                                    (">3", 3.5, float("inf")))
#: (label, low, high): a CNR c falls in the bin with low <= c < high.
CNR_BINS: tuple[tuple[str, float, float], ...] = (("<1", 0.0, 1.0), ("1-2", 1.0, 2.0), ("2-4", 2.0, 4.0),
                                                  (">4", 4.0, float("inf")))
_FORMAT = 1  # of the ELPV thin-defect folders: bump when their files change


def _bin(value: float, bins: Sequence[tuple[str, float, float]]) -> str:
    for label, lo, hi in bins:
        if lo <= value < hi:
            return label
    raise ValueError(f"{value!r} falls in none of the bins {[b[0] for b in bins]}")


def width_bin(width_px: float) -> str:
    """The :data:`WIDTH_BINS` label of a defect ``width_px`` wide: ``"1"``, ``"2"``, ``"3"`` or ``">3"``."""
    return _bin(float(width_px), WIDTH_BINS)


def cnr_bin(cnr: float) -> str:
    """The :data:`CNR_BINS` label of a contrast-to-noise ratio: ``"<1"``, ``"1-2"``, ``"2-4"`` or ``">4"``."""
    return _bin(float(cnr), CNR_BINS)


def normal_pixel_threshold(normal_maps: np.ndarray, fpr: float = 0.01) -> float:
    """The map value that a share ``fpr`` of the normal images' pixels exceed: their ``1 - fpr`` quantile.

    ``normal_maps``: ``(N, H, W)`` maps of defect-free images. A pixel is called defective where
    ``map > threshold`` (strictly, as :mod:`anomaly.metrics` does), so a constant map flags nothing.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    values = np.asarray(normal_maps, np.float64).ravel()
    if values.size == 0:
        raise ValueError("normal_pixel_threshold: no normal pixels; expected at least one normal image")
    return float(np.quantile(values, 1.0 - fpr))


def defect_recall(anomaly_map: np.ndarray, mask: np.ndarray, threshold: float) -> float:
    """Share of the pixels of ``mask`` (``(H, W)``, non-zero = defect) whose map value exceeds ``threshold``."""
    m = np.asarray(mask) > 0
    if not m.any():
        raise ValueError("defect_recall: empty mask")
    return float((np.asarray(anomaly_map)[m] > threshold).mean())


def _defect_values(d: dict[str, Any]) -> np.ndarray:
    """The map values on a defect's pixels: ``d["values"]`` (1-D) or ``d["map"][d["mask"] > 0]``."""
    if "values" in d:
        return np.asarray(d["values"], np.float64).ravel()
    return np.asarray(d["map"])[np.asarray(d["mask"]) > 0]


def defect_values(anomaly_map: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(P,)`` float32 values of ``anomaly_map`` on the ``P`` pixels of ``mask`` (both ``(H, W)``).

    What :func:`binned_metrics` needs of a defective image's map: a 1024 px map is 4 MB, the values
    on a thin defect's mask a few kB, so the benchmark keeps only these.
    """
    m = np.asarray(mask) > 0
    amap = np.asarray(anomaly_map)
    if amap.shape != m.shape:
        raise ValueError(f"defect_values: map {amap.shape} and mask {m.shape} differ; resize the map to the mask first")
    if not m.any():
        raise ValueError("defect_values: empty mask")
    return np.ascontiguousarray(amap[m], dtype=np.float32)


#: the groupings of :func:`binned_metrics`, in the order the tables show them
GROUPINGS = ("all", "kind", "width", "cnr", "width x cnr", "kind x width", "kind x cnr")


def _group_key(by: str, group: str) -> tuple:
    """Sort key of a group label: bins in their own order, kinds alphabetically."""
    widths, cnrs = [b[0] for b in WIDTH_BINS], [b[0] for b in CNR_BINS]

    def rank(names: list[str], g: str) -> int:
        return names.index(g) if g in names else len(names)

    if by == "width":
        return (rank(widths, group),)
    if by == "cnr":
        return (rank(cnrs, group),)
    if by == "width x cnr":  # "1 px, CNR <1"
        w, c = group.split(" px, CNR ")
        return (rank(widths, w), rank(cnrs, c))
    if by == "kind x width":  # "thin_crack, 1 px"
        k, w = group.rsplit(", ", 1)
        return (k, rank(widths, w.removesuffix(" px")))
    if by == "kind x cnr":  # "thin_crack, CNR <1"
        k, c = group.split(", CNR ")
        return (k, rank(cnrs, c))
    return (group,)


def binned_metrics(normal_scores: np.ndarray, normal_maps: np.ndarray, defects: Sequence[dict[str, Any]],
                   fpr: float = 0.01) -> dict[str, Any]:
    """Image AUROC and pixel recall at ``fpr`` of the normal pixels, per kind, width bin, CNR bin and cells.

    Args:
        normal_scores: ``(N,)`` image scores of the normal test images (higher = more anomalous).
        normal_maps: ``(N, H, W)`` their anomaly maps; they set the pixel threshold
            (:func:`normal_pixel_threshold`).
        defects: one dict per defective image with ``score`` (float), ``kind``, ``width_px``,
            ``cnr``, and either ``values`` (the map's values on the defect's pixels,
            :func:`defect_values`) or ``map`` and ``mask`` (``(H, W)`` each, the map at the mask's size).
        fpr: the normal-pixel false-positive rate that fixes the threshold.

    Returns:
        ``{"threshold", "fpr", "n_normal", "groups": [{"by", "group", "n", "image_auroc",
        "pixel_recall", "defect_recall"}, ...]}``; ``by`` is one of :data:`GROUPINGS` (``all``,
        ``kind``, ``width``, ``cnr``, ``width x cnr``, ``kind x width``, ``kind x cnr``);
        ``pixel_recall`` pools the group's defect pixels, ``defect_recall`` averages each defect's
        own share. Groups without images are left out.
    """
    from anomaly.metrics import image_metrics

    normal_scores = np.asarray(normal_scores, np.float64).ravel()
    if normal_scores.size == 0 or not len(defects):
        raise ValueError(f"binned_metrics: needs normal and defective images, got {normal_scores.size} and {len(defects)}")
    t = normal_pixel_threshold(normal_maps, fpr)
    values = [_defect_values(d) for d in defects]
    hits = np.array([int((v > t).sum()) for v in values])
    sizes = np.array([v.size for v in values])
    if (sizes == 0).any():
        raise ValueError(f"binned_metrics: {int((sizes == 0).sum())} defective image(s) with an empty mask")
    scores = np.array([float(d["score"]) for d in defects])
    keys = {
        "all": ["all"] * len(defects),
        "kind": [str(d["kind"]) for d in defects],
        "width": [width_bin(d["width_px"]) for d in defects],
        "cnr": [cnr_bin(d["cnr"]) for d in defects],
    }
    keys["width x cnr"] = [f"{w} px, CNR {c}" for w, c in zip(keys["width"], keys["cnr"])]
    keys["kind x width"] = [f"{k}, {w} px" for k, w in zip(keys["kind"], keys["width"])]
    keys["kind x cnr"] = [f"{k}, CNR {c}" for k, c in zip(keys["kind"], keys["cnr"])]
    groups = []
    for by in GROUPINGS:
        labels_arr = np.asarray(keys[by])
        for g in sorted(dict.fromkeys(keys[by]), key=lambda g: _group_key(by, g)):
            sel = labels_arr == g
            y = np.concatenate([np.zeros(normal_scores.size, int), np.ones(int(sel.sum()), int)])
            s = np.concatenate([normal_scores, scores[sel]])
            groups.append({"by": by, "group": g, "n": int(sel.sum()),
                           "image_auroc": float(image_metrics(y, s)["auroc"]),
                           "pixel_recall": float(hits[sel].sum() / sizes[sel].sum()),
                           "defect_recall": float((hits[sel] / sizes[sel]).mean())})
    return {"threshold": t, "fpr": float(fpr), "n_normal": int(normal_scores.size), "groups": groups}


def markdown(report: dict[str, Any], title: str) -> str:
    """Tables of :func:`binned_metrics`' groups: one per grouping, and width x CNR as a grid."""
    fpr = report["fpr"]
    lines = [f"### {title}", "",
             f"{report['n_normal']} normal test images; pixel threshold {report['threshold']:.4g} "
             f"(the {100 * (1 - fpr):g}th percentile of the normal images' map values, {100 * fpr:g} % normal-pixel FPR).", ""]
    groups = report["groups"]
    for by, head in (("all", "all defects"), ("kind", "kind"), ("width", "width (px)"), ("cnr", "CNR"),
                     ("kind x width", "kind, width bin"), ("kind x cnr", "kind, CNR bin")):
        rows = [g for g in groups if g["by"] == by]
        if not rows:
            continue
        lines += [f"| {head} | n | image AUROC | pixel recall @ {100 * fpr:g} % FPR | per-defect recall |",
                  "|---|---|---|---|---|"]
        lines += [f"| {g['group']} | {g['n']} | {g['image_auroc']:.3f} | {g['pixel_recall']:.3f} | {g['defect_recall']:.3f} |"
                  for g in rows]
        lines.append("")
    cells = {g["group"]: g for g in groups if g["by"] == "width x cnr"}
    if cells:
        lines += ["Width x CNR (image AUROC / pixel recall / n):", "",
                  "| width \\ CNR | " + " | ".join(b[0] for b in CNR_BINS) + " |",
                  "|---|" + "---|" * len(CNR_BINS)]
        for w, _, _ in WIDTH_BINS:
            row = []
            for c, _, _ in CNR_BINS:
                g = cells.get(f"{w} px, CNR {c}")
                row.append("-" if g is None else f"{g['image_auroc']:.2f} / {g['pixel_recall']:.2f} / {g['n']}")
            lines.append(f"| {w} px | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ data sets

def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def elpv_thin_dataset(cache: Path, cell_type: str, seed: int = 0, kinds: Sequence[str] | None = None,
                      cnr_range: tuple[float, float] = (0.5, 8.0)) -> Path:
    """``cache/elpv_<type>_thin``: the ELPV split's ``train/good`` and ``test/good`` cells, and each
    normal test cell again with one faint evaluation defect (``test/<kind>``, ``ground_truth/<kind>``,
    kinds in turn). ``manifest.json`` records each defect (kind, width, CNR measured on the 8-bit
    file). Built in a temporary folder and renamed into place; reused when its parameters match."""
    import cv2

    from anomaly.data.elpv import prepare_elpv
    from anomaly.data.io import atomic_write
    from eval_defects import FAINT_EVAL_KINDS, EvalDefectGenerator, measured_cnr

    kinds = tuple(kinds or FAINT_EVAL_KINDS)
    src = prepare_elpv(cache, cell_type=cell_type, seed=seed)
    root = cache / f"elpv_{cell_type}_thin"
    params = {"format": _FORMAT, "cell_type": cell_type, "seed": seed, "kinds": list(kinds),
              "cnr_range": [float(x) for x in cnr_range],
              "split": json.loads((src / "split.json").read_text())["settings"]}
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("params") == params:
        return root
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{root.name}.", suffix=".tmp"))
    try:
        for sub in ("train/good", "test/good"):
            (tmp / sub).mkdir(parents=True)
            for f in sorted((src / sub).iterdir()):
                _link_or_copy(f, tmp / sub / f.name)
        gen = EvalDefectGenerator(kinds=kinds, cnr_range=cnr_range)
        rng = np.random.default_rng(np.random.SeedSequence([seed, ("mono", "poly", "all").index(cell_type)]))
        records: dict[str, dict] = {}
        for i, f in enumerate(sorted((src / "test/good").iterdir())):
            kind = kinds[i % len(kinds)]
            cell = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
            if cell is None:
                raise RuntimeError(f"{f}: unreadable ELPV cell")
            clean = cell.astype(np.float32)[None] / 255.0
            d = gen.generate(clean, rng, kind)
            written = np.clip(np.round(d.image[0] * 255.0), 0, 255).astype(np.uint8)
            rel = f"test/{kind}/{f.stem}.png"
            for path, img in ((tmp / rel, written), (tmp / f"ground_truth/{kind}/{f.stem}_mask.png",
                                                     (d.mask[0] > 0.5).astype(np.uint8) * 255)):
                path.parent.mkdir(parents=True, exist_ok=True)
                if not cv2.imwrite(str(path), img):
                    raise RuntimeError(f"{path}: could not write")
            records[rel] = {**d.record(), "source": f"test/good/{f.name}",
                            "cnr": round(measured_cnr(clean, written[None].astype(np.float32) / 255.0, d.mask), 4)}
        with atomic_write(tmp / "manifest.json", "w", encoding="utf-8") as fh:
            json.dump({"params": params, "crops": records}, fh, indent=1)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def prepare(name: str, cache: Path, texture_size: int, seed: int = 0, n_test: int = 60, gross: bool = False,
            hr_size: int = 1024, hr_train: int = 40, hr_test: int = 30) -> Path:
    """The category folder of data set ``name`` (see module docstring), built once under ``cache``.

    ``gross`` (textures only): the same training and normal test crops with the benchmark's usual
    gross defects (``eval_defects.EVAL_KINDS``: holes, cracks, foreign patches, spots) instead: a
    control that shows what the same model does find. ``hr_size``, ``hr_train``, ``hr_test``: the
    high-resolution sets' image side, training images, and normal test images (= defective test
    images per kind).
    """
    from eval_defects import EVAL_KINDS, FAINT_EVAL_KINDS
    from highres_data import HIGHRES, make_highres_dataset
    from texture_data import make_texture_dataset

    if name in TEXTURES:
        root = cache / f"{name}_{texture_size}_{'gross' if gross else 'thin'}_test{n_test}"
        return make_texture_dataset(root, name, image_size=texture_size, crop_size=texture_size, seed=seed,
                                    n_test_good=n_test, n_test_bad=2 * n_test,
                                    defect_kinds=EVAL_KINDS if gross else FAINT_EVAL_KINDS)
    if gross:
        raise ValueError(f"the gross-defect control is for the textures {TEXTURES}, not {name!r}")
    if name in ELPV:
        return elpv_thin_dataset(cache, name.split("_", 1)[1], seed=seed)
    if name in HIGHRES:
        root = cache / f"{name}_{hr_size}_n{hr_train}-{hr_test}_s{seed}"
        return make_highres_dataset(root, name, size=hr_size, n_train=hr_train, n_test_good=hr_test,
                                    n_per_kind=hr_test, seed=seed)
    raise ValueError(f"unknown dataset {name!r}; expected one of {TEXTURES + ELPV + HIGHRES}")


# ------------------------------------------------------------------------------------ configurations

#: named ``anomaly train`` options that ``--configs`` picks from
PRESETS: dict[str, tuple[str, ...]] = {
    "default": ("--model", "aae"),                                          # the product's defaults: 64 px, whole image
    "whole": ("--model", "aae", "--image-size", "128"),                     # the whole-image resize baseline
    "tiled": ("--model", "aae", "--image-size", "64", "--tile-scale", "1"),  # 64 px tiles at native pixels
    "tiled128": ("--model", "aae", "--image-size", "128", "--tile-scale", "1"),
}
#: options the benchmark sets itself for every configuration
_RESERVED = ("--data", "--out", "--seed", "--progress", "--no-tensorboard", "--resume")


def parse_configs(names: str | None, custom: Sequence[str] = ()) -> dict[str, list[str]]:
    """The configurations to compare: ``{name: anomaly train options}``.

    Args:
        names: comma list of :data:`PRESETS` names, or ``None``.
        custom: ``NAME=OPTIONS`` strings (options split as a shell would), e.g.
            ``"tiled05=--model aae --image-size 64 --tile-scale 0.5"``.

    Returns:
        Presets first, in the order named, then the custom ones. Neither given: ``{"aae":
        ["--model", "aae"]}``, the single default run this benchmark always made.

    Raises:
        ValueError: an unknown preset, a malformed or repeated name, or an option the benchmark
            sets itself (``--data``, ``--out``, ``--seed``, ``--progress``, ...).
    """
    configs: dict[str, list[str]] = {}
    for n in [x.strip() for x in (names or "").split(",") if x.strip()]:
        if n not in PRESETS:
            raise ValueError(f"unknown configuration {n!r}; expected one of {', '.join(PRESETS)} "
                             "(or --config NAME='anomaly train options')")
        if n in configs:
            raise ValueError(f"configuration {n!r} named twice")
        configs[n] = list(PRESETS[n])
    for spec in custom:
        name, sep, opts = spec.partition("=")
        name = name.strip()
        if not sep or not name or not all(ch.isalnum() or ch in "_.-" for ch in name):
            raise ValueError(f"--config {spec!r}: expected NAME=OPTIONS with NAME of letters, digits, '_', '.', '-'")
        if name in configs:
            raise ValueError(f"configuration {name!r} named twice")
        args = shlex.split(opts)
        reserved = [a for a in args if a.split("=", 1)[0] in _RESERVED]
        if reserved:
            raise ValueError(f"--config {name}: {', '.join(reserved)} is set by the benchmark for every configuration")
        configs[name] = args
    return configs or {"aae": ["--model", "aae"]}


# ------------------------------------------------------------------------------------ the product

_DONE = re.compile(r"done: (\d+) epochs, (\d+) steps in (\d+)s \(stopped by (\w+)\)")


def _anomaly(args: list[str], threads: int) -> tuple[float, float, str]:
    """Run ``anomaly ARGS`` (the installed command, in a child process); returns (CPU s, wall s, stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "anomaly", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"anomaly {shlex.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall, proc.stdout


def score(bundle: Path, root: Path, threads: int = 1) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score a category's test images through the runtime; maps judged at each image's native size.

    A map that is not at the image's size (a whole-image bundle's ``(S, S)``) is resized to it
    bilinearly; a tiled bundle's map at scale 1 already is. The runtime decodes and infers in the
    calling thread (``decode_workers=0``), so the time spent in it is the runtime's own work.

    Returns:
        ``(normal, defects)``: ``normal = {"scores": (N,), "maps": (N, H, W), "ms_per_image",
        "cpu_ms_per_image", "map_shape"}`` (wall and CPU time in the runtime per test image;
        ``map_shape``: the runtime's own map of the first image) and one dict per
        defective image (``path``, ``score``, ``map_max`` (its map's largest value), ``values``
        (:func:`defect_values`), plus its manifest record).
    """
    import cv2

    from anomaly.data.folder import discover
    from anomaly.deploy.runtime import Runtime

    records = json.loads((root / "manifest.json").read_text())["crops"]
    test = discover(root).test
    rt = Runtime(bundle, device="cpu", threads=threads, decode_workers=0)
    results = rt.score_paths([str(s.path) for s in test])
    normal_scores, normal_maps, defects = [], [], []
    busy = busy_cpu = 0.0
    map_shape = None
    for s in test:
        t0, c0 = time.perf_counter(), time.process_time()
        r = next(results)
        busy, busy_cpu = busy + time.perf_counter() - t0, busy_cpu + time.process_time() - c0
        if r.error:
            raise RuntimeError(f"{s.path}: the runtime failed: {r.error}")
        amap = np.asarray(r.anomaly_map, np.float32)
        map_shape = map_shape or list(amap.shape)
        if s.label == 0:
            h, w = r.original_size or cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED).shape[:2]
        else:
            mask = cv2.imread(str(s.mask), cv2.IMREAD_GRAYSCALE) > 127
            h, w = mask.shape
        if amap.shape != (h, w):
            amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
        if s.label == 0:
            normal_scores.append(float(r.score))
            normal_maps.append(amap)
            continue
        rel = Path(s.path).relative_to(root).as_posix()
        defects.append({"path": rel, "score": float(r.score), "map_max": float(amap.max()),
                        "values": defect_values(amap, mask), **records[rel]})
    n = max(1, len(test))
    return ({"scores": np.array(normal_scores), "maps": np.stack(normal_maps), "ms_per_image": round(1000.0 * busy / n, 2),
             "cpu_ms_per_image": round(1000.0 * busy_cpu / n, 2), "map_shape": map_shape}, defects)


#: a CPU budget's remainder below which no further training segment is started (s): a segment's
#: start (imports, decoding the training images) costs about 10 CPU s
MIN_SEGMENT_CPU_S = 20.0


def train_within_cpu(train_args: list[str], threads: int, cpu_minutes: float) -> tuple[float, float, str, list[str]]:
    """``anomaly train`` until its processes have used ``cpu_minutes`` of CPU (on a shared machine,
    a wall-clock budget gives a configuration whatever CPU the neighbours leave it).

    The trainer's own budget is wall-clock (``--max-minutes``): the first segment gets the whole
    CPU budget as wall minutes, which one thread cannot overspend; while the run stopped by time
    and more than :data:`MIN_SEGMENT_CPU_S` of the budget is left, it goes on with ``--resume
    --max-minutes REST``. Each segment ends after a whole batch, validated and checkpointed.

    Returns:
        ``(CPU s, wall s, the last segment's stdout, every segment's options)``.
    """
    budget = cpu_minutes * 60.0
    cpu = wall = 0.0
    segments: list[str] = []
    args = [*train_args, "--max-minutes", f"{budget / 60.0:.3f}"]
    while True:
        c, w, stdout = _anomaly(args, threads)
        cpu, wall = cpu + c, wall + w
        segments.append("anomaly " + shlex.join(args))
        done = _DONE.search(stdout)
        if done is None or done.group(4) != "time" or budget - cpu < MIN_SEGMENT_CPU_S:
            return cpu, wall, stdout, segments
        args = [*train_args, "--resume", "--max-minutes", f"{(budget - cpu) / 60.0:.3f}"]


def run_config(name: str, root: Path, out: Path, config: str, options: Sequence[str], epochs: int, seed: int,
               threads: int, fpr: float, max_minutes: float = 0.0, control: Path | None = None,
               cpu_minutes: float = 0.0) -> dict[str, Any]:
    """Train one configuration (``anomaly train`` with ``options``), export, score, bin.

    ``epochs`` and ``max_minutes`` (wall-clock, 0: none) are passed unless ``options`` sets them;
    ``cpu_minutes`` > 0 replaces ``max_minutes`` by a CPU budget (:func:`train_within_cpu`).
    Returns the JSON row of this data set and configuration (with ``control``: the same bundle
    also scored and binned on that category's test set).
    """
    tag = f"{name}__{config}__s{seed}"
    run_dir, bundle = out / "runs" / tag, out / "bundles" / tag
    train_args = ["train", "--data", str(root), *options, "--out", str(run_dir)]
    if "--epochs" not in options:
        train_args += ["--epochs", str(epochs)]
    train_args += ["--seed", str(seed), "--progress", "none", "--no-tensorboard"]
    for d in (run_dir, bundle):
        if d.exists():
            shutil.rmtree(d)
    if cpu_minutes > 0:
        if "--max-minutes" in options:
            raise ValueError(f"configuration {config}: --max-minutes in its options and a CPU budget; choose one")
        train_cpu, train_wall, stdout, segments = train_within_cpu(train_args, threads, cpu_minutes)
    else:
        if max_minutes > 0 and "--max-minutes" not in options:
            train_args += ["--max-minutes", f"{max_minutes:g}"]
        train_cpu, train_wall, stdout = _anomaly(train_args, threads)
        segments = ["anomaly " + shlex.join(train_args)]
    done = _DONE.search(stdout)
    export_args = ["export", str(run_dir), "--out", str(bundle)]
    export_cpu, export_wall, _ = _anomaly(export_args, threads)
    normal, defects = score(bundle, root, threads)
    report = binned_metrics(normal["scores"], normal["maps"], defects, fpr)
    map_max = map_max_aurocs(normal["maps"].max(axis=(1, 2)), defects)
    t = report["threshold"]
    images = [{k: v for k, v in d.items() if k != "values"} | {"recall": float((d["values"] > t).mean())}
              for d in defects]
    row = {"dataset": name, "config": config, "train_options": list(options), "root": str(root), "seed": seed,
           "epochs": epochs, "max_minutes": max_minutes, "threads": threads,
           "cpu_minutes": cpu_minutes, "commands": [*segments, "anomaly " + shlex.join(export_args)],
           "train_cpu_s": round(train_cpu, 1), "train_wall_s": round(train_wall, 1),
           "epochs_done": int(done.group(1)) if done else None, "steps_done": int(done.group(2)) if done else None,
           "stopped_by": done.group(4) if done else None,
           "export_cpu_s": round(export_cpu, 1), "export_wall_s": round(export_wall, 1),
           "scoring_ms_per_image": normal["ms_per_image"], "scoring_cpu_ms_per_image": normal["cpu_ms_per_image"],
           "map_shape": normal["map_shape"],
           "n_test": len(normal["scores"]) + len(defects), "report": report, "map_max_auroc": map_max,
           "images": images}
    if control is not None:
        c_normal, c_defects = score(bundle, control, threads)
        row["control_root"] = str(control)
        row["control_report"] = binned_metrics(c_normal["scores"], c_normal["maps"], c_defects, fpr)
    return row


def map_max_aurocs(normal_max: np.ndarray, defects: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Image AUROC, overall (``"all"``) and per kind, had the image score been the largest value
    of the map judged (``d["map_max"]``; ``normal_max`` ``(N,)`` of the normal images).

    A diagnostic, not what the bundle reports: it tells whether the map holds what the bundle's
    image score (a tiled bundle's: its largest tile score) leaves out.
    """
    from anomaly.metrics import image_metrics

    normal_max = np.asarray(normal_max, np.float64).ravel()
    out = {}
    for group in ["all", *sorted({str(d["kind"]) for d in defects})]:
        sel = [float(d["map_max"]) for d in defects if group == "all" or d["kind"] == group]
        y = np.concatenate([np.zeros(normal_max.size, int), np.ones(len(sel), int)])
        out[group] = float(image_metrics(y, np.concatenate([normal_max, sel]))["auroc"])
    return out


def map_max_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One line per group of :func:`map_max_aurocs`, a column per configuration ('' if a row lacks them)."""
    rows = [r for r in rows if r.get("map_max_auroc")]
    if not rows:
        return ""
    groups = list(rows[0]["map_max_auroc"])
    lines = ["Diagnostic: image AUROC had the image score been the map's largest value (not what the bundles "
             "report; for a tiled bundle, the stitched map's):", "",
             "| group | " + " | ".join(r["config"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(f"{r['map_max_auroc'].get(g, float('nan')):.3f}" for r in rows) + " |")
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ comparison

#: the groupings of the side-by-side table, in its order
COMPARE_GROUPINGS = ("all", "kind", "width", "cnr", "kind x width", "kind x cnr")


def _winner(values: dict[str, float], tie: float = 0.005) -> str:
    """``"name +margin"`` of the largest value over the runner-up, ``"tie"`` within ``tie``, ``"-"`` for one value."""
    ranked = sorted(((v, k) for k, v in values.items() if v == v), reverse=True)  # NaN dropped
    if len(ranked) < 2:
        return "-"
    margin = ranked[0][0] - ranked[1][0]
    return "tie" if margin < tie else f"{ranked[0][1]} +{margin:.3f}"


def compare_rows(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Side-by-side rows of several configurations' :func:`binned_metrics` reports on the same data.

    Args:
        reports: ``{configuration: report}``.

    Returns:
        One row per group of :data:`COMPARE_GROUPINGS` present in any report, in the first
        report's order (groups only others have follow): ``{"by", "group", "n", "image_auroc":
        {config: value or None}, "pixel_recall": {...}, "best_auroc", "best_recall"}``; ``best_*``
        name the winner and its margin over the runner-up (:func:`_winner`).
    """
    if not reports:
        raise ValueError("compare_rows: no reports")
    order: dict[tuple[str, str], int] = {}
    cells: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for config, report in reports.items():
        cells[config] = {}
        for g in report["groups"]:
            if g["by"] in COMPARE_GROUPINGS:
                key = (g["by"], g["group"])
                order.setdefault(key, len(order))
                cells[config][key] = g
    keys = sorted(order, key=lambda k: (COMPARE_GROUPINGS.index(k[0]), order[k]))
    rows = []
    for key in keys:
        present = {c: cells[c].get(key) for c in reports}
        auroc = {c: (None if g is None else g["image_auroc"]) for c, g in present.items()}
        recall = {c: (None if g is None else g["pixel_recall"]) for c, g in present.items()}
        ns = {g["n"] for g in present.values() if g is not None}
        rows.append({"by": key[0], "group": key[1], "n": max(ns),
                     "image_auroc": auroc, "pixel_recall": recall,
                     "best_auroc": _winner({c: v for c, v in auroc.items() if v is not None}),
                     "best_recall": _winner({c: v for c, v in recall.items() if v is not None})})
    return rows


def compare_markdown(reports: dict[str, dict[str, Any]], title: str) -> str:
    """The side-by-side table of :func:`compare_rows`: per group, each configuration's image AUROC
    and pixel recall at the reports' normal-pixel FPR, and the winner of each by how much."""
    rows = compare_rows(reports)
    configs = list(reports)
    fpr = next(iter(reports.values()))["fpr"]
    head = " | ".join(f"{c} AUROC | {c} recall" for c in configs)
    lines = [f"### {title}", "",
             f"Image AUROC and pixel recall at {100 * fpr:g} % normal-pixel FPR; `best`: the winner and its "
             "margin over the runner-up (tie: < 0.005).", "",
             f"| group | n | {head} | best AUROC | best recall |",
             "|---|---|" + "---|---|" * len(configs) + "---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        label = {"all": "all defects", "width": f"width {r['group']} px", "cnr": f"CNR {r['group']}"}.get(r["by"], r["group"])
        vals = " | ".join(f"{fmt(r['image_auroc'][c])} | {fmt(r['pixel_recall'][c])}" for c in configs)
        lines.append(f"| {label} | {r['n']} | {vals} | {r['best_auroc']} | {r['best_recall']} |")
    lines.append("")
    return "\n".join(lines)


def cost_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One line per configuration: training budget used, export, and the runtime's scoring time per image."""
    lines = ["| config | train options | epochs, steps (stopped by) | segments | train CPU s | train wall s | "
             "export wall s | runtime map | scoring ms / image (wall) | scoring CPU ms / image |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = "x".join(str(v) for v in r["map_shape"]) if r.get("map_shape") else "-"
        segments = sum(1 for c in r["commands"] if c.startswith("anomaly train"))
        lines.append(f"| {r['config']} | `{shlex.join(r['train_options'])}` | {r['epochs_done']}, {r['steps_done']} "
                     f"({r['stopped_by']}) | {segments} | {r['train_cpu_s']} | {r['train_wall_s']} | "
                     f"{r['export_wall_s']} | {shape} | {r['scoring_ms_per_image']} | {r.get('scoring_cpu_ms_per_image', '-')} |")
    lines.append("")
    return "\n".join(lines)


def mean_report(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The group-wise mean of several seeds' reports of one configuration (groups present in all of
    them; ``n`` summed, ``threshold`` averaged): what the side-by-side table shows over seeds."""
    if not reports:
        raise ValueError("mean_report: no reports")
    keyed = [{(g["by"], g["group"]): g for g in r["groups"]} for r in reports]
    groups = []
    for g in reports[0]["groups"]:
        key = (g["by"], g["group"])
        if all(key in k for k in keyed):
            same = [k[key] for k in keyed]
            groups.append({"by": key[0], "group": key[1], "n": sum(x["n"] for x in same),
                           **{m: float(np.mean([x[m] for x in same])) for m in ("image_auroc", "pixel_recall", "defect_recall")}})
    return {"threshold": float(np.mean([r["threshold"] for r in reports])), "fpr": reports[0]["fpr"],
            "n_normal": sum(r["n_normal"] for r in reports), "groups": groups}


def _unique(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def side_by_side_section(rows: Sequence[dict[str, Any]]) -> str:
    """The side-by-side, cost and diagnostic tables of one data set and seed's configurations."""
    name, seed = rows[0]["dataset"], rows[0]["seed"]
    return ("\n" + compare_markdown({r["config"]: r["report"] for r in rows}, f"{name}, seed {seed}: side by side")
            + "\n" + cost_markdown(rows) + "\n" + map_max_markdown(rows))


def seed_means_section(rows: Sequence[dict[str, Any]], name: str) -> str:
    """Data set ``name``'s side-by-side table of the configurations' means over the seeds (those
    configurations every seed has); ``""`` with fewer than two seeds or configurations."""
    mine = [r for r in rows if r["dataset"] == name]
    seeds, configs = _unique([r["seed"] for r in mine]), _unique([r["config"] for r in mine])
    configs = [c for c in configs if {r["seed"] for r in mine if r["config"] == c} == set(seeds)]
    if len(seeds) < 2 or len(configs) < 2:
        return ""
    means = {c: mean_report([r["report"] for r in mine if r["config"] == c]) for c in configs}
    return "\n" + compare_markdown(means, f"{name}: side by side, mean of seeds {','.join(str(s) for s in seeds)}")


def summarize(rows: Sequence[dict[str, Any]]) -> str:
    """Every data set's side-by-side sections (per seed, then the seeds' mean) from result rows,
    e.g. those of several ``OUT/results.json`` files (``--from-results``)."""
    text = ""
    for name in _unique([r["dataset"] for r in rows]):
        for seed in _unique([r["seed"] for r in rows if r["dataset"] == name]):
            these = [r for r in rows if r["dataset"] == name and r["seed"] == seed]
            if len(these) > 1:
                text += side_by_side_section(these)
        text += seed_means_section(rows, name)
    return text


def header(argv: list[str]) -> str:
    return (f"Command:\n\n    python benchmarks/thin_defects.py {shlex.join(argv)}\n\n"
            f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} logical CPUs (shared), Python {platform.python_version()}; "
            f"date {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}\n")


def main(argv: list[str] | None = None) -> int:
    from highres_data import HIGHRES

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="brick,elpv_mono", help="comma list of " + ",".join(TEXTURES + ELPV + HIGHRES))
    p.add_argument("--configs", default=None, metavar="NAMES",
                   help=f"comma list of configurations to train and score on the same data: {', '.join(PRESETS)} "
                        "(default: one run of `anomaly train --model aae`)")
    p.add_argument("--config", action="append", default=[], metavar="NAME=OPTIONS",
                   help="a configuration of your own: NAME='anomaly train options' (repeatable)")
    p.add_argument("--epochs", type=int, default=40, help="`anomaly train --epochs` (everything else its default)")
    p.add_argument("--max-minutes", type=float, default=4.0,
                   help="`anomaly train --max-minutes` (wall clock) of every configuration (0: no limit; default 4)")
    p.add_argument("--cpu-minutes", type=float, default=0.0,
                   help="instead of --max-minutes: a CPU budget per configuration, spent in resumed training "
                        "segments (fair between configurations on a shared machine; 0: off)")
    p.add_argument("--seeds", "--seed", dest="seeds", default="0", help="comma list of seeds (data and training)")
    p.add_argument("--texture-size", type=int, default=128, help="side of the texture crops, native scale (px)")
    p.add_argument("--texture-test", type=int, default=60, metavar="N",
                   help="textures: N normal and 2N defective test crops")
    p.add_argument("--hr-size", type=int, default=1024,
                   help="high-resolution sets: side of the mosaics (px; 2048 works too); panels hold SIZE // 300 cells a side")
    p.add_argument("--hr-train", type=int, default=40, metavar="N", help="high-resolution sets: N training images")
    p.add_argument("--hr-test", type=int, default=30, metavar="N",
                   help="high-resolution sets: N normal test images, and N defective ones per kind")
    p.add_argument("--fpr", type=float, default=0.01, help="normal-pixel false-positive rate of the pixel threshold")
    p.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads of the child processes")
    p.add_argument("--cache", default=None, help="data set cache (default OUT/data)")
    p.add_argument("--out", default="bench_thin")
    p.add_argument("--control", action="store_true",
                   help="textures: also score the same bundle on the usual gross defects (same normal crops)")
    p.add_argument("--discard-models", action="store_true",
                   help="delete each run folder and bundle once it is scored (large with many configurations)")
    p.add_argument("--from-results", nargs="+", metavar="JSON", default=None,
                   help="train nothing: print the side-by-side tables (per seed and the seeds' mean) of the rows "
                        "of these results.json files")
    args = p.parse_args(argv)
    if args.from_results:
        rows = [row for f in args.from_results for row in json.loads(Path(f).read_text())["rows"]]
        print(summarize(rows), end="")
        return 0
    try:
        configs = parse_configs(args.configs, args.config)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as exc:
        p.error(str(exc))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out / "data"
    cache.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    text = header(argv)
    command = "python benchmarks/thin_defects.py " + shlex.join(argv)
    for name in args.datasets.split(","):
        for seed in seeds:
            root = prepare(name, cache, args.texture_size, seed, args.texture_test,
                           hr_size=args.hr_size, hr_train=args.hr_train, hr_test=args.hr_test)
            control = (prepare(name, cache, args.texture_size, seed, args.texture_test, gross=True)
                       if args.control and name in TEXTURES else None)
            these = []
            for config, options in configs.items():
                print(f"# {name}, seed {seed}: {config} (anomaly train {shlex.join(options)})", file=sys.stderr, flush=True)
                row = run_config(name, root, out, config, options, args.epochs, seed, args.threads, args.fpr,
                                 args.max_minutes, control, cpu_minutes=args.cpu_minutes)
                row["command"] = command
                rows.append(row)
                these.append(row)
                (out / "results.json").write_text(json.dumps({"argv": argv, "rows": rows}, indent=1))
                if args.discard_models:
                    for sub in ("runs", "bundles"):
                        shutil.rmtree(out / sub / f"{name}__{config}__s{seed}", ignore_errors=True)
                section = markdown(row["report"], f"{name}: {config}, seed {seed} (train {row['train_cpu_s']} CPU s, "
                                                  f"{row['train_wall_s']} wall s, {row['epochs_done']} epochs; "
                                                  f"scoring {row['scoring_ms_per_image']} ms/image)")
                section = "\n".join(["", *(f"    {c}" for c in row["commands"]), "", section])
                if "control_report" in row:
                    section += "\n" + markdown(row["control_report"], f"{name}, control: the same bundle on the gross "
                                                                      "defects (hole, crack, foreign, spot; width and CNR measured)")
                text += "\n" + section
                print(section, flush=True)
            if len(these) > 1:
                section = side_by_side_section(these)
                text += section
                print(section, flush=True)
        section = seed_means_section(rows, name)
        if section:
            text += section
            print(section, flush=True)
        (out / "results.md").write_text(text)
    (out / "results.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

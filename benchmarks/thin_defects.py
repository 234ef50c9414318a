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

Example (what ``benchmarks/results/2026-12-07-thin-faint-baseline.md`` holds)::

    python benchmarks/thin_defects.py --datasets brick --epochs 100 --texture-test 100 --control --out bench_thin
    python benchmarks/thin_defects.py --datasets elpv_mono --epochs 60 --out bench_thin_elpv

Output: markdown tables on stdout and ``OUT/results.md``, every image's record (kind, width, CNR,
score, own recall) and the groups' metrics in ``OUT/results.json``, with the exact command.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
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


def binned_metrics(normal_scores: np.ndarray, normal_maps: np.ndarray, defects: Sequence[dict[str, Any]],
                   fpr: float = 0.01) -> dict[str, Any]:
    """Image AUROC and pixel recall at ``fpr`` of the normal pixels, per kind, width bin, CNR bin and cells.

    Args:
        normal_scores: ``(N,)`` image scores of the normal test images (higher = more anomalous).
        normal_maps: ``(N, H, W)`` their anomaly maps; they set the pixel threshold
            (:func:`normal_pixel_threshold`).
        defects: one dict per defective image with ``score`` (float), ``map`` and ``mask``
            (``(H, W)``, any sizes), ``kind``, ``width_px`` and ``cnr``.
        fpr: the normal-pixel false-positive rate that fixes the threshold.

    Returns:
        ``{"threshold", "fpr", "n_normal", "groups": [{"by", "group", "n", "image_auroc",
        "pixel_recall", "defect_recall"}, ...]}``; ``by`` is ``all``, ``kind``, ``width``, ``cnr``,
        ``width x cnr`` or ``kind x cnr``; ``pixel_recall`` pools the group's defect pixels,
        ``defect_recall`` averages each defect's own share. Groups without images are left out.
    """
    from anomaly.metrics import image_metrics

    normal_scores = np.asarray(normal_scores, np.float64).ravel()
    if normal_scores.size == 0 or not len(defects):
        raise ValueError(f"binned_metrics: needs normal and defective images, got {normal_scores.size} and {len(defects)}")
    t = normal_pixel_threshold(normal_maps, fpr)
    hits = np.array([int((np.asarray(d["map"])[np.asarray(d["mask"]) > 0] > t).sum()) for d in defects])
    sizes = np.array([int((np.asarray(d["mask"]) > 0).sum()) for d in defects])
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
    keys["kind x cnr"] = [f"{k}, CNR {c}" for k, c in zip(keys["kind"], keys["cnr"])]
    order = {"width": [b[0] for b in WIDTH_BINS], "cnr": [b[0] for b in CNR_BINS]}
    groups = []
    for by, labels in keys.items():
        labels_arr = np.asarray(labels)
        present = list(dict.fromkeys(labels))
        if by in order:
            present = [g for g in order[by] if g in present]
        else:
            present = sorted(present, key=lambda g: (g.split(", CNR ")[0], _cnr_rank(g)))
        for g in present:
            sel = labels_arr == g
            y = np.concatenate([np.zeros(normal_scores.size, int), np.ones(int(sel.sum()), int)])
            s = np.concatenate([normal_scores, scores[sel]])
            groups.append({"by": by, "group": g, "n": int(sel.sum()),
                           "image_auroc": float(image_metrics(y, s)["auroc"]),
                           "pixel_recall": float(hits[sel].sum() / sizes[sel].sum()),
                           "defect_recall": float((hits[sel] / sizes[sel]).mean())})
    return {"threshold": t, "fpr": float(fpr), "n_normal": int(normal_scores.size), "groups": groups}


def _cnr_rank(group: str) -> int:
    """Sort key of a ``"..., CNR <bin>"`` label by the CNR bins' order."""
    label = group.split(", CNR ")[-1]
    names = [b[0] for b in CNR_BINS]
    return names.index(label) if label in names else len(names)


def markdown(report: dict[str, Any], title: str) -> str:
    """Tables of :func:`binned_metrics`' groups: one per grouping, and width x CNR as a grid."""
    fpr = report["fpr"]
    lines = [f"### {title}", "",
             f"{report['n_normal']} normal test images; pixel threshold {report['threshold']:.4g} "
             f"(the {100 * (1 - fpr):g}th percentile of the normal images' map values, {100 * fpr:g} % normal-pixel FPR).", ""]
    groups = report["groups"]
    for by, head in (("all", "all defects"), ("kind", "kind"), ("width", "width (px)"), ("cnr", "CNR"),
                     ("kind x cnr", "kind, CNR bin")):
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


def prepare(name: str, cache: Path, texture_size: int, seed: int = 0, n_test: int = 60, gross: bool = False) -> Path:
    """The category folder of data set ``name`` (see module docstring), built once under ``cache``.

    ``gross`` (textures only): the same training and normal test crops with the benchmark's usual
    gross defects (``eval_defects.EVAL_KINDS``: holes, cracks, foreign patches, spots) instead: a
    control that shows what the same model does find.
    """
    from eval_defects import EVAL_KINDS, FAINT_EVAL_KINDS
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
    raise ValueError(f"unknown dataset {name!r}; expected one of {TEXTURES + ELPV}")


# ------------------------------------------------------------------------------------ the product

def _anomaly(args: list[str], threads: int) -> tuple[float, float]:
    """Run ``anomaly ARGS`` (the installed command, in a child process); returns (CPU s, wall s)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "anomaly", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"anomaly {shlex.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def score(bundle: Path, root: Path, threads: int = 1) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score a category's test images through the runtime; maps resized to each image's native size.

    Returns ``(normal, defects)``: ``normal = {"scores": (N,), "maps": (N, H, W)}`` and one dict per
    defective image (``path``, ``score``, ``map``, ``mask``, plus its manifest record).
    """
    import cv2

    from anomaly.data.folder import discover
    from anomaly.deploy.runtime import Runtime

    records = json.loads((root / "manifest.json").read_text())["crops"]
    test = discover(root).test
    rt = Runtime(bundle, device="cpu", threads=threads, decode_workers=1)
    results = list(rt.score_paths([str(s.path) for s in test]))
    bad = [r for r in results if r.error]
    if bad:
        raise RuntimeError(f"{len(bad)} test images failed: {bad[0].path}: {bad[0].error}")
    normal_scores, normal_maps, defects = [], [], []
    for s, r in zip(test, results):
        h, w = cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED).shape[:2]
        amap = cv2.resize(np.asarray(r.anomaly_map, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        if s.label == 0:
            normal_scores.append(float(r.score))
            normal_maps.append(amap)
            continue
        rel = Path(s.path).relative_to(root).as_posix()
        mask = cv2.imread(str(s.mask), cv2.IMREAD_GRAYSCALE) > 127
        defects.append({"path": rel, "score": float(r.score), "map": amap, "mask": mask, **records[rel]})
    return {"scores": np.array(normal_scores), "maps": np.stack(normal_maps)}, defects


def run_dataset(name: str, root: Path, out: Path, epochs: int, seed: int, threads: int, fpr: float,
                control: Path | None = None) -> dict[str, Any]:
    """Train with the default command, export, score, bin. Returns the JSON row of this data set
    (with ``control``: the same bundle also scored and binned on that category's test set)."""
    run_dir, bundle = out / "runs" / f"{name}__aae__s{seed}", out / "bundles" / f"{name}__aae__s{seed}"
    train_args = ["train", "--data", str(root), "--model", "aae", "--out", str(run_dir), "--epochs", str(epochs),
                  "--seed", str(seed), "--progress", "none", "--no-tensorboard"]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    train_cpu, train_wall = _anomaly(train_args, threads)
    export_args = ["export", str(run_dir), "--out", str(bundle)]
    export_cpu, _ = _anomaly(export_args, threads)
    normal, defects = score(bundle, root, threads)
    report = binned_metrics(normal["scores"], normal["maps"], defects, fpr)
    t = report["threshold"]
    images = [{k: v for k, v in d.items() if k not in ("map", "mask")} | {"recall": defect_recall(d["map"], d["mask"], t)}
              for d in defects]
    row = {"dataset": name, "root": str(root), "seed": seed, "epochs": epochs, "threads": threads,
           "commands": ["anomaly " + shlex.join(train_args), "anomaly " + shlex.join(export_args)],
           "train_cpu_s": round(train_cpu, 1), "train_wall_s": round(train_wall, 1), "export_cpu_s": round(export_cpu, 1),
           "report": report, "images": images}
    if control is not None:
        c_normal, c_defects = score(bundle, control, threads)
        row["control_root"] = str(control)
        row["control_report"] = binned_metrics(c_normal["scores"], c_normal["maps"], c_defects, fpr)
    return row


def header(argv: list[str]) -> str:
    return (f"Command:\n\n    python benchmarks/thin_defects.py {shlex.join(argv)}\n\n"
            f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} logical CPUs (shared), Python {platform.python_version()}; "
            f"date {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="brick,elpv_mono", help="comma list of " + ",".join(TEXTURES + ELPV))
    p.add_argument("--epochs", type=int, default=40, help="`anomaly train --epochs` (everything else its default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--texture-size", type=int, default=128, help="side of the texture crops, native scale (px)")
    p.add_argument("--texture-test", type=int, default=60, metavar="N",
                   help="textures: N normal and 2N defective test crops")
    p.add_argument("--fpr", type=float, default=0.01, help="normal-pixel false-positive rate of the pixel threshold")
    p.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads of the child processes")
    p.add_argument("--cache", default=None, help="data set cache (default OUT/data)")
    p.add_argument("--out", default="bench_thin")
    p.add_argument("--control", action="store_true",
                   help="textures: also score the same bundle on the usual gross defects (same normal crops)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out / "data"
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    text = header(argv)
    for name in args.datasets.split(","):
        root = prepare(name, cache, args.texture_size, args.seed, args.texture_test)
        print(f"# {name}: training (anomaly train --model aae, {args.epochs} epochs)", file=sys.stderr, flush=True)
        control = (prepare(name, cache, args.texture_size, args.seed, args.texture_test, gross=True)
                   if args.control and name in TEXTURES else None)
        row = run_dataset(name, root, out, args.epochs, args.seed, args.threads, args.fpr, control)
        row["command"] = "python benchmarks/thin_defects.py " + shlex.join(argv)
        rows.append(row)
        (out / "results.json").write_text(json.dumps({"argv": argv, "rows": rows}, indent=1))
        section = markdown(row["report"], f"{name}: aae, {args.epochs} epochs, seed {args.seed} "
                                          f"(train {row['train_cpu_s']} CPU s, {row['train_wall_s']} wall s)")
        section = "\n".join(["", *(f"    {c}" for c in row["commands"]), "", section])
        if "control_report" in row:
            section += "\n" + markdown(row["control_report"], f"{name}, control: the same bundle on the gross defects "
                                                              "(hole, crack, foreign, spot; width and CNR measured)")
        text += "\n" + section
        print(section, flush=True)
    (out / "results.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Quality benchmark: train -> export (ONNX) -> score through the deployed runtime -> metrics.

For every dataset x config x seed this script trains a reconstructor with
:func:`anomaly.training.run.train`, exports it with :func:`anomaly.deploy.export.export_run` (optionally several
times with different scoring settings: re-exporting is cheap, no retraining), scores the held-out
test split with :class:`anomaly.deploy.runtime.Runtime` (the path a line PC runs) and reports

* image AUROC / AP / F1-max (every dataset),
* pixel AUROC / AUPRO at model resolution (datasets with masks: the synthetic textures), overall
  and per defect kind (normal test images against one kind at a time: ``per_kind`` in the JSON rows),
* train CPU seconds (``time.process_time`` of this process) and wall seconds.

Every trial is recorded, not only the winner. Output: a markdown table on stdout and
``OUT/results.md`` + ``OUT/results.json`` with the exact command line, machine and date.

Example (what ``benchmarks/results/2026-11-21-quality-first-trials.md`` holds)::

    python benchmarks/quality.py --datasets elpv_mono,elpv_poly --configs ae,aae,aae_repair \\
        --epochs 15 --image-size 64 --out bench_out

Datasets: ``elpv_mono``, ``elpv_poly`` (real EL solar-cell images, :func:`anomaly.data.elpv.prepare_elpv`;
train = functional cells of ``train/good``, test = ``test/good`` vs ``test/defective``),
``elpv_types`` (the same two splits as the two categories ``mono`` and ``poly`` of one folder: one
model for both cell types; a conditional model such as ``cond_aae`` receives the type as its label,
others pool the cells; each type is scored on its own and reported as ``elpv_types/mono`` and
``elpv_types/poly``, directly comparable with the single-type rows) and
``brick``, ``grass``, ``gravel`` and the colour ``ihc`` (``texture_data.make_texture_dataset``,
masks from the evaluation defect generator, which differs from the training ``DefectSynthesizer``;
``ihc`` adds ``discolour`` defects that keep the luma, so ``--channels 1`` against ``--channels 3``
measures what reading colour is worth). Textures are
cut at ``--image-size`` at the photograph's scale unless ``--crop-size`` says otherwise: the
defects are drawn as a fraction of the image, so the crop size sets how large they are against the
texture's grain, and comparing two image sizes fairly means holding the crop size fixed.

Configs are the presets of :mod:`anomaly.training.presets` (``--list-configs``); a config may carry
several *scorings* (exports of the same run), each reported as its own row ``config/scoring``.
``--tta flips`` exports them with flip test-time augmentation (``anomaly export --tta flips``), and
``--tta both`` exports each scoring both ways (rows ``<scoring>`` and ``<scoring>+tta``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(Path(__file__).resolve().parent)):  # the package, and sibling benchmark modules
    if _p not in sys.path:
        sys.path.insert(0, _p)

TEXTURES = ("brick", "grass", "gravel", "ihc")  # ihc: the colour texture (anomaly.data.textures.COLOUR_TEXTURES)
ELPV = ("elpv_mono", "elpv_poly")
ELPV_TYPES = "elpv_types"  # both cell types as the categories of one folder


def prepare_dataset(name: str, cache: Path, image_size: int, seed: int = 0, crop_size: int | None = None,
                    texture_test: int = 40) -> Path:
    """The MVTec-style folder of dataset ``name`` under ``cache`` (created once, then reused).

    Textures are cut as ``crop_size`` squares at the photograph's own scale and resized to
    ``image_size`` (default: cut at ``image_size``, no resizing). Their defects are drawn as a
    fraction of the written image's side, so the crop size sets how large a defect is against the
    texture's grain; ``image_size`` alone sets the model's resolution. ``texture_test`` normal and
    as many defective test crops are written; the test images are drawn from their own random
    streams, so a larger set begins with the default 40 and the training crops never change.

    Raises:
        ValueError: unknown dataset, or ``crop_size`` / ``texture_test`` for an ELPV dataset (whole
            cells, never cropped; its test split is the data set's own).
    """
    if texture_test < 1:
        raise ValueError(f"--texture-test must be >= 1, got {texture_test}")
    if name == ELPV_TYPES:
        if crop_size is not None or texture_test != 40:
            raise ValueError(f"--crop-size and --texture-test apply to the textures only; {name} images are whole solar cells")
        return _elpv_types(cache, seed)
    if name in ELPV:
        if crop_size is not None:
            raise ValueError(f"--crop-size applies to the textures only; {name} images are whole solar cells")
        if texture_test != 40:
            raise ValueError(f"--texture-test applies to the textures only; {name} tests on its own held-out cells")
        from anomaly.data.elpv import prepare_elpv

        return prepare_elpv(cache, cell_type=name.split("_", 1)[1], seed=seed)
    if name in TEXTURES:
        from texture_data import make_texture_dataset  # benchmarks/texture_data.py (evaluation defects)

        crop = int(crop_size or image_size)
        root = cache / (f"{name}_{image_size}" if crop == image_size else f"{name}_{image_size}_crop{crop}")
        if texture_test != 40:
            root = root.with_name(f"{root.name}_test{texture_test}")
        if not (root / "train" / "good").is_dir():
            make_texture_dataset(root, name, image_size=image_size, crop_size=crop, seed=seed,
                                 n_test_good=texture_test, n_test_bad=texture_test)
        return root
    raise ValueError(f"unknown dataset {name!r}; expected one of {ELPV + (ELPV_TYPES,) + TEXTURES}")


def _elpv_types(cache: Path, seed: int) -> Path:
    """``cache/elpv_types/{mono,poly}``: the single-type ELPV folders (same splits, same seed) as the
    categories of one folder, hard-linked (copied where links are impossible)."""
    import shutil

    from anomaly.data.elpv import prepare_elpv

    root = cache / ELPV_TYPES
    sources = {t: prepare_elpv(cache, cell_type=t, seed=seed) for t in ("mono", "poly")}
    for cell_type, src in sources.items():
        dest = root / cell_type
        if (dest / "split.json").is_file() and (dest / "split.json").read_bytes() == (src / "split.json").read_bytes():
            continue
        if dest.exists():
            shutil.rmtree(dest)
        tmp = root / f".{cell_type}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)

        def link(a: str, b: str) -> None:
            try:
                os.link(a, b)
            except OSError:
                shutil.copy2(a, b)

        shutil.copytree(src, tmp, copy_function=link)
        tmp.rename(dest)  # in place whole: an interrupted copy leaves only the temporary folder
    return root


def test_samples(root: Path, limit_per_class: int | None = None, seed: int = 0) -> list[Any]:
    """Test samples of an MVTec-style folder (optionally a class-balanced deterministic subset)."""
    from anomaly.data.folder import discover

    test = discover(root).test
    if limit_per_class:
        rng = np.random.default_rng(seed)
        out = []
        for label in (0, 1):
            items = [s for s in test if s.label == label]
            idx = sorted(rng.permutation(len(items))[:limit_per_class])
            out += [items[i] for i in idx]
        test = out
    return test


def _mask_at(path: Path | None, size: int) -> np.ndarray:
    import cv2

    if path is None:
        return np.zeros((size, size), np.uint8)
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    m = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST)
    return (m > 127).astype(np.uint8)


def evaluate_bundle(bundle: Path, samples: list[Any], threads: int = 1, category: int | None = None) -> dict[str, float]:
    """Score ``samples`` through the ONNX runtime; image (and pixel, when masks exist) metrics.
    ``category``: what a conditional bundle conditions on (ignored by other bundles)."""
    from anomaly.metrics import aupro, image_metrics, pixel_metrics
    from anomaly.deploy.runtime import Runtime

    rt = Runtime(bundle, device="cpu", threads=threads, decode_workers=1, category=category)
    t0 = time.perf_counter()
    results = list(rt.score_paths([str(s.path) for s in samples]))
    infer_s = time.perf_counter() - t0
    bad = [r for r in results if r.error]
    if bad:
        raise RuntimeError(f"{len(bad)} test images failed: {bad[0].path}: {bad[0].error}")
    labels = np.array([s.label for s in samples])
    scores = np.array([r.score for r in results], np.float64)
    m = image_metrics(labels, scores)
    out = {"image_auroc": m["auroc"], "image_ap": m["ap"], "image_f1_max": m["f1_max"],
           "n_test_good": int((labels == 0).sum()), "n_test_bad": int((labels == 1).sum()),
           "infer_ms_per_image": 1000 * infer_s / len(samples)}
    if any(s.mask is not None for s in samples):
        size = results[0].anomaly_map.shape[0]
        masks = np.stack([_mask_at(s.mask, size) for s in samples])
        maps = np.stack([r.anomaly_map for r in results]).astype(np.float32)
        out.update(pixel_metrics(masks, maps))
        out["aupro"] = aupro(masks, maps)
        kinds = [s.defect_type for s in samples]
        if len({k for k, y in zip(kinds, labels) if y == 1}) > 1:
            out["per_kind"] = per_kind_metrics(labels, scores, masks, maps, kinds)
    return out


def per_kind_metrics(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray,
                     kinds: Sequence[str]) -> dict[str, dict[str, float]]:
    """Image AUROC, pixel AUROC and AUPRO of the normal images (``labels == 0``) against each
    defect kind alone: which kinds a model misses.

    Args:
        labels, scores: ``(N,)``; masks, maps: ``(N, H, W)``; kinds: the defect kind of each image.

    Returns:
        ``{kind: {"image_auroc", "pixel_auroc", "aupro"}}`` for every kind of an anomalous image.
    """
    from anomaly.metrics import aupro, image_metrics, pixel_metrics

    kinds_arr = np.asarray(kinds)
    good = np.asarray(labels) == 0
    out: dict[str, dict[str, float]] = {}
    for kind in sorted({str(k) for k in kinds_arr[~good]}):
        sel = good | ((kinds_arr == kind) & ~good)
        out[kind] = {"image_auroc": image_metrics(labels[sel], scores[sel])["auroc"],
                     "pixel_auroc": pixel_metrics(masks[sel], maps[sel])["pixel_auroc"],
                     "aupro": aupro(masks[sel], maps[sel])}
    return out


def run_trial(dataset: str, root: Path, config_name: str, seed: int, epochs: int, image_size: int,
              out: Path, threads: int, test_limit: int | None, train_limit: int | None,
              defect_sources: str | None = None, tta: Sequence[str] = ("none",),
              channels: int | None = None) -> list[dict[str, Any]]:
    """Train one config once; export + evaluate each of its scorings, once per test-time
    augmentation in ``tta``. ``channels`` forces the model's colour mode (None: detect from the
    data, as ``anomaly train`` does). Returns one row per scoring and augmentation."""
    import torch

    from anomaly.training.presets import get_preset
    from anomaly.training.run import train

    torch.set_num_threads(threads)
    preset = get_preset(config_name)
    run_dir = out / "runs" / f"{dataset}__{config_name}__s{seed}"
    data_root = root
    if train_limit:
        data_root = subset_train(root, out / "subsets" / f"{dataset}_n{train_limit}_s{seed}", train_limit, seed)
    extra: dict[str, Any] = {"defect_sources": defect_sources} if defect_sources and preset.synthetic_defects > 0 else {}
    if channels is not None:
        extra["channels"] = channels
        run_dir = run_dir.with_name(f"{run_dir.name}__c{channels}")
    cfg = preset.train_config(data=str(data_root), out=str(run_dir), epochs=epochs, image_size=image_size, seed=seed,
                              **extra)
    c0, w0 = time.process_time(), time.perf_counter()
    res = train(cfg)
    train_cpu, train_wall = time.process_time() - c0, time.perf_counter() - w0
    common = {"dataset": dataset, "config": config_name, "seed": seed, "model": cfg.model, "epochs": cfg.epochs,
              "image_size": image_size, "channels": cfg.channels, "synthetic_defects": cfg.synthetic_defects,
              "defect_sources": cfg.defect_sources, "train_cpu_s": round(train_cpu, 1),
              "train_wall_s": round(train_wall, 1), "best_epoch": getattr(res, "best_epoch", None)}
    return [{**common, **row} for row in evaluate_run(run_dir, dataset, config_name, seed, test_samples(root, test_limit, seed),
                                                      out, threads, tta, channels)]


def evaluate_run(run_dir: Path, dataset: str, config_name: str, seed: int, samples: list[Any], out: Path,
                 threads: int, tta: Sequence[str] = ("none",), channels: int | None = None,
                 only: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Export a trained run with each scoring of its preset (those named in ``only``, when given;
    and each test-time augmentation in ``tta``; ``flips`` rows are named ``<scoring>+tta``) into
    ``out/bundles`` and evaluate each bundle on ``samples``. Returns the metric rows."""
    from anomaly.training.presets import get_preset
    from anomaly.deploy.export import export_run

    cfg_scoring = json.loads((run_dir / "config.json").read_text())["scoring"]  # what `anomaly train` wrote
    # several categories (elpv_types): each scored on its own, as the dataset "<dataset>/<category>"
    names = json.loads((run_dir / "split.json").read_text()).get("categories") or []
    groups = ({None: samples} if len(names) < 2 else
              {k: [s for s in samples if s.category == k] for k in range(len(names))})
    rows = []
    for scoring_name, (scoring, normalize) in get_preset(config_name).scorings.items():
        if only is not None and scoring_name not in only:
            continue
        for mode in tta:
            name = scoring_name + ("+tta" if mode == "flips" else "")
            bundle = out / "bundles" / f"{dataset}__{config_name}__{name}__s{seed}{'' if channels is None else f'__c{channels}'}"
            c1 = time.process_time()
            # a row's latent score is what its preset names ("none" unless it says otherwise)
            export_run(run_dir, bundle, scoring={"latent": "none", **scoring}, normalize=normalize, tta=mode)
            export_cpu = time.process_time() - c1
            for k, group in groups.items():  # each row: the export plus its own category's scoring
                c2 = time.process_time()
                metrics = evaluate_bundle(bundle, group, threads, category=k)
                per = {} if k is None else {"dataset": f"{dataset}/{names[k]}", "category": names[k]}
                rows.append({"scoring": name, "tta": mode, "eval_cpu_s": round(export_cpu + time.process_time() - c2, 1),
                             "scoring_settings": {**cfg_scoring, "latent": "none", **scoring}, "normalize": normalize,
                             **per, **metrics})
    return rows


def subset_train(root: Path, dest: Path, n: int, seed: int) -> Path:
    """A copy of ``root`` whose train/good holds ``n`` images (deterministic); test is symlinked."""
    import shutil

    if (dest / "train" / "good").is_dir():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    files = sorted((root / "train" / "good").iterdir())
    pick = sorted(np.random.default_rng(seed).permutation(len(files))[:n])
    (tmp / "train" / "good").mkdir(parents=True)
    for i in pick:
        shutil.copyfile(files[i], tmp / "train" / "good" / files[i].name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)
    return dest


COLUMNS = [("dataset", "dataset"), ("config", "config"), ("scoring", "scoring"), ("seed", "seed"), ("channels", "C"),
           ("epochs", "ep"), ("image_auroc", "img AUROC"), ("image_ap", "img AP"), ("image_f1_max", "F1-max"),
           ("pixel_auroc", "px AUROC"), ("aupro", "AUPRO"), ("train_cpu_s", "train CPU s"),
           ("train_wall_s", "train wall s")]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) and k not in ("train_cpu_s", "train_wall_s") else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    kinds = [r for r in rows if r.get("per_kind")]
    if kinds:  # normal test images against one defect kind at a time
        lines += ["", "Per defect kind (pixel AUROC / AUPRO / image AUROC):", "",
                  "| dataset | config | scoring | seed | C | " + " | ".join(sorted(kinds[0]["per_kind"])) + " |",
                  "|---|---|---|---|---|" + "---|" * len(kinds[0]["per_kind"])]
        for r in kinds:
            pk = r["per_kind"]
            lines.append(f"| {r['dataset']} | {r['config']} | {r['scoring']} | {r['seed']} | {r.get('channels', '')} | " + " | ".join(
                f"{pk[k]['pixel_auroc']:.3f} / {pk[k]['aupro']:.3f} / {pk[k]['image_auroc']:.3f}" for k in sorted(pk)) + " |")
    return "\n".join(lines)


def header(argv: list[str], rows: list[dict[str, Any]] = ()) -> str:
    cmds = [f"python benchmarks/quality.py {shlex.join(argv)}"]
    cmds += [c for c in dict.fromkeys(r.get("command") for r in rows) if c and c not in cmds]
    return ("Command(s) (a resumed run keeps earlier trials):\n\n" + "".join(f"    {c}\n" for c in cmds) + "\n"
            f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} logical CPUs (shared), Python {platform.python_version()}; "
            f"date {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="elpv_mono,elpv_poly", help="comma list of " + ",".join(ELPV + (ELPV_TYPES,) + TEXTURES))
    p.add_argument("--configs", default="ae,aae,aae_repair", help="comma list of anomaly.training.presets presets")
    p.add_argument("--seeds", default="0", help="comma list of seeds")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--crop-size", type=int, default=None,
                   help="textures: cut squares of this side at the photograph's scale, then resize them to "
                        "--image-size (default: cut at --image-size)")
    p.add_argument("--texture-test", type=int, default=40, metavar="N",
                   help="normal and defective test crops per texture (default 40 each; a larger set starts "
                        "with the same 40 and trains on the same crops)")
    p.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads")
    p.add_argument("--train-limit", type=int, default=None, help="use only N training images (subset)")
    p.add_argument("--test-limit", type=int, default=None, help="at most N test images per class")
    p.add_argument("--cache", default=None, help="dataset cache folder (default OUT/data)")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--defect-sources", default=None, metavar="DIR|skimage",
                   help="fill the synthetic defects of repair presets from this image folder (DRAEM's DTD); "
                        "'skimage': scikit-image's photographs, none of the evaluated textures (written to the cache)")
    p.add_argument("--tta", default="none", choices=("none", "flips", "both"),
                   help="test-time augmentation of the exported bundles (`anomaly export --tta`): flips, or both "
                        "(each scoring exported without and with it; the flipped rows are named <scoring>+tta)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="force the models' colour mode: 1 = grayscale (RGB read as luma), 3 = RGB "
                        "(default: detect from the data, as `anomaly train` does)")
    p.add_argument("--list-configs", action="store_true")
    args = p.parse_args(argv)

    from anomaly.training.presets import PRESETS

    if args.list_configs:
        for name, preset in PRESETS.items():
            print(f"{name:18s} {preset.description}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out / "data"
    rows: list[dict[str, Any]] = []
    json_path = out / "results.json"
    if json_path.is_file():  # resume: keep finished trials
        rows = json.loads(json_path.read_text()).get("rows", [])
    done = {(r.get("trial_dataset", r["dataset"]), r["config"], r["seed"], r.get("channels_arg")) for r in rows}
    sources = args.defect_sources
    if sources == "skimage" and "ihc" in args.datasets.split(","):
        p.error("--defect-sources skimage includes scikit-image's immunohistochemistry photograph, the ihc texture "
                "itself; give a folder of other images")
    if sources == "skimage":
        from anomaly.data.textures import write_defect_sources

        sources = str(write_defect_sources(cache / "defect_sources_skimage"))
    for dataset in args.datasets.split(","):
        root = prepare_dataset(dataset, cache, args.image_size, crop_size=args.crop_size,
                               texture_test=args.texture_test)
        for config in args.configs.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                if (dataset, config, seed, args.channels) in done:
                    continue
                print(f"# {dataset} / {config} / seed {seed}", file=sys.stderr, flush=True)
                try:
                    new = run_trial(dataset, root, config, seed, args.epochs, args.image_size, out, args.threads,
                                    args.test_limit, args.train_limit, sources,
                                    ("none", "flips") if args.tta == "both" else (args.tta,), args.channels)
                except Exception as exc:  # record the failure, carry on
                    new = [{"dataset": dataset, "config": config, "scoring": "-", "seed": seed,
                            "error": f"{type(exc).__name__}: {exc}"}]
                for r in new:
                    r["trial_dataset"] = dataset
                    r["command"] = "python benchmarks/quality.py " + shlex.join(argv)
                    r["channels_arg"] = args.channels
                    if dataset in TEXTURES:
                        r["crop_size"] = args.crop_size or args.image_size
                        r["texture_test"] = args.texture_test
                rows += new
                for r in new:
                    print(json.dumps({k: v for k, v in r.items() if k != "scoring_settings"}), flush=True)
                json_path.write_text(json.dumps({"argv": argv, "rows": rows}, indent=1))
    text = header(argv, rows) + "\n" + markdown_table(rows) + "\n"
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

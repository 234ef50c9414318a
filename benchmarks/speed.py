"""Speed benchmark: the default reconstructor (AAE) at 128² and 256², torch eager vs onnxruntime.

For each size it trains the default model briefly (or reuses the run already in ``--work``),
exports it, writes the int8 and fp16 variants, and prints the ``anomaly bench`` table: images/s
and per-call latency p50/p99 at batch 1 and batch N for torch eager, onnxruntime fp32 / int8
(and fp16 / CUDA where a GPU is there), then the end-to-end audit rate (decode -> score ->
results.csv + heatmap JPEGs; and without image files) as a fraction of pure fp32 inference. A second table gives the
accuracy cost of int8 (and fp16): image AUROC on the test split and the score agreement with
float32.

Data: the ELPV solar cells when ``elpv-dataset`` is installed (300x300 grayscale, the product's
default data), else generated textures. Training is short on purpose: speed does not depend on
how well the model is trained (accuracy deltas do, a little).

The header names the machine (CPU model, cores, library versions, date) and the command.

Usage::

    python benchmarks/speed.py                      # 128 and 256, ~1.5 min training each
    python benchmarks/speed.py --sizes 128 --train-minutes 4 --iterations 30
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
# Before torch loads OpenMP: idle threads sleep rather than spin (fair to torch on shared cores;
# see anomaly.deploy.bench). Export OMP_WAIT_POLICY=ACTIVE to time torch's default instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("benchmarks.speed")


def machine() -> list[str]:
    """Lines describing this machine and the library versions."""
    from anomaly.deploy.runtime import available_devices, physical_cores

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    vers = []
    for pkg in ("onnxruntime", "onnxruntime-gpu", "torch", "numpy", "opencv-python-headless"):
        try:
            vers.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return [
        f"machine: {cpu}, {logical} logical CPUs / {physical_cores()} physical cores available; "
        f"onnxruntime devices: {', '.join(available_devices())}",
        f"software: Python {platform.python_version()}, {', '.join(vers)}",
        f"date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}",
    ]


def dataset(work: Path, data: str | None) -> tuple[Path, str]:
    """The category folder to train and test on, and its description."""
    if data:
        return Path(data), data
    try:
        from anomaly.data.elpv import prepare_elpv

        return prepare_elpv(work / "data", cell_type="mono", seed=0), "ELPV mono solar cells (300x300 gray)"
    except ModuleNotFoundError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_mvtec

        root = work / "data" / "textures"
        if not (root / "train").is_dir():
            make_mvtec(root, n_train=200, n_good=64, n_bad=64, size=300)
        return root, "generated textures (300x300 gray)"


def prepare(work: Path, data: Path, size: int, minutes: float, calib: Path,
            variants: Sequence[str] = ("int8", "fp16")) -> Path:
    """Train (or reuse) the default AAE at ``size``, export it with its ``variants`` (int8, fp16)."""
    from anomaly.deploy.export import export_run
    from anomaly.deploy.quantize import convert_fp16, quantize_int8
    from anomaly.training.config import TrainConfig
    from anomaly.training.run import train

    run, bundle = work / f"run_{size}", work / f"bundle_{size}"
    if not (run / "checkpoints" / "best.pt").is_file():
        log.warning("training the default aae at %d for up to %.1f min", size, minutes)
        train(TrainConfig(data=str(data), out=str(run), model="aae", image_size=size, epochs=1000,
                          max_minutes=minutes, seed=0))
    if not (bundle / "model.json").is_file():
        export_run(run, bundle)
    if "int8" in variants and not (work / f"bundle_{size}_int8" / "model.json").is_file():
        quantize_int8(bundle, work / f"bundle_{size}_int8", calib)
    if "fp16" in variants and not (work / f"bundle_{size}_fp16" / "model.json").is_file():
        convert_fp16(bundle, work / f"bundle_{size}_fp16")
    return bundle


def accuracy(bundles: dict[str, Path], data: Path, gpus: Sequence[str] = ()) -> list[str]:
    """Image AUROC on the test split per precision, and score agreement with float32 on the CPU.

    Every precision is scored on the CPU provider; on each device in ``gpus`` the fp32 and fp16
    bundles are scored again (``fp16/cuda``): what a GPU line would decide.
    """
    from sklearn.metrics import roc_auc_score

    from anomaly.data.folder import discover
    from anomaly.deploy.runtime import Runtime

    test = discover(data).test
    paths = [str(s.path) for s in test]
    labels = np.array([int(s.label) for s in test])
    runs = [(name, b, "cpu") for name, b in bundles.items()]
    runs += [(f"{name}/{dev}", bundles[name], dev) for dev in gpus for name in ("fp32", "fp16") if name in bundles]
    scores, failed = {}, []
    for name, b, dev in runs:
        try:
            scores[name] = np.array([r.score for r in Runtime(b, device=dev).score_paths(paths, batch_size=16)])
        except RuntimeError as exc:  # a GPU provider that cannot start: say so, keep the CPU rows
            failed.append(f"{name}: {str(exc).split(';')[0]}")
    ref = scores["fp32"]
    rank = lambda a: np.argsort(np.argsort(a))  # noqa: E731
    lines = [f"{'precision':<10} {'AUROC':>7} {'ΔAUROC':>8} {'Spearman':>9} {'max|Δscore|':>12} {'median rel Δ':>13}"]
    for name, s in scores.items():
        auc = roc_auc_score(labels, s) if len(set(labels)) == 2 else float("nan")
        d_auc = auc - roc_auc_score(labels, ref) if len(set(labels)) == 2 else float("nan")
        rho = float(np.corrcoef(rank(ref), rank(s))[0, 1])
        lines.append(f"{name:<10} {auc:7.4f} {d_auc:+8.4f} {rho:9.5f} {np.abs(s - ref).max():12.2e} "
                     f"{np.median(np.abs(s - ref) / np.abs(ref)):13.2e}")
    lines.append(f"({len(paths)} test images: {int((labels == 0).sum())} normal, {int((labels == 1).sum())} anomalous; "
                 "against fp32 on the CPU provider; a name without a device ran there too, fp16 included)")
    return lines + [f"not scored: {f}" for f in failed]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="benchmarks_out/speed", help="runs, bundles and data (reused when present)")
    ap.add_argument("--data", default=None, help="category folder (default: ELPV mono, else generated textures)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[128, 256], help="model sizes to time (none: skip)")
    ap.add_argument("--train-minutes", type=float, default=1.5, help="training budget per size (default 1.5)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--variants", nargs="*", choices=("int8", "fp16"), default=["int8", "fp16"],
                    help="precision variants to write and time beside fp32 (default: int8 fp16; a GPU machine "
                         "needs only fp16: int8 is timed on the CPU alone)")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto", help="auto (every installed provider), or e.g. cpu,cuda")
    ap.add_argument("--tf32", action="store_true", help="TF32 for float32 on CUDA (default off, as the runtime's)")
    ap.add_argument("--gpu-batch-sizes", type=int, nargs="*", default=[], metavar="N",
                    help="further batch sizes for the GPU rows only (e.g. 64 256)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    ap.add_argument("--audit-images", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=5, help="interleaved onnxruntime/torch window pairs for the ratio (default 5)")
    ap.add_argument("--audit-dir", default=None, help="where the audit rows write (default: the system's temp folder)")
    ap.add_argument("--no-accuracy", dest="accuracy", action="store_false")
    ap.add_argument("--accuracy-runs", nargs="*", default=[], metavar="RUN",
                    help="fully trained run folders: export each as fp32, int8 and fp16 and print the accuracy table "
                         "on its own data (the timed models above are trained only briefly)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from anomaly.deploy.bench import compare_with_torch, format_table, parse_devices, run_all

    gpus = [d for d in parse_devices(args.device) if d != "cpu"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data, described = dataset(work, args.data)
    calib = data / "train" / "good" if (data / "train" / "good").is_dir() else data
    test_dir = data / "test" if (data / "test").is_dir() else data
    print("\n".join(machine()))
    print(f"data: {described}; int8 calibrated on {calib}; timed inputs and audit: {test_dir}")
    for size in args.sizes:
        bundle = prepare(work, data, size, args.train_minutes, calib, args.variants)
        variants = [work / f"bundle_{size}_{v}" for v in args.variants]
        rows = run_all(bundle, batch_size=args.batch_size, iterations=args.iterations, warmup=args.warmup,
                       device=args.device, images=str(test_dir), threads=args.threads, audit_images=args.audit_images,
                       variants=variants, audit_dir=args.audit_dir, gpu_batch_sizes=args.gpu_batch_sizes,
                       tf32=args.tf32)
        print(f"\n== aae {size}x{size} (default settings; {args.iterations} timed calls after {args.warmup} warm-up; "
              "latency per call) ==")
        print(format_table(rows))
        torch_n = next((r for r in rows if r.engine == "torch eager" and r.device == "cpu" and r.batch == args.batch_size
                        and r.images_per_s), None)
        ort_n = next((r for r in rows if r.engine == "onnxruntime" and r.precision == "fp32" and r.device == "cpu"
                      and r.batch == args.batch_size and r.images_per_s), None)
        if torch_n and ort_n:
            print(f"onnxruntime fp32 / torch eager at batch {args.batch_size}, the rows above: "
                  f"{ort_n.images_per_s / torch_n.images_per_s:.2f}x")
            paired = compare_with_torch(bundle, batch_size=args.batch_size, images=str(test_dir), threads=args.threads,
                                        pairs=args.pairs)
            if paired is not None:
                print(f"onnxruntime fp32 / torch eager at batch {args.batch_size}, interleaved: {paired.describe()}")
        if args.accuracy:
            print()
            print("\n".join(accuracy({"fp32": bundle, **{v: work / f"bundle_{size}_{v}" for v in args.variants}},
                                     data, gpus)))
    for run in map(Path, args.accuracy_runs):
        print(f"\n== accuracy of int8 / fp16 against fp32: {run} ==")
        print("\n".join(accuracy(precision_variants(run, work / f"acc_{run.name}"), run_data(run), gpus)))
    return 0


def run_data(run: Path) -> Path:
    """The category folder a run was trained on (from its ``config.json``)."""
    import json

    return Path(json.loads((run / "config.json").read_text())["data"])


def precision_variants(run: Path, dest: Path) -> dict[str, Path]:
    """Export ``run`` (default scoring) as fp32, then int8 (calibrated on its training images) and fp16."""
    from anomaly.deploy.export import export_run
    from anomaly.deploy.quantize import convert_fp16, quantize_int8

    out = {"fp32": dest / "fp32", "int8": dest / "int8", "fp16": dest / "fp16"}
    if not (out["fp32"] / "model.json").is_file():
        export_run(run, out["fp32"])
    if not (out["int8"] / "model.json").is_file():
        quantize_int8(out["fp32"], out["int8"], run_data(run) / "train" / "good")
    if not (out["fp16"] / "model.json").is_file():
        convert_fp16(out["fp32"], out["fp16"])
    return out


if __name__ == "__main__":
    sys.exit(main())

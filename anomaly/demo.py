"""``anomaly demo``: the whole product on the built-in data, end to end.

Real solar-cell electroluminescence images (ELPV; functional cells normal, defective cells
anomalous) -> train an adversarial autoencoder on normal cells -> export to ONNX -> calibrate the
threshold on held-out normal cells -> audit a held-out test folder of normal and defective cells
with onnxruntime -> print image AUROC, the threshold, how many were flagged and where the
outputs are.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from anomaly.training.config import train_defaults

__all__ = ["add_parsers", "run_demo"]

#: the training defaults (TrainConfig's fields); the demo's own is its 5-minute budget
_D = train_defaults()


def add_parsers(sub: argparse._SubParsersAction) -> None:
    d = train_defaults()
    p = sub.add_parser("demo", help="train, export, calibrate and audit on the built-in solar-cell data",
                       description="Run the whole pipeline on real ELPV solar-cell images (needs the [demo] extra).")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--cell-type", default="mono", choices=("mono", "poly", "all"))
    p.add_argument("--model", default=d["model"], help="default %(default)s")
    p.add_argument("--image-size", type=int, default=d["image_size"], help="model input side (default %(default)s, as benchmarked)")
    p.add_argument("--epochs", type=int, default=d["epochs"], help="default %(default)s")
    p.add_argument("--max-minutes", type=float, default=5.0, help="training budget (default 5)")
    p.add_argument("--seed", type=int, default=d["seed"], help="default %(default)s")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    res = run_demo(Path(args.out), cell_type=args.cell_type, model=args.model, image_size=args.image_size,
                   epochs=args.epochs, max_minutes=args.max_minutes, seed=args.seed, verbose=True)
    width = max(len(k) for k in res["table"])
    print()
    print("anomaly demo — ELPV solar cells (" + args.cell_type + ")")
    for k, v in res["table"].items():
        print(f"  {k:<{width}}  {v}")
    return 0


def run_demo(out: Path, *, cell_type: str = "mono", model: str = _D["model"], image_size: int = _D["image_size"],
             epochs: int = _D["epochs"], max_minutes: float | None = 5.0, seed: int = _D["seed"],
             verbose: bool = False) -> dict:
    """Run the pipeline; returns ``{"auroc": ..., "table": {...}}`` (table rows as strings)."""
    import numpy as np

    from anomaly.metrics import image_metrics
    from anomaly.data.elpv import prepare_elpv
    from anomaly.deploy.audit import run_audit
    from anomaly.deploy.calibrate import calibrate_bundle
    from anomaly.deploy.export import export_run
    from anomaly.training.cli import _progress_printer
    from anomaly.training.config import TrainConfig
    from anomaly.training.run import train

    def say(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr, flush=True)

    t0 = time.monotonic()
    data = prepare_elpv(out / "data", cell_type=cell_type, seed=seed)
    say(f"[1/5] data: {data}")
    say(f"[2/5] training {model} ({image_size}x{image_size}, up to {epochs} epochs / {max_minutes} min)")
    cfg = TrainConfig(data=str(data), out=str(out / "run"), model=model, image_size=image_size, epochs=epochs,
                      max_minutes=max_minutes, seed=seed)
    result = train(cfg, progress=_progress_printer() if verbose else None)
    say(f"[3/5] exporting to ONNX: {out / 'bundle'}")
    bundle = export_run(out / "run", out / "bundle")
    say(f"[4/5] calibrating on held-out normal cells: {data / 'calibrate' / 'good'}")
    cal = calibrate_bundle(bundle, data / "calibrate" / "good", method="fpr", target_fpr=0.05)
    say(f"[5/5] auditing {data / 'test'} with onnxruntime")
    summary = run_audit(bundle, [data / "test"], out / "audit", force=True)  # a rerun retrains: start the audit over
    labels, scores = [], []
    with open(summary["results"], newline="") as fh:
        for row in csv.DictReader(fh):
            if row["error"]:
                continue
            labels.append(0 if Path(row["path"]).parent.name == "good" else 1)
            scores.append(float(row["score"]))
    m = image_metrics(np.asarray(labels), np.asarray(scores))
    n_bad = int(sum(labels))
    flagged_bad = sum(1 for y, s in zip(labels, scores) if y == 1 and s > cal["threshold"])
    flagged_good = sum(1 for y, s in zip(labels, scores) if y == 0 and s > cal["threshold"])
    table = {
        "image AUROC": f"{m['auroc']:.3f}  (AP {m['ap']:.3f}, F1-max {m['f1_max']:.3f})",
        "test images": f"{len(labels)} ({len(labels) - n_bad} functional, {n_bad} defective)",
        "threshold": f"{cal['threshold']:.5g}  (5% FPR target on {cal['n_normal']} held-out normal cells)",
        "flagged": f"{summary['flagged']} of {summary['images']}: {flagged_bad}/{n_bad} defective, "
                   f"{flagged_good}/{len(labels) - n_bad} functional",
        "training": f"{result.epochs_done} epochs in {result.seconds:.0f}s (stopped by {result.stopped})",
        "audit speed": f"{summary['images_per_second']:.1f} images/s (onnxruntime, with heatmaps)",
        "outputs": f"{out / 'bundle'} (model), {summary['results']}, {summary['heatmaps']}",
        "total time": f"{time.monotonic() - t0:.0f}s",
    }
    return {"auroc": m["auroc"], "metrics": m, "table": table, "summary": summary, "calibration": cal}

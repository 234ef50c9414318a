"""``anomaly train``: argument parsing and a progress display around :func:`anomaly.training.run.train`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomaly.training.config import TrainConfig

__all__ = ["add_parsers"]


def _progress_printer(stream=None):
    """A progress callback that rewrites one status line on ``stream`` (default: stderr)."""
    last = [0.0]

    def show(ev: dict[str, Any]) -> None:
        out = stream or sys.stderr
        now = time.monotonic()
        if ev["event"] == "batch":
            if now - last[0] < 0.5:
                return
            last[0] = now
            total = ev.get("batches") or "?"
            logs = " ".join(f"{k}={v:.4f}" for k, v in ev["logs"].items())
            out.write(f"\r  epoch {ev['epoch']}/{ev['epochs']} batch {ev['batch']}/{total} {logs} [{ev['elapsed']:.0f}s]\033[K")
        else:
            logs = " ".join(f"{k}={v:.4f}" for k, v in ev["logs"].items())
            mark = " (best)" if ev.get("improved") else ""
            out.write(f"\r  epoch {ev['epoch']}/{ev['epochs']} {logs} val_error={ev['val_error']:.5f}{mark} [{ev['elapsed']:.0f}s]\033[K\n")
        out.flush()

    return show


def _json_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"latent_dim\": 64}}', got {text!r}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from anomaly.training.config import AUGMENTS  # plain data: no torch

    p = sub.add_parser("train", help="train a model on normal images",
                       description="Train a zoo model on normal images (MVTec-style category folder or a plain folder).")
    p.add_argument("--data", required=True, help="category folder (train/good, test/<type>) or a folder of normal images")
    p.add_argument("--model", default="aae", help="registry name (see `anomaly models`); default aae")
    p.add_argument("--out", required=True, help="run folder for checkpoints, config and loss log")
    p.add_argument("--image-size", type=int, default=64, help="model input side, a power of two (default 64, as benchmarked)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="1 or 3 (default: detect)")
    p.add_argument("--epochs", type=int, default=100, help="maximum epochs (default 100)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget; stops cleanly with a checkpoint")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the objective's own)")
    p.add_argument("--lr-decay-from", type=float, default=None, metavar="F",
                   help="keep the learning rate for this fraction of the epochs, then decay it linearly towards 0 "
                        "(CycleGAN's schedule; default: constant)")
    p.add_argument("--val-fraction", type=float, default=0.15, help="normal images held out for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--augment", default="flip", choices=AUGMENTS,
                   help="flip: random horizontal/vertical flips (default); flip_rot90: also 90-degree rotations, "
                        "for surfaces with no preferred direction (measured worse than flip on grass); "
                        "none: for oriented products")
    p.add_argument("--synthetic-defects", type=float, default=0.0, metavar="P",
                   help="probability of a synthetic defect per training image; the model learns to repair (default 0)")
    p.add_argument("--defect-sources", default=None, metavar="DIR",
                   help="folder of images (e.g. a texture set such as DTD) that fill the synthetic defects' Perlin "
                        "regions, as DRAEM does; default: altered copies of the training image")
    p.add_argument("--model-kwargs", type=_json_arg, default={}, help="JSON object for the model factory")
    p.add_argument("--objective-kwargs", type=_json_arg, default={}, help="JSON object for the objective")
    p.add_argument("--residual", default=None, help="residual kind used at export (l1, l2, ssim, gms, ms, l1_ssim; with a segmenter also learned, l1_learned, …)")
    p.add_argument("--colour", default=None, choices=("rgb", "ycc"),
                   help="RGB models: the space of the l1 / l2 differences used at export (ycc: hue and "
                        "saturation get two of three votes; default rgb)")
    p.add_argument("--texture-stats", action="store_true",
                   help="export with the texture-statistics map part (anomaly export --texture-stats): for textured "
                        "surfaces where foreign patches pass through the repair")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--generative", action="store_true",
                   help="also write OUT/samples.png, a grid of what the model generates (see what it learned)")
    p.set_defaults(func=_run)


def _config(args: argparse.Namespace, scoring: dict) -> TrainConfig:
    """The run's :class:`anomaly.training.config.TrainConfig` from the parsed options (``ValueError`` on a bad combination)."""
    from anomaly.training.config import TrainConfig

    return TrainConfig(
        data=args.data, out=args.out, model=args.model, image_size=args.image_size, channels=args.channels,
        epochs=args.epochs, max_minutes=args.max_minutes, batch_size=args.batch_size, lr=args.lr,
        lr_decay_from=args.lr_decay_from, val_fraction=args.val_fraction, seed=args.seed, device=args.device,
        augment=args.augment,
        synthetic_defects=args.synthetic_defects, defect_sources=args.defect_sources, model_kwargs=args.model_kwargs,
        objective_kwargs=args.objective_kwargs, scoring=scoring,
    )


def _run(args: argparse.Namespace) -> int:
    from anomaly.training.config import DEFAULT_SCORING
    from anomaly.training.run import train

    scoring = dict(DEFAULT_SCORING)
    if args.residual:
        scoring["residual"] = args.residual
    if args.colour:
        scoring["colour"] = args.colour
    if args.texture_stats:
        scoring["texture"] = "stats"
    try:
        cfg = _config(args, scoring)
    except ValueError as exc:  # option combinations the config refuses
        print(f"anomaly train: error: {exc}", file=sys.stderr)
        return 2
    print(f"training {cfg.model} on {cfg.data} -> {cfg.out}", file=sys.stderr)
    try:
        result = train(cfg, resume=args.resume, progress=_progress_printer())
    except ValueError as exc:  # settings the data cannot take (e.g. --colour ycc on grayscale images)
        print(f"anomaly train: error: {exc}", file=sys.stderr)
        return 2
    print(f"done: {result.epochs_done} epochs, {result.steps_done} steps in {result.seconds:.0f}s "
          f"(stopped by {result.stopped}); best validation error {result.best_val:.5f}")
    print(f"checkpoints: {result.best_checkpoint} (best), {result.last_checkpoint} (last)")
    if args.generative:
        from anomaly.training.run import save_samples

        print(f"samples: {save_samples(cfg.out)}")
    return 0

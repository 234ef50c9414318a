"""``anomaly train``: argument parsing and a progress display around :func:`anomaly.training.run.train`."""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, TextIO

from anomaly.data.progress import MODES, Progress  # torch-free

if TYPE_CHECKING:
    from anomaly.training.config import TrainConfig

__all__ = ["add_parsers"]


class TrainProgress:
    """Renders the trainer's progress events (``{"event": "batch"|"epoch", ...}``) on ``stream``.

    On a terminal: one tqdm bar over every batch of the run (rate, ETA, the latest losses) with a
    line kept per epoch. In logs and CI (not a TTY): the epoch lines, and a status line with ETA
    every ``interval`` seconds within long epochs. See :class:`anomaly.data.progress.Progress`.
    """

    def __init__(self, stream: TextIO | None = None, mode: str = "auto", interval: float = 30.0) -> None:
        self.stream = stream
        self.mode = mode
        self.interval = interval
        self._bar: Progress | None = None

    def __call__(self, ev: dict[str, Any]) -> None:
        if self.mode == "none":
            return
        if ev["event"] == "batch":
            if self._bar is None:
                batches = ev.get("batches")
                total = ev["epochs"] * batches if batches else None
                done = (ev["epoch"] - 1) * batches + ev["batch"] - 1 if batches else 0
                self._bar = Progress(total=total, desc="", unit="batch", stream=self.stream, mode=self.mode,
                                     interval=self.interval, initial=done)
            self._bar.set_description(f"epoch {ev['epoch']}/{ev['epochs']}")
            self._bar.update(1, **ev["logs"])
        else:
            logs = " ".join(f"{k}={v:.4f}" for k, v in ev["logs"].items())
            mark = " (best)" if ev.get("improved") else ""
            line = f"  epoch {ev['epoch']}/{ev['epochs']} {logs} val_error={ev['val_error']:.5f}{mark} [{ev['elapsed']:.0f}s]"
            if self._bar is not None:
                self._bar.write(line)
                if ev["epoch"] >= ev["epochs"]:
                    self.close()
            else:
                out = self.stream or sys.stderr
                out.write(line + "\n")
                out.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _progress_printer(stream: TextIO | None = None) -> TrainProgress:
    """The ``anomaly train`` progress display as a trainer callback (see :class:`TrainProgress`)."""
    return TrainProgress(stream)


def _json_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"latent_dim\": 64}}', got {text!r}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from anomaly.training.config import AUGMENTS, train_defaults  # plain data: no torch

    d = train_defaults()  # the one definition of the defaults (TrainConfig's fields)

    p = sub.add_parser("train", help="train a model on normal images",
                       description="Train a zoo model on normal images (MVTec-style category folder or a plain folder).")
    p.add_argument("--data", required=True, help="category folder (train/good, test/<type>) or a folder of normal images")
    p.add_argument("--model", default=d["model"], help="registry name (see `anomaly models`); default %(default)s")
    p.add_argument("--out", required=True, help="run folder for checkpoints, config and loss log")
    p.add_argument("--image-size", type=int, default=d["image_size"],
                   help="model input side, a power of two (default %(default)s, as benchmarked)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=d["channels"], help="1 or 3 (default: detect)")
    p.add_argument("--epochs", type=int, default=d["epochs"], help="maximum epochs (default %(default)s)")
    p.add_argument("--max-minutes", type=float, default=d["max_minutes"], help="wall-clock budget; stops cleanly with a checkpoint")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="default %(default)s")
    p.add_argument("--lr", type=float, default=d["lr"], help="learning rate (default: the objective's own)")
    p.add_argument("--lr-decay-from", type=float, default=d["lr_decay_from"], metavar="F",
                   help="keep the learning rate for this fraction of the epochs, then decay it linearly towards 0 "
                        "(CycleGAN's schedule; default: constant)")
    p.add_argument("--val-fraction", type=float, default=d["val_fraction"],
                   help="normal images held out for validation (default %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="default %(default)s")
    p.add_argument("--device", default=d["device"], choices=("auto", "cpu", "cuda"))
    p.add_argument("--augment", default=d["augment"], choices=AUGMENTS,
                   help="flip: random horizontal/vertical flips (default); flip_rot90: also 90-degree rotations, "
                        "for surfaces with no preferred direction (measured worse than flip on grass); "
                        "none: for oriented products")
    p.add_argument("--synthetic-defects", type=float, default=d["synthetic_defects"], metavar="P",
                   help="probability of a synthetic defect per training image; the model learns to repair (default 0)")
    p.add_argument("--defect-sources", default=d["defect_sources"], metavar="DIR",
                   help="folder of images (e.g. a texture set such as DTD) that fill the synthetic defects' Perlin "
                        "regions, as DRAEM does; default: altered copies of the training image")
    p.add_argument("--model-kwargs", type=_json_arg, default=d["model_kwargs"], help="JSON object for the model factory")
    p.add_argument("--objective-kwargs", type=_json_arg, default=d["objective_kwargs"], help="JSON object for the objective")
    p.add_argument("--residual", default=None, help="residual kind used at export (l1, l2, ssim, gms, ms, l1_ssim; with a segmenter also learned, l1_learned, …)")
    p.add_argument("--colour", default=None, choices=("rgb", "ycc"),
                   help="RGB models: the space of the l1 / l2 differences used at export (ycc: hue and "
                        "saturation get two of three votes; default rgb)")
    p.add_argument("--texture-stats", action="store_true",
                   help="export with the texture-statistics map part (anomaly export --texture-stats): for textured "
                        "surfaces where foreign patches pass through the repair")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--logdir", default=None, metavar="DIR",
                   help="TensorBoard event files (losses of every step, validation error, learning rates, "
                        "reconstruction grids); default OUT/tensorboard")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="write no TensorBoard events")
    p.add_argument("--progress", default="auto", choices=MODES,
                   help="auto: a live bar on a terminal, a line per epoch (and every 30 s) otherwise (default)")
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
    from anomaly.training.distributed import env_rank

    main = env_rank() == 0  # under torchrun, rank 0 alone speaks
    if main:
        print(f"training {cfg.model} on {cfg.data} -> {cfg.out}", file=sys.stderr)
    progress = TrainProgress(mode=args.progress) if main else None
    try:
        result = train(cfg, resume=args.resume, progress=progress, tensorboard=args.tensorboard, logdir=args.logdir)
    except ValueError as exc:  # settings the data cannot take (e.g. --colour ycc on grayscale images)
        print(f"anomaly train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if progress is not None:
            progress.close()
    if not main:
        return 0
    print(f"done: {result.epochs_done} epochs, {result.steps_done} steps in {result.seconds:.0f}s "
          f"(stopped by {result.stopped}); best validation error {result.best_val:.5f}")
    print(f"checkpoints: {result.best_checkpoint} (best), {result.last_checkpoint} (last)")
    if args.tensorboard:
        print(f"tensorboard: tensorboard --logdir {args.logdir or f'{cfg.out}/tensorboard'}")
    if args.generative:
        from anomaly.training.run import save_samples

        print(f"samples: {save_samples(cfg.out)}")
    return 0

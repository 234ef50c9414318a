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


#: the options that name a model or its settings, by dest: with none of them (and no ``--preset``)
#: ``anomaly train`` measures the training images and chooses the recipe (:mod:`anomaly.training.recipe`)
MODEL_OPTIONS = {"model": "--model", "image_size": "--image-size", "tile_scale": "--tile-scale",
                 "synthetic_defects": "--synthetic-defects", "defect_sources": "--defect-sources",
                 "model_kwargs": "--model-kwargs", "objective_kwargs": "--objective-kwargs", "residual": "--residual",
                 "colour": "--colour", "texture_stats": "--texture-stats"}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from anomaly.training.config import AUGMENTS, train_defaults  # plain data: no torch
    from anomaly.training.presets import PRODUCT_PRESETS

    d = train_defaults()  # the one definition of the defaults (TrainConfig's fields)
    # The options a recipe sets default to None here: None means "not given", so that a preset's value
    # or the automatic choice can fill it; what is left is filled from train_defaults() (_config).
    names = ", ".join(PRODUCT_PRESETS)

    p = sub.add_parser("train", help="train a model on normal images",
                       description="Train a zoo model on normal images (MVTec-style category folder or a plain folder). "
                                   "Without model options it measures the training images and picks the recipe "
                                   "(anomaly presets lists them), and says which and why.")
    p.add_argument("--data", required=True, help="category folder (train/good, test/<type>) or a folder of normal images")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help=f"a product recipe ({names}; `anomaly presets` lists them with their figures); options given "
                        "beside it win over its settings (a --model other than its own drops its model, objective "
                        "and scoring settings). Default: with none of --model, --image-size, --tile-scale, "
                        "--synthetic-defects, --defect-sources, --model-kwargs, --objective-kwargs, --residual, "
                        "--colour, --texture-stats, chosen from the training images and recorded in config.json; "
                        "with any of them, the training defaults")
    p.add_argument("--model", default=None, help=f"registry name (see `anomaly models`); default: the recipe's, "
                                                 f"else {d['model']}")
    p.add_argument("--out", required=True, help="run folder for checkpoints, config and loss log")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"model input side, a power of two (default: the recipe's, else {d['image_size']}, as benchmarked)")
    p.add_argument("--tile-scale", type=float, default=None, metavar="F",
                   help="native-resolution tiling: train on IMAGE_SIZE crops of the images resized by F (1 = native "
                        "pixels) and score overlapping tiles stitched into one map at that scale, for thin or small "
                        "defects on large images (default: the recipe's, else off: every image resized whole to IMAGE_SIZE)")
    p.add_argument("--tile-overlap", type=float, default=d["tile_overlap"], metavar="FRACTION",
                   help="share of a tile its neighbours overlap in the inference grid (default %(default)s)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=d["channels"],
                   help="1 or 3 (default: measured by the recipe, else detected from the first image)")
    p.add_argument("--epochs", type=int, default=None, help=f"maximum epochs (default: the recipe's, else {d['epochs']})")
    p.add_argument("--max-minutes", type=float, default=d["max_minutes"], help="wall-clock budget; stops cleanly with a checkpoint")
    p.add_argument("--batch-size", type=int, default=None, help=f"default: the recipe's, else {d['batch_size']}")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's, else the objective's own)")
    p.add_argument("--lr-decay-from", type=float, default=None, metavar="F",
                   help="keep the learning rate for this fraction of the epochs, then decay it linearly towards 0 "
                        "(CycleGAN's schedule; default: the recipe's, else constant)")
    p.add_argument("--val-fraction", type=float, default=d["val_fraction"],
                   help="normal images held out for validation (default %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="default %(default)s")
    p.add_argument("--device", default=d["device"], choices=("auto", "cpu", "cuda"))
    p.add_argument("--augment", default=None, choices=AUGMENTS,
                   help=f"flip: random horizontal/vertical flips (default: the recipe's, else {d['augment']}); "
                        "flip_rot90: also 90-degree rotations, for surfaces with no preferred direction (measured "
                        "worse than flip on grass); none: for oriented products")
    p.add_argument("--synthetic-defects", type=float, default=None, metavar="P",
                   help="probability of a synthetic defect per training image; the model learns to repair "
                        f"(default: the recipe's, else {d['synthetic_defects']:g})")
    p.add_argument("--defect-sources", default=d["defect_sources"], metavar="DIR",
                   help="folder of images (e.g. a texture set such as DTD) that fill the synthetic defects' Perlin "
                        "regions, as DRAEM does; default: altered copies of the training image")
    p.add_argument("--model-kwargs", type=_json_arg, default=None,
                   help="JSON object for the model factory (default: the recipe's, else {})")
    p.add_argument("--objective-kwargs", type=_json_arg, default=None,
                   help="JSON object for the objective (default: the recipe's, else {})")
    p.add_argument("--residual", default=None, help="residual kind used at export (l1, l2, ssim, gms, ms, l1_ssim; with a segmenter also learned, l1_learned, …); default: the recipe's, else l1_ssim")
    p.add_argument("--colour", default=None, choices=("rgb", "ycc"),
                   help="RGB models: the space of the l1 / l2 differences used at export (ycc: hue and "
                        "saturation get two of three votes; default rgb)")
    p.add_argument("--texture-stats", action="store_true",
                   help="export with the texture-statistics map part (anomaly export --texture-stats): for textured "
                        "surfaces where foreign patches pass through the repair")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints/last.pt (without model options: with the run's recorded recipe and settings)")
    p.add_argument("--logdir", default=None, metavar="DIR",
                   help="TensorBoard event files (losses of every step, validation error, learning rates, "
                        "reconstruction grids); default OUT/tensorboard")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="write no TensorBoard events")
    p.add_argument("--progress", default="auto", choices=MODES,
                   help="auto: a live bar on a terminal, a line per epoch (and every 30 s) otherwise (default)")
    p.add_argument("--generative", action="store_true",
                   help="also write OUT/samples.png, a grid of what the model generates (see what it learned)")
    p.set_defaults(func=_run)

    q = sub.add_parser("presets", help="list the training recipes (anomaly train --preset NAME) and their figures",
                       description="List the product presets of `anomaly train --preset NAME` with their settings and "
                                   "measured figures, and the rule by which `anomaly train` picks one.")
    q.add_argument("--data", default=None, metavar="DIR",
                   help="also measure DIR's training images and say which preset `anomaly train --data DIR` would pick, "
                        "and why (nothing is trained)")
    q.set_defaults(func=_presets)


def _given(args: argparse.Namespace) -> list[str]:
    """The :data:`MODEL_OPTIONS` given on the command line (their flags)."""
    return [flag for dest, flag in MODEL_OPTIONS.items() if getattr(args, dest, None) not in (None, False)]


def _recipe(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
    """How the run's model settings are chosen: ``(TrainConfig fields, the recipe to record, the line
    to print)``. ``--preset NAME``: the preset's settings. No model option: on ``--resume`` of a run
    folder the recorded run's settings and recipe; otherwise the images are measured and a preset is
    chosen (:func:`anomaly.training.recipe.recommend`). Any model option: nothing (the defaults).

    Raises:
        KeyError: an unknown ``--preset`` (the message lists the known ones).
        anomaly.data.folder.DatasetError, anomaly.data.io.ImageReadError: data that cannot be measured.
    """
    from pathlib import Path

    from anomaly.training.presets import PRESET_FIELDS, get_product_preset

    given = _given(args)
    if args.preset is not None:
        preset = get_product_preset(args.preset)
        settings = preset.settings()
        if args.model is not None and args.model != preset.model:  # those settings are the preset's model's
            settings.pop("model_kwargs"), settings.pop("objective_kwargs"), settings.pop("scoring")
        reason = "named with --preset" + (f"; {', '.join(given)} given beside it" if given else "")
        record = {"preset": preset.name, "reason": reason, "measured": None, "chosen_by": "preset"}
        return settings, record, f"recipe: {preset.name} -- {reason} ({preset.describe()})"
    if given:
        return {}, None, None
    recorded_path = Path(args.out) / "config.json"
    if args.resume and recorded_path.is_file():
        from anomaly.training.config import TrainConfig

        recorded = TrainConfig.load(recorded_path)
        settings = {k: getattr(recorded, k) for k in (*PRESET_FIELDS, "channels", "defect_sources")}
        if recorded.recipe and recorded.recipe.get("preset"):
            line = f"recipe: {recorded.recipe['preset']} -- as recorded in {recorded_path}: {recorded.recipe['reason']}"
        else:
            line = None
        return settings, recorded.recipe, line
    from anomaly.training.recipe import recommend

    chosen = recommend(args.data)
    return chosen.settings, chosen.record("auto"), f"recipe: {chosen.preset} -- {chosen.reason}"


def _config(args: argparse.Namespace, settings: dict[str, Any], recipe: dict[str, Any] | None) -> TrainConfig:
    """The run's :class:`anomaly.training.config.TrainConfig`: each field from its option when given,
    else from ``settings`` (a preset's, :func:`_recipe`), else the training default
    (``ValueError`` on a bad combination)."""
    from anomaly.training.config import TrainConfig, train_defaults

    d = train_defaults()

    def pick(name: str) -> Any:
        value = getattr(args, name)
        if value is not None:
            return value
        return settings[name] if name in settings else d[name]

    scoring = dict(settings.get("scoring") or d["scoring"])
    if args.residual:
        scoring["residual"] = args.residual
    if args.colour:
        scoring["colour"] = args.colour
    if args.texture_stats:
        scoring["texture"] = "stats"
    return TrainConfig(
        data=args.data, out=args.out, model=pick("model"), image_size=pick("image_size"), channels=pick("channels"),
        tile_scale=pick("tile_scale"), tile_overlap=args.tile_overlap,
        epochs=pick("epochs"), max_minutes=args.max_minutes, batch_size=pick("batch_size"), lr=pick("lr"),
        lr_decay_from=pick("lr_decay_from"), val_fraction=args.val_fraction, seed=args.seed, device=args.device,
        augment=pick("augment"), synthetic_defects=pick("synthetic_defects"), defect_sources=pick("defect_sources"),
        model_kwargs=dict(pick("model_kwargs")), objective_kwargs=dict(pick("objective_kwargs")), scoring=scoring,
        recipe=recipe,
    )


def _presets(args: argparse.Namespace) -> int:
    from anomaly.training import recipe as rule
    from anomaly.training.presets import PRODUCT_PRESETS, get_product_preset

    for p in PRODUCT_PRESETS.values():
        print(f"{p.name}: {p.describe()}")
        print(f"  {p.summary}")
        print(f"  figures: {p.figures}" + (f" ({', '.join(p.results)})" if p.results else ""))
        if p.benchmark:
            print(f"  benchmark preset: {p.benchmark} (benchmarks/quality.py --configs {p.benchmark})")
    whole = get_product_preset("texture_repair").image_size
    print(f"\nanomaly train --data DIR without model options measures up to {rule.MAX_IMAGES} training images and picks "
          f"aligned when their alignment is >= {rule.ALIGNED_MIN}, else texture_tiled when their short side is >= "
          f"{rule.TILE_FACTOR} x {whole} px, else texture_repair (thresholds: "
          "benchmarks/results/2026-12-07-recipe-properties.md)")
    if args.data is not None:
        chosen = rule.recommend(args.data)
        print(f"\n{args.data}: {chosen.preset} -- {chosen.reason}")
        print("  measured: " + ", ".join(f"{k} {v}" for k, v in chosen.measured.items()))
    return 0


def _run(args: argparse.Namespace) -> int:
    from anomaly.training.distributed import env_rank
    from anomaly.training.run import train

    main = env_rank() == 0  # under torchrun, rank 0 alone speaks
    try:
        settings, recipe, line = _recipe(args)
    except KeyError as exc:  # an unknown --preset
        print(f"anomaly train: error: {exc.args[0]}", file=sys.stderr)
        return 2
    try:
        cfg = _config(args, settings, recipe)
    except ValueError as exc:  # option combinations the config refuses
        print(f"anomaly train: error: {exc}", file=sys.stderr)
        return 2
    if main:
        if line:
            print(line, file=sys.stderr)
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
    if cfg.recipe and cfg.recipe.get("preset"):
        from anomaly.training.presets import PRODUCT_PRESETS

        preset = PRODUCT_PRESETS.get(cfg.recipe["preset"])
        if preset is not None and preset.export_args:
            print(f"export: anomaly export {cfg.out} --out BUNDLE {' '.join(preset.export_args)} "
                  f"(what the {preset.name} figures were measured with)")
    if args.generative:
        from anomaly.training.run import save_samples

        print(f"samples: {save_samples(cfg.out)}")
    return 0

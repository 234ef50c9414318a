"""The ``anomaly`` command. Subcommands are defined beside their code and registered here.

Each module in :data:`COMMAND_MODULES` has ``add_parsers(subparsers)``; handlers import heavy
dependencies (torch) only when they run, so ``anomaly audit`` works on a torch-free install.
User mistakes (missing folders, unreadable images, bad bundles, unknown models) print one clear
line and exit with status 2; nothing else is caught.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from anomaly import __version__

__all__ = ["main", "COMMAND_MODULES"]

COMMAND_MODULES = ("anomaly.training.cli", "anomaly.deploy.cli", "anomaly.deploy.bench", "anomaly.deploy.evaluate", "anomaly.deploy.serve", "anomaly.demo")


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo", description="List registered models.")
    p.set_defaults(func=_models)


def _models(args: argparse.Namespace) -> int:
    from anomaly.registry import get_spec, list_models

    rows = [("name", "objective", "conditional", "family", "reconstructs x by")]
    papers = []
    for name in list_models():
        s = get_spec(name)
        rows.append((name, s.objective, "yes" if s.conditional else "no", s.family, s.reconstruction))
        papers.append(f"  {name}: {s.paper}")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    print("\npapers:")
    print("\n".join(papers))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomaly", description="Find and localize defects in images; trained on normal images only.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"anomaly {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub)
    _add_models(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from anomaly.registry import UnknownModelError
    from anomaly.data.folder import DatasetError
    from anomaly.data.io import ImageReadError
    from anomaly.deploy.bundle import BundleError

    errors: list[type[BaseException]] = [UnknownModelError, DatasetError, ImageReadError, BundleError, FileNotFoundError]
    # a command's own error class can only have been raised if its module was imported; importing
    # the others here would load scikit-learn (anomaly.deploy.calibrate) just to print a bad path's message
    for module, name in (("anomaly.deploy.runtime", "CategoryError"), ("anomaly.deploy.inputs", "AuditError"),
                         ("anomaly.deploy.ray_engine", "RayEngineError"), ("anomaly.deploy.calibrate", "CalibrationError"),
                         ("anomaly.deploy.evaluate", "EvaluationError"), ("anomaly.deploy.review", "ReviewError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anomaly`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        print(f"anomaly {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"anomaly {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

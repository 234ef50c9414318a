"""``anomaly serve``: the inspection service on the command line.

::

    anomaly serve bundles/cells                       # http://127.0.0.1:8000, model "cells"
    anomaly serve cells=bundles/mono tiles=bundles/t  # several products in one server
    ANOMALY_SERVE_TOKEN=$(openssl rand -hex 24) anomaly serve bundles/cells --max-batch 16 --max-wait-ms 5

Each bundle is served under its folder's name, or ``NAME=PATH``. It binds 127.0.0.1 unless
``--host`` says otherwise (``--host 0.0.0.0`` is the user's explicit choice). The service itself
lives in :mod:`anomaly.deploy.serve_app` (FastAPI, uvicorn, prometheus-client: the ``[serve]``
extra); this module imports none of them until the command runs, so the base install lists the
command and says what to install.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

__all__ = ["add_parsers", "parse_bundles"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SERVE_MODULES = {"fastapi", "uvicorn", "prometheus_client", "starlette", "pydantic", "multipart", "python_multipart"}
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_bundles(items: list[str]) -> dict[str, Path]:
    """``["cells=bundles/mono", "bundles/tiles"]`` -> ``{"cells": Path("bundles/mono"), "tiles": ...}``.

    Raises:
        ValueError: a name that is not 1-64 letters, digits, ``.``, ``_`` or ``-`` (it becomes part
            of URLs and metric labels), or a name given twice.
    """
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            path = item
            name = Path(item.rstrip("/\\")).name
        if not _NAME.fullmatch(name or ""):
            raise ValueError(f"model name {name!r} (from {item!r}): expected 1-64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit; give one as NAME=PATH")
        if name in out:
            raise ValueError(f"model name {name!r} is given twice; name them apart with NAME=PATH")
        out[name] = Path(path)
    return out


def _power_of_two(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a power of two (1, 2, 4, ...), got {text!r}") from None
    if n < 1 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"expected a power of two (1, 2, 4, ...), got {n}")
    return n


def _positive(kind: type):
    def parse(text: str):
        try:
            v = kind(float(text)) if kind is int else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
        return v
    return parse


def _non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return v


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``anomaly serve``."""
    p = sub.add_parser(
        "serve", help="serve bundles over HTTP: micro-batched inspection, metrics, drift alarms",
        description="Serve one or more bundles as an HTTP inspection service (needs the [serve] extra). "
                    "POST an image to /v1/models/NAME/inspect; health and metadata at /v2/...; Prometheus "
                    "metrics at /metrics. Threshold changes and reloads need ANOMALY_SERVE_TOKEN set.")
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="a bundle folder, or NAME=FOLDER to name it")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-batch", type=_power_of_two, default=16,
                   help="most images per batch, a power of two (default 16; 1 turns micro-batching off)")
    p.add_argument("--max-wait-ms", type=_non_negative, default=5.0,
                   help="how long the oldest queued image waits for others to join its batch (default 5)")
    p.add_argument("--queue-size", type=_positive(int), default=64,
                   help="queue places per model; beyond them requests get 429 at once (default 64)")
    p.add_argument("--max-bytes", type=_positive(int), default=32 << 20, help="largest request body (default 32 MiB)")
    p.add_argument("--max-pixels", type=_positive(int), default=40_000_000,
                   help="largest image in pixels, checked from its header before decoding (default 40,000,000)")
    p.add_argument("--max-images", type=_positive(int), default=32, help="most files per batch request (default 32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or tensorrt (default auto)")
    p.add_argument("--threads", type=_positive(int), default=None, help="inference threads (default: physical cores)")
    p.add_argument("--decode-workers", type=_positive(int), default=None,
                   help="threads decoding request images (default: physical cores)")
    p.add_argument("--drift-window", type=_positive(int), default=500,
                   help="recent scores compared with the calibration's for the drift alarm (default 500)")
    p.add_argument("--drift-alpha", type=_positive(float), default=0.05, help="alarm when the KS p-value is below (default 0.05)")
    p.add_argument("--drift-psi", type=_positive(float), default=0.2, help="alarm when the PSI is above (default 0.2)")
    p.add_argument("--graceful-timeout", type=_non_negative, default=30.0,
                   help="seconds a stop waits for requests in flight and queued (default 30)")
    p.add_argument("--drain-delay", type=_non_negative, default=0.0,
                   help="seconds between SIGTERM and closing the port, answering ready=false (default 0)")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        from anomaly.deploy import serve_app
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _SERVE_MODULES:
            raise
        print(f"anomaly serve: error: the service needs the [serve] extra ({exc.name} is not installed): "
              "pip install 'anomaly[serve]'", file=sys.stderr)
        return 2
    try:
        bundles = parse_bundles(args.bundles)
        token = os.environ.get(serve_app.TOKEN_ENV) or None
        config = serve_app.ServeConfig(
            max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size, max_bytes=args.max_bytes,
            max_pixels=args.max_pixels, max_images=args.max_images, device=args.device, threads=args.threads,
            decode_workers=args.decode_workers, drift_window=args.drift_window, drift_alpha=args.drift_alpha,
            drift_psi=args.drift_psi, token=token, graceful_timeout=args.graceful_timeout, drain_delay=args.drain_delay)
    except ValueError as exc:
        print(f"anomaly serve: error: {exc}", file=sys.stderr)
        return 2
    service = serve_app.Service(bundles, config).load()  # a bad bundle stops here, before the port opens
    if args.host not in _LOOPBACK:
        print(f"anomaly serve: listening on {args.host}: every host that reaches it can post images"
              + ("" if token is None else " and, with the token, change thresholds"), file=sys.stderr)
    level = "info" if args.verbose else "warning"
    server = serve_app.make_server(service, args.host, args.port, log_level=level, access_log=args.access_log)

    def started(srv: "serve_app.ServiceServer") -> None:
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"anomaly serve: {', '.join(service.models)} on http://{host}:{srv.port} (max batch {config.max_batch}, "
              f"max wait {config.max_wait_ms:g} ms, queue {config.queue_size} per model; threshold changes "
              f"{'on' if token else 'off'})", flush=True)

    server.on_started = started
    server.run()
    if not server.started:  # the port could not be bound (uvicorn logged why)
        return 1
    print("anomaly serve: stopped", flush=True)
    return 0

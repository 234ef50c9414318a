"""How the end-to-end audit's rate depends on its thread counts and batch size, against pure inference.

On a GPU the graph is fast (the default AAE at 128²: ~15,000 images/s at batch 16 on an H200), so
the audit is bound by the CPU side: decoding and preprocessing (the runtime's decode workers),
overlays and files (the audit's writer threads) and the calling thread (results, journal, CSV).
This times :func:`anomaly.deploy.bench.bench_audit` (steady-state images/s, the fastest of its repeats) for
each combination of ``--decode-workers``, ``--workers`` and ``--batch-sizes`` and prints one table,
with the float32 graph's images/s at each batch size for reference.

Usage::

    python benchmarks/audit_workers.py BUNDLE IMAGES --device cuda --decode-workers 4 8 12 \\
        --workers 4 8 --batch-sizes 16 64
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
from pathlib import Path

for _p in (str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)):  # package, sibling modules
    if _p not in sys.path:
        sys.path.insert(0, _p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("images", help="folder of images to audit")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--decode-workers", type=int, nargs="+", default=[4])
    ap.add_argument("--workers", type=int, nargs="+", default=[4], help="the audit's file writers")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16])
    ap.add_argument("--threads", type=int, nargs="+", default=[0],
                    help="onnxruntime intra-op threads of the audit's session (0: the runtime's default)")
    ap.add_argument("--heatmaps", default="all", choices=("all", "flagged", "none"))
    ap.add_argument("--audit-images", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference-seconds", type=float, default=1.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from anomaly.deploy.bench import bench_audit
    from anomaly.deploy.runtime import Runtime
    from harness import graph_windows

    rt = Runtime(args.bundle, device=args.device)
    print(f"bundle {args.bundle} on {rt.session.get_providers()[0]}; {os.cpu_count()} CPUs; images {args.images}; "
          f"heatmaps {args.heatmaps}; the fastest of {args.repeats} audits per row")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    reference = {}
    for b in args.batch_sizes:
        reference[b] = graph_windows(rt, b, args.images, args.reference_seconds)[0]
    head = f"{'batch':>5} {'threads':>7} {'decoders':>8} {'writers':>7} {'audit img/s':>11} {'whole run':>9} {'graph img/s':>11} {'share':>6}"
    print(head)
    print("-" * len(head))
    thumbnail = 0 if args.heatmaps == "none" else 256
    for b, t, d, w in itertools.product(args.batch_sizes, args.threads, args.decode_workers, args.workers):
        rate = bench_audit(args.bundle, batch_size=b, device=args.device, images=args.images,
                           max_images=args.audit_images, repeats=args.repeats, heatmaps=args.heatmaps,
                           thumbnail=thumbnail, workers=w, decode_workers=d, threads=t or None)
        print(f"{b:>5} {t or 'auto':>7} {d:>8} {w:>7} {rate.images_per_s:>11.0f} {rate.whole_run_images_per_s:>9.0f} "
              f"{reference[b]:>11.0f} {rate.images_per_s / reference[b]:>6.0%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

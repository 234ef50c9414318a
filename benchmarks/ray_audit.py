"""Ray audit against the single-process audit on one machine: images/s, driver overhead, driver memory.

For each engine (``local``; ``ray`` with 1 and 2 actors) the same bundle audits the same images into
a fresh folder, and the table shows

* ``wall s`` / ``images/s``: the whole :func:`~anomaly.deploy.audit.run_audit` call, Ray's start-up included;
* ``steady images/s``: from the first journaled record to the last (Ray's start-up and the actors'
  session creation excluded), read from the journal's append times;
* ``driver CPU ms/image``: the driver process's own CPU time (``RUSAGE_SELF``: not the Ray workers)
  per image; for ``local`` it is the whole audit's CPU;
* ``driver peak RSS MiB``: ``ru_maxrss`` of the driver process.

``--manifest-paths N`` adds one more Ray row over a Parquet manifest of N distinct paths (symbolic links
to the inputs, so the files cost no disk), which states the driver's memory on a large input list.

Each engine runs in its own subprocess, so that peak RSS and CPU are that run's alone.

Usage::

    python benchmarks/ray_audit.py --bundle BUNDLE --images FOLDER [--n 2000] [--manifest-paths 100000]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from anomaly.deploy.audit import run_audit
cfg = json.loads(sys.argv[1])
stamps = []
t0 = time.monotonic()
kw = dict(engine=cfg["engine"], actors=cfg["actors"]) if cfg["engine"] == "ray" else {}
s = run_audit(cfg["bundle"], cfg["inputs"], cfg["out"], heatmaps=cfg["heatmaps"], batch_size=cfg["batch"],
              progress=lambda p: stamps.append(time.monotonic()), **kw)
wall = time.monotonic() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else None
print(json.dumps({"images": s["images"], "wall": wall, "steady": steady, "cpu": ru.ru_utime + ru.ru_stime,
                  "rss_mib": ru.ru_maxrss / 1024}))
"""


def run(cfg: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{cfg['engine']} run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--images", required=True, help="folder of images (copied/linked up to --n)")
    ap.add_argument("--n", type=int, default=2000, help="images per run (the folder's, repeated by symlinks)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heatmaps", default="all", choices=("all", "flagged", "none"))
    ap.add_argument("--manifest-paths", type=int, default=0, help="also a Ray run over a Parquet manifest of N paths")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="ray_audit_"))
    src = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".bmp"))
    if not src:
        raise SystemExit(f"no images in {args.images}")

    def linked(n: int, name: str) -> Path:
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            link = folder / f"{i:07d}{src[i % len(src)].suffix}"
            if not link.exists():
                link.symlink_to(src[i % len(src)].resolve())
        return folder

    inputs = linked(args.n, "inputs")
    rows = []
    for engine, actors in (("local", None), ("ray", 1), ("ray", 2)):
        out = work / f"out_{engine}_{actors}"
        shutil.rmtree(out, ignore_errors=True)
        r = run({"engine": engine, "actors": actors, "bundle": args.bundle, "inputs": [str(inputs)], "out": str(out),
                 "heatmaps": args.heatmaps, "batch": args.batch})
        rows.append((f"{engine}" + (f", {actors} actor{'s' if actors > 1 else ''}" if actors else ""), r))
    if args.manifest_paths:
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = linked(args.manifest_paths, "manifest_inputs")
        manifest = work / "manifest.parquet"
        pq.write_table(pa.table({"path": [str(folder / f"{i:07d}{src[i % len(src)].suffix}")
                                          for i in range(args.manifest_paths)]}), manifest)
        out = work / "out_manifest"
        shutil.rmtree(out, ignore_errors=True)
        r = run({"engine": "ray", "actors": 2, "bundle": args.bundle, "inputs": [str(manifest)], "out": str(out),
                 "heatmaps": "none", "batch": args.batch})
        rows.append((f"ray, 2 actors, {args.manifest_paths:,}-path manifest, no heatmaps", r))

    print(f"\n`python benchmarks/ray_audit.py {' '.join(sys.argv[1:])}` — {time.strftime('%Y-%m-%d')}, "
          f"{os.cpu_count()} CPUs, heatmaps {args.heatmaps}, batch {args.batch}\n")
    print("| engine | images | wall s | images/s | steady images/s | driver CPU ms/image | driver peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        steady = f"{r['steady']:.0f}" if r["steady"] else "-"
        print(f"| {name} | {r['images']} | {r['wall']:.1f} | {r['images'] / r['wall']:.0f} | {steady} | "
              f"{1000 * r['cpu'] / r['images']:.2f} | {r['rss_mib']:.0f} |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

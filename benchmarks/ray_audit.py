"""Ray audit against the single-process audit on one machine: images/s, driver overhead, driver memory.

For each engine (``local``; ``ray`` with 1 and 2 actors) the same bundle audits the same images into
a fresh folder, and the table shows

* ``wall s`` / ``images/s``: the whole :func:`~anomaly.deploy.audit.run_audit` call, Ray's start-up included;
* ``steady images/s``: from the first journaled record to the last (Ray's start-up and the actors'
  session creation excluded), read from the journal's append times;
* ``driver CPU ms/image``: the driver process's own CPU time (``RUSAGE_SELF``: not the Ray workers)
  per image; for ``local`` it is the whole audit's CPU;
* ``driver peak RSS MiB``: ``ru_maxrss`` of the driver process;
* ``actor peak RSS MiB``: the largest ``VmHWM`` of the Ray Data actor processes (``ray::MapWorker``),
  sampled from ``/proc`` every half second (Linux; ``-`` elsewhere and for ``local``).

``--manifest-paths N [N ...]`` adds one Ray row (2 actors, no heatmaps) per N over a Parquet manifest of
N distinct paths (symbolic links to the inputs, so the files cost no disk), which states whether the
driver's memory grows with the input list; ``--n 0`` leaves out the engine comparison.

Each engine runs in its own subprocess, so that peak RSS and CPU are that run's alone.

Usage::

    python benchmarks/ray_audit.py --bundle BUNDLE --images FOLDER [--n 2000] [--manifest-paths 1000 100000]
"""
from __future__ import annotations

import argparse
import json
import os
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
stamps = [0, None, None]  # records, first and last journal times (not a list per record: it would be driver memory)
def progress(p):
    now = time.monotonic()
    stamps[0] += 1
    stamps[1] = stamps[1] or now
    stamps[2] = now
t0 = time.monotonic()
kw = dict(engine=cfg["engine"], actors=cfg["actors"]) if cfg["engine"] == "ray" else {}
s = run_audit(cfg["bundle"], cfg["inputs"], cfg["out"], heatmaps=cfg["heatmaps"], batch_size=cfg["batch"],
              progress=progress, **kw)
wall = time.monotonic() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
n, first, last = stamps
steady = (n - 1) / (last - first) if n > 1 and last > first else None
print(json.dumps({"images": s["images"], "wall": wall, "steady": steady, "cpu": ru.ru_utime + ru.ru_stime,
                  "rss_mib": ru.ru_maxrss / 1024}))
"""


def _actor_hwm_kib(root: int) -> dict[int, int]:
    """``VmHWM`` (KiB) of the Ray Data actor processes under process ``root`` (Linux ``/proc``)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as fh:
                    parent[int(d)] = int(fh.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found: dict[int, int] = {}
    for pid in parent:
        p, depth = pid, 0
        while p in parent and p != root and depth < 16:
            p, depth = parent[p], depth + 1
        if p != root or pid == root:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if not fh.read().startswith(b"ray::MapWorker"):
                    continue
            with open(f"/proc/{pid}/status") as fh:
                found[pid] = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
        except (OSError, StopIteration, ValueError):
            pass
    return found


def run(cfg: dict) -> dict:
    """One audit in a child process; its JSON result plus the actors' peak RSS sampled meanwhile."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg)], stdout=out, stderr=err, text=True)
        hwm: dict[int, int] = {}
        deadline = time.monotonic() + 3600
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
            if cfg["engine"] == "ray" and os.path.isdir("/proc"):
                for pid, kib in _actor_hwm_kib(proc.pid).items():
                    hwm[pid] = max(hwm.get(pid, 0), kib)
            time.sleep(0.5)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{cfg['engine']} run failed:\n{err.read()[-3000:]}")
        r = json.loads(out.read().strip().splitlines()[-1])
    r["actor_rss_mib"] = max(hwm.values()) / 1024 if hwm else None
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--images", required=True, help="folder of images (copied/linked up to --n)")
    ap.add_argument("--n", type=int, default=2000, help="images per run (the folder's, repeated by symlinks)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heatmaps", default="all", choices=("all", "flagged", "none"))
    ap.add_argument("--manifest-paths", type=int, nargs="*", default=[], metavar="N",
                    help="also a Ray run (2 actors, no heatmaps) over a Parquet manifest of N paths, for each N")
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

    rows = []
    for engine, actors in (("local", None), ("ray", 1), ("ray", 2)) if args.n > 0 else ():
        inputs = linked(args.n, "inputs")
        out = work / f"out_{engine}_{actors}"
        shutil.rmtree(out, ignore_errors=True)
        r = run({"engine": engine, "actors": actors, "bundle": args.bundle, "inputs": [str(inputs)], "out": str(out),
                 "heatmaps": args.heatmaps, "batch": args.batch})
        rows.append((f"{engine}" + (f", {actors} actor{'s' if actors > 1 else ''}" if actors else ""), r))
    for n in args.manifest_paths:
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = linked(n, "manifest_inputs")
        manifest = work / f"manifest_{n}.parquet"
        pq.write_table(pa.table({"path": [str(folder / f"{i:07d}{src[i % len(src)].suffix}") for i in range(n)]}),
                       manifest)
        out = work / f"out_manifest_{n}"
        shutil.rmtree(out, ignore_errors=True)
        r = run({"engine": "ray", "actors": 2, "bundle": args.bundle, "inputs": [str(manifest)], "out": str(out),
                 "heatmaps": "none", "batch": args.batch})
        shutil.rmtree(out, ignore_errors=True)
        rows.append((f"ray, 2 actors, {n:,}-path manifest, no heatmaps", r))

    print(f"\n`python benchmarks/ray_audit.py {' '.join(sys.argv[1:])}` — {time.strftime('%Y-%m-%d')}, "
          f"{os.cpu_count()} CPUs, heatmaps {args.heatmaps}, batch {args.batch}\n")
    print("| engine | images | wall s | images/s | steady images/s | driver CPU ms/image | driver peak RSS MiB "
          "| actor peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        steady = f"{r['steady']:.0f}" if r["steady"] else "-"
        actor = f"{r['actor_rss_mib']:.0f}" if r["actor_rss_mib"] else "-"
        print(f"| {name} | {r['images']} | {r['wall']:.1f} | {r['images'] / r['wall']:.0f} | {steady} | "
              f"{1000 * r['cpu'] / r['images']:.2f} | {r['rss_mib']:.0f} | {actor} |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Tiled scoring: milliseconds per 2048² image and peak memory on a 12-MP image.

A tiled bundle (``anomaly train --tile-scale F``) scores an image as its grid of overlapping
``S x S`` tiles (:mod:`anomaly.data.tiling`), so its cost grows with the image's area at the tiling
scale while its memory should not grow with the number of tiles: the tiles go through the graph
``batch_size`` at a time and only the stitched map (plus its weights) is image-sized.

For each tile size it trains the default AAE on tiles for a few seconds (speed does not depend on
how well a model is trained), exports it, and measures in this process:

* ``Runtime.score_image`` on a 2048 x 2048 grayscale image (median of ``--repeats``), and the
  tiles per image and per second;
* in a fresh subprocess per case, the peak resident memory (``VmHWM``) of scoring one 4000 x
  3000 (12 MP) image, gray and RGB, against the same process after loading the bundle, and the
  size of that image's float32 input for scale.

Usage::

    python benchmarks/tiling_speed.py                         # tiles of 64 and 128 px
    python benchmarks/tiling_speed.py --tiles 64 --repeats 5

The header names the machine and the command; compare figures only within one run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _texture(rng: np.random.Generator, h: int, w: int, channels: int = 1) -> np.ndarray:
    """A smooth random texture, uint8 ``(h, w)`` or ``(h, w, 3)``."""
    import cv2

    base = rng.normal(0.5, 0.1, (max(2, h // 8), max(2, w // 8), channels)).astype(np.float32)
    img = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)
    img = img.reshape(h, w, channels)
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    out = (img * 255).astype(np.uint8)
    return out[:, :, 0] if channels == 1 else out


def _train_bundle(work: Path, tile: int, channels: int) -> Path:
    """A briefly trained tiled AAE on generated 512² textures (``channels`` 1 or 3)."""
    import cv2

    from anomaly.deploy.export import export_run
    from anomaly.training.config import TrainConfig
    from anomaly.training.run import train

    bundle = work / f"bundle_{tile}_{channels}"
    if (bundle / "model.json").is_file():
        return bundle
    data = work / f"data_{channels}"
    (data / "train" / "good").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        img = _texture(rng, 512, 512, channels)
        cv2.imwrite(str(data / "train" / "good" / f"{i:03d}.png"), img if channels == 1 else img[:, :, ::-1])
    cfg = TrainConfig(data=str(data), out=str(work / f"run_{tile}_{channels}"), model="aae", image_size=tile,
                      tile_scale=1.0, epochs=1, max_minutes=0.5, channels=channels, device="cpu", seed=0)
    train(cfg, tensorboard=False)
    return export_run(work / f"run_{tile}_{channels}", bundle)


_MEMORY_CHILD = r"""
import json, sys
import numpy as np
from anomaly.deploy.runtime import Runtime
def hwm():  # this process's peak RSS in MB (VmHWM; ru_maxrss would count the forking parent's too)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
bundle, h, w, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rt = Runtime(bundle, device="cpu")
rng = np.random.default_rng(0)
img = rng.integers(0, 256, (h, w) if c == 1 else (h, w, c), dtype=np.uint8)
rt.score_image(np.zeros((rt.preprocess.image_size * 2,) * 2, np.uint8))  # sessions and arenas warmed
before = hwm()
r = rt.score_image(img)
after = hwm()
print(json.dumps({"before_mb": before, "after_mb": after, "map": list(r.anomaly_map.shape)}))
"""


def peak_memory(bundle: Path, h: int, w: int, channels: int) -> dict:
    """Peak RSS (MB) of a fresh process scoring one ``h x w`` image, before and after the image."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(bundle), str(h), str(w), str(channels)],
                         capture_output=True, text=True, timeout=1200, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed(bundle: Path, side: int, repeats: int) -> dict:
    """Median ms of ``score_image`` on a ``side``² grayscale image, and its tile count."""
    from anomaly.data.tiling import tile_grid
    from anomaly.deploy.runtime import Runtime

    rt = Runtime(bundle, device="cpu")
    img = _texture(np.random.default_rng(1), side, side)
    rt.score_image(img)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rt.score_image(img)
        times.append(time.perf_counter() - t0)
    pre = rt.preprocess
    h, w = pre.input_size(side, side)
    tiles = len(tile_grid(h, w, pre.image_size, pre.overlap))
    ms = float(np.median(times)) * 1e3
    return {"ms": ms, "tiles": tiles, "tiles_per_s": tiles / (ms / 1e3), "threads": rt.threads}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", type=int, nargs="+", default=[64, 128], help="tile sizes (model input sides)")
    ap.add_argument("--side", type=int, default=2048, help="side of the timed square image (default 2048)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", default=None, help="folder for the bundles (default: a temporary one)")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tiling_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# tiled scoring speed and memory ({dt.date.today().isoformat()})\n")
    print(f"    python benchmarks/tiling_speed.py {shlex.join(sys.argv[1:] if argv is None else argv)}\n")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start; onnxruntime CPU provider, fp32, default AAE\n")
    print(f"| tile px | overlap px | tiles per {args.side}² | ms per {args.side}² image | tiles/s | threads |")
    print("|---:|---:|---:|---:|---:|---:|")
    rows = []
    for tile in args.tiles:
        bundle = _train_bundle(work, tile, 1)
        s = speed(bundle, args.side, args.repeats)
        from anomaly.data.preprocess import Preprocess

        ov = Preprocess(image_size=tile, tile_scale=1.0).overlap
        print(f"| {tile} | {ov} | {s['tiles']} | {s['ms']:.0f} | {s['tiles_per_s']:.0f} | {s['threads']} |", flush=True)
        rows.append((tile, bundle))
    print("\nPeak resident memory scoring one 4000 x 3000 (12 MP) image in a fresh process "
          "(VmHWM; 'loaded' = the peak after loading the bundle and one small warm-up image; the "
          "image itself, uint8, is made before that):\n")
    print("| tile px | image | float32 input MB | loaded MB | peak MB | growth MB | map |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for tile, bundle in rows:
        for channels in (1, 3):
            b = bundle if channels == 1 else _train_bundle(work, tile, 3)
            m = peak_memory(b, 3000, 4000, channels)
            print(f"| {tile} | {'gray' if channels == 1 else 'RGB'} | {3000 * 4000 * channels * 4 / 2**20:.0f} | "
                  f"{m['before_mb']:.0f} | {m['after_mb']:.0f} | {m['after_mb'] - m['before_mb']:.0f} | "
                  f"{m['map'][0]}x{m['map'][1]} |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Camera-sized inputs for the audit benchmarks: copies of existing images blown up to N px.

Inspection cameras give 2-12 MP frames while the model sees 128-256 px, so an audit of such
frames is bound by decoding, preprocessing, regions and heatmaps rather than by the model.
``anomaly bench --images`` and ``benchmarks/audit_split.py`` time that on whatever images they
get; this makes a reproducible set of them from the ELPV cells (or any images): every k-th input,
enlarged with bicubic interpolation to ``--size`` px square, stored as 3-channel RGB (as colour
cameras and most tools save even grey parts), PNG or JPEG (quality 95).

Usage::

    python benchmarks/large_inputs.py /tmp/q12/imgs /tmp/big_png --size 2048 --count 200 --format png
    anomaly bench bundle/ --images /tmp/big_png --audit-images 200 --device cpu --no-torch
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import cv2

    from anomaly.data.io import list_images

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="folder of images (recursive)")
    p.add_argument("dest", help="output folder (created)")
    p.add_argument("--size", type=int, default=2048, help="side of the square outputs in px (default 2048)")
    p.add_argument("--count", type=int, default=200, help="how many, spread evenly over the inputs (default 200)")
    p.add_argument("--format", choices=("png", "jpg"), default="png")
    args = p.parse_args(argv)
    if args.size < 1 or args.count < 1:
        p.error("--size and --count must be positive")
    src = list_images(args.src)
    if not src:
        p.error(f"no images in {args.src}")
    step = max(1, len(src) // args.count)
    picked = src[::step][:args.count]
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if args.format == "jpg" else []
    for i, path in enumerate(picked):
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            print(f"skipped unreadable {path}", file=sys.stderr)
            continue
        big = cv2.cvtColor(cv2.resize(img, (args.size, args.size), interpolation=cv2.INTER_CUBIC), cv2.COLOR_GRAY2BGR)
        out = dest / f"{path.stem}.{args.format}"
        if not cv2.imwrite(str(out), big, params):
            print(f"could not write {out}", file=sys.stderr)
            return 1
        print(f"\r{i + 1}/{len(picked)}", end="", file=sys.stderr)
    print(f"\n{len(picked)} images of {args.size}x{args.size} in {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

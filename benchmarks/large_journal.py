"""A million-image audit folder without auditing a million images: for timing resume and review.

A data team audits batches of 10^5-10^6 images. What then costs time and memory is not the model
but everything that reads the journal back: resuming (what is done, the CSV, the summary) and
``anomaly review`` (the page). This grows a real, small audit folder ``SRC`` (made by ``anomaly
audit``) into ``DEST``: its ``audit.json``, a ``results.jsonl`` of ``--count`` records that are
copies of ``SRC``'s records under other paths with other scores (drawn from ``SRC``'s own
scores, jittered; every ``--error-every``-th one a failure), the ``heatmaps/`` those records point
at, and ``list.txt`` with every path, so that ``anomaly audit BUNDLE DEST/list.txt --out DEST``
resumes a finished run (nothing left to score; a listed path need not exist).

Usage::

    anomaly audit bundle/ some_images/ --out /tmp/seed
    python benchmarks/large_journal.py /tmp/seed /tmp/million --count 1000000
    /usr/bin/time -v anomaly audit bundle/ /tmp/million/list.txt --out /tmp/million   # resume
    /usr/bin/time -v anomaly review /tmp/million                                        # the page
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="an `anomaly audit` output folder")
    p.add_argument("dest", help="output folder (created; must not hold an audit)")
    p.add_argument("--count", type=int, default=1_000_000, help="records to write (default 1,000,000)")
    p.add_argument("--error-every", type=int, default=1000, help="every N-th record is a failure (default 1000; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    src, dest = Path(args.src), Path(args.dest)
    if args.count < 1 or args.error_every < 0:
        p.error("--count must be positive and --error-every >= 0")
    base = [json.loads(line) for line in (src / "results.jsonl").read_text().splitlines() if line.strip()]
    base = [r for r in base if r.get("error") is None and r.get("score") is not None]
    if not (src / "audit.json").is_file() or not base:
        p.error(f"{src} is not an audit folder with scored images")
    if (dest / "results.jsonl").exists():
        p.error(f"{dest} already holds an audit")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "audit.json", dest / "audit.json")
    if (src / "heatmaps").is_dir():
        shutil.copytree(src / "heatmaps", dest / "heatmaps", dirs_exist_ok=True)
    threshold = (json.loads((src / "audit.json").read_text()).get("calibration") or {}).get("threshold")
    rng = np.random.default_rng(args.seed)
    scores = np.asarray([r["score"] for r in base], dtype=np.float64)
    picks = rng.integers(0, len(base), args.count)
    jitter = rng.normal(0.0, 0.05 * (scores.std() or 1.0), args.count)
    with open(dest / "results.jsonl", "w", encoding="utf-8") as journal, open(dest / "list.txt", "w", encoding="utf-8") as lst:
        for i in range(args.count):
            path = f"/data/line3/{i // 10_000:03d}/part{i:07d}.png"
            if args.error_every and i % args.error_every == args.error_every - 1:
                rec = {"id": f"part{i:07d}", "path": path, "score": None, "probability": None, "label": None,
                       "error": "cannot decode the image (truncated or not an image)"}
            else:
                score = float(np.float32(scores[picks[i]] + jitter[i]))
                rec = dict(base[picks[i]], id=f"part{i:07d}", path=path, score=score)
                if threshold is not None:
                    rec["label"] = int(score > threshold)
            journal.write(json.dumps(rec, allow_nan=False) + "\n")
            lst.write(path + "\n")
            if i % 50_000 == 0:
                print(f"\r{i}/{args.count}", end="", file=sys.stderr)
    size = (dest / "results.jsonl").stat().st_size
    print(f"\n{args.count} records ({size / 1e6:.0f} MB) in {dest}/results.jsonl; paths in {dest}/list.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())

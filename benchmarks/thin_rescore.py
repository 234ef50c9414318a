"""Score a trained run again with other export scorings on a thin/faint benchmark data set.

Re-exports RUN (an ``anomaly train`` folder) once per named scoring (``anomaly export``'s scoring
overrides, e.g. ``{"line_length": 31}``), scores CATEGORY's test set with
``benchmarks/thin_defects.py``'s ``score`` and bins it with its ``binned_metrics`` (pixel recall at 1 %
normal-pixel FPR, image AUROC), printing the all/kind/width/CNR rows; OUT/rows.json holds them all.
No training: what a scoring adds to the same model. Used for the line-part rows of
``benchmarks/results/2026-12-08-tiling-trials.md``.

Usage::

    python benchmarks/thin_rescore.py RUN CATEGORY OUT '{"l15": {"line_length": 15}, "l31": {"line_length": 31}}'
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(HERE.parent)):  # sibling benchmark modules, and the package from a checkout
    if _p not in sys.path:
        sys.path.insert(0, _p)


def main(argv: list[str] | None = None) -> int:
    from thin_defects import binned_metrics, score

    from anomaly.deploy.export import export_run

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    run, root, out = Path(args[0]), Path(args[1]), Path(args[2])
    variants = json.loads(args[3])
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, scoring in variants.items():
        bundle = export_run(run, out / f"b_{name}", scoring=scoring)
        normal, defects = score(bundle, root, 1)
        rep = binned_metrics(normal["scores"], normal["maps"], defects, 0.01)
        rows[name] = {"scoring": scoring, "ms_per_image": normal["ms_per_image"], "groups": rep["groups"]}
        print(name, json.dumps(scoring), "ms/image", normal["ms_per_image"], flush=True)
        for g in rep["groups"]:
            if g["by"] in ("all", "kind", "width", "cnr"):
                print(f"  {g['by']:6s} {g['group']:14s} n={g['n']:3d} image AUROC {g['image_auroc']:.3f} "
                      f"pixel recall {g['pixel_recall']:.3f} per-defect {g['defect_recall']:.3f}", flush=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

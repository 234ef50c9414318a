"""``anomaly export | calibrate | audit``. Export imports torch when it runs; calibrate and audit
never do (they run on a line PC with the base install)."""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained run to an ONNX bundle (needs the [train] extra)",
                       description="Export RUN (an `anomaly train` folder) to OUT/model.onnx + OUT/model.json.")
    p.add_argument("run", help="run folder written by `anomaly train`")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"))
    p.add_argument("--residual", default=None, help="override the residual kind (l1, l2, ssim, gms, ms, l1_ssim)")
    p.add_argument("--smoothing-sigma", type=float, default=None)
    p.add_argument("--aggregate", default=None, choices=("max", "mean", "topk"))
    p.add_argument("--normalize", action="store_true", help="per-pixel normalisation by validation residual statistics")
    p.set_defaults(func=_export)

    p = sub.add_parser("calibrate", help="fit thresholds on held-out images into the bundle's sidecar",
                       description="Score held-out images with the bundle and write calibrated thresholds into model.json.")
    p.add_argument("bundle")
    p.add_argument("--normal", required=True, help="folder of held-out normal images")
    p.add_argument("--defects", default=None, help="folder of defective images (enables f1/youden and probabilities)")
    p.add_argument("--masks", default=None, help="folder of masks <name>_mask.png for the defective images")
    p.add_argument("--method", default="fpr", choices=("fpr", "sigma", "percentile", "f1", "youden"))
    p.add_argument("--target-fpr", type=float, default=0.01, help="for --method fpr (default 0.01)")
    p.add_argument("--k", type=float, default=3.0, help="for --method sigma: mean + k*std")
    p.add_argument("--percentile", type=float, default=99.0, help="for --method percentile")
    p.add_argument("--probability", default=None, choices=("isotonic", "logistic"), help="fit P(defect) (needs --defects)")
    p.add_argument("--pixel-fpr", type=float, default=0.001)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("audit", help="score images with a bundle; write results.csv and heatmaps",
                       description="Score files and folders with onnxruntime (no torch needed).")
    p.add_argument("bundle")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-heatmaps", dest="heatmaps", action="store_false", help="skip heatmap overlays")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or tensorrt")
    p.add_argument("--category", default=None, help="category for conditional models")
    p.set_defaults(func=_audit)


def _export(args: argparse.Namespace) -> int:
    from deploy.export import export_run

    scoring = {k: v for k, v in {"residual": args.residual, "smoothing_sigma": args.smoothing_sigma,
                                  "aggregate": args.aggregate}.items() if v is not None}
    out = export_run(args.run, args.out, checkpoint=args.checkpoint, scoring=scoring, normalize=args.normalize)
    meta = json.loads((out / "model.json").read_text())
    print(f"exported {out}/model.onnx and {out}/model.json")
    if meta.get("parity"):
        par = meta["parity"]
        print(f"onnxruntime vs torch on {par['images']} validation images: max |score diff| {par['max_abs_diff_score']:.2e}, "
              f"max |map diff| {par['max_abs_diff_map']:.2e}")
    if meta.get("calibration"):
        print(f"default threshold {meta['calibration']['image']['threshold']:.6g} (1% FPR on validation images); "
              "run `anomaly calibrate` on held-out normal images to replace it")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from deploy.calibrate import calibrate_bundle

    rep = calibrate_bundle(args.bundle, args.normal, defects=args.defects, masks=args.masks, method=args.method,
                           target_fpr=args.target_fpr, k=args.k, percentile=args.percentile,
                           probability=args.probability, pixel_fpr=args.pixel_fpr, device=args.device)
    print(f"calibrated {args.bundle}/model.json with method {rep['method']} on {rep['n_normal']} normal images from {rep['normal']}"
          + (f" and {rep['n_defects']} defective images from {rep['defects']}" if rep["defects"] else ""))
    print(f"image threshold: {rep['threshold']:.6g}; false-positive rate on these normal images: {rep['expected_fpr']:.2%}")
    if rep["recall"] is not None:
        print(f"recall on these defective images: {rep['recall']:.2%}")
    print(f"pixel threshold: {rep['pixel_threshold']:.6g} ({rep['pixel_method']})")
    if rep["failed"]:
        print(f"{len(rep['failed'])} image(s) could not be read and were skipped, e.g. {rep['failed'][0]['path']}: "
              f"{rep['failed'][0]['error']}", file=sys.stderr)
    return 0


def _audit(args: argparse.Namespace) -> int:
    from deploy.audit import run_audit

    def progress(done: int, total: int) -> None:
        if done == total or done % 16 == 0:
            sys.stderr.write(f"\r  {done}/{total} images\033[K")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    s = run_audit(args.bundle, args.inputs, args.out, batch_size=args.batch_size, heatmaps=args.heatmaps,
                  device=args.device, category=args.category, progress=progress)
    thr = "uncalibrated" if s["threshold"] is None else f"{s['threshold']:.6g}"
    print(f"{s['images']} images, {s['flagged']} flagged, {s['failed']} failed; threshold {thr}; "
          f"{s['images_per_second'] or 0:.1f} images/s")
    print(f"results: {s['results']}" + (f"; heatmaps: {s['heatmaps']}" if s["heatmaps"] else ""))
    return 0

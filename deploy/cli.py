"""``anomaly export | calibrate | audit | review``. Export imports torch when it runs; calibrate, audit and
review never do (they run on a line PC with the base install)."""
from __future__ import annotations

import argparse
import json
import sys

from anomaly.data.progress import MODES, CountProgress  # torch-free, imports nothing heavy

__all__ = ["add_parsers"]

_PROGRESS_HELP = ("auto: a live bar with ETA on a terminal, a line every 30 s and at the end otherwise, as in logs "
                  "and CI (default); bar, lines or none to choose; on stderr")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained run to an ONNX bundle (needs the [train] extra)",
                       description="Export RUN (an `anomaly train` folder) to OUT/model.onnx + OUT/model.json.")
    p.add_argument("run", help="run folder written by `anomaly train`")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"))
    p.add_argument("--residual", default=None, help="override the residual kind (l1, l2, ssim, gms, ms, l1_ssim; with a segmenter also learned, l1_learned, …)")
    p.add_argument("--smoothing-sigma", type=float, default=None)
    p.add_argument("--aggregate", default=None, choices=("max", "mean", "topk"))
    p.add_argument("--colour", default=None, choices=("rgb", "ycc"),
                   help="RGB models: the space of the l1 / l2 differences. ycc gives hue and saturation two of "
                        "three votes (finds discolouration better, brightness-only defects a little worse; default: "
                        "the run's setting, rgb)")
    p.add_argument("--texture-stats", action=argparse.BooleanOptionalAction, default=None,
                   help="add to the map the distance of the input's local texture statistics to those of the normal "
                        "training images (finds patches of a foreign texture that the repair lets through; images of "
                        "at least 32 px; default: the run's setting, off)")
    p.add_argument("--progress", default="auto", choices=MODES,
                   help="auto: a live bar on a terminal, a line every 30 s and at the end otherwise (default)")
    p.add_argument("--line-length", type=int, default=None, metavar="PX",
                   help="add to the map the residual filtered by straight 1 px lines of this length (8 orientations, "
                        "the largest response): thin scratches and cracks near the noise sum along their length "
                        "(default: the run's setting, off; 0 turns it off)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="per-pixel normalisation by validation residual statistics (default: on with >= 16 validation images)")
    p.add_argument("--tta", default="none", choices=("none", "flips"),
                   help="flips: average the maps of the image and its three flips (the orientations --augment flip "
                        "trains on); four times the inference, less orientation noise in the maps")
    p.add_argument("--latent", default=None, choices=("auto", "none", "knn"),
                   help="knn: add to the image score the distance of the image's code to its 5 nearest codes of normal "
                        "training images (encoder-decoder models; the graph carries the codes). auto (default, unless "
                        "the run's scoring names one): knn for aae and cond_aae up to 64x64 (measured to help there, to hurt at "
                        "128x128), none otherwise")
    p.add_argument("--int8", metavar="CALIB_DIR", default=None,
                   help="also write OUT_int8/: int8 static quantisation for CPUs, activation ranges calibrated on the "
                        "normal images in CALIB_DIR (e.g. the training folder)")
    p.add_argument("--fp16", action="store_true", help="also write OUT_fp16/: float16 reconstructor for CUDA/TensorRT")
    p.set_defaults(func=_export)

    p = sub.add_parser("calibrate", help="fit thresholds on held-out images into the bundle's sidecar",
                       description="Score held-out images with the bundle and write calibrated thresholds into model.json.")
    p.add_argument("bundle")
    p.add_argument("--normal", default=None, help="folder of held-out normal images (required unless --reviews)")
    p.add_argument("--reviews", default=None, help="decisions JSON from `anomaly review` (defect / false alarm): refit the threshold")
    p.add_argument("--defects", default=None, help="folder of defective images (enables f1/youden and probabilities)")
    p.add_argument("--masks", default=None, help="folder of masks <name>_mask.png for the defective images")
    p.add_argument("--method", default="fpr", choices=("fpr", "sigma", "percentile", "f1", "youden"))
    p.add_argument("--target-fpr", type=float, default=0.01, help="for --method fpr (default 0.01)")
    p.add_argument("--k", type=float, default=3.0, help="for --method sigma: mean + k*std")
    p.add_argument("--percentile", type=float, default=99.0, help="for --method percentile")
    p.add_argument("--probability", default=None, choices=("isotonic", "logistic"), help="fit P(defect) (needs --defects)")
    p.add_argument("--pixel-fpr", type=float, default=0.001)
    p.add_argument("--category", default=None,
                   help="conditional models of several categories: the category of these images; its thresholds "
                        "are stored for it alone and used when the bundle runs for it (audit --category)")
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", default="auto", choices=MODES, help=_PROGRESS_HELP)
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("audit", help="score images with a bundle; write results (csv + jsonl), heatmaps, masks",
                       description="Score files, folders, globs and list files with onnxruntime (no torch needed). "
                                   "Results are journaled to OUT/results.jsonl as each image finishes; rerunning with the "
                                   "same --out resumes where a killed run stopped.")
    p.add_argument("bundle")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (recursive), globs ('line3/**/*.png'), list files (.txt/.lst: one path a "
                        "line) or manifests (.csv/.parquet with a 'path' column)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--heatmaps", dest="heatmaps", nargs="?", const="all", default="all", choices=("all", "flagged", "none"),
                   help="heatmap overlays in OUT/heatmaps: for all images (the default), only "
                        "the flagged ones (a line where most parts pass: no file and ~0.7 ms of CPU per passed image), "
                        "or none")
    p.add_argument("--no-heatmaps", dest="heatmaps", action="store_const", const="none", help="same as --heatmaps none")
    p.add_argument("--heatmap-size", type=int, default=None, metavar="PX",
                   help="longest side of the heatmaps (default 1024, and the input's own size for a tiled bundle): "
                        "larger inputs are shrunk for them (2048 px images: 53 kB instead of 153 kB a file, a fifth "
                        "of the overlay's CPU); 0: the input's own size")
    p.add_argument("--masks", action="store_true", help="binary region masks (PNG, original resolution) in OUT/masks")
    p.add_argument("--save-maps", action="store_true", help="raw float32 anomaly maps (.npy, model resolution) in OUT/maps")
    p.add_argument("--reconstructions", action="store_true", help="the model's reconstruction (PNG) in OUT/reconstructions")
    p.add_argument("--thumbnail-size", type=int, default=256, help="longest side of OUT/thumbs/*.jpg for `anomaly review` (0: none); written only "
                   "for inputs over twice this size or in formats a browser cannot show (or with --heatmaps none)")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="skip images already in OUT/results.jsonl (default)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="refuse to run if OUT already holds results")
    p.add_argument("--force", action="store_true", help="delete previous audit outputs in OUT and start over")
    p.add_argument("--fail-on-anomaly", action="store_true", help="exit with status 1 when any image is flagged")
    p.add_argument("--workers", type=int, default=None, help="threads that write the image files (default: up to 4)")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="threads that read and preprocess images (default: the physical cores on the CPU, "
                        "up to 4 with a GPU provider)")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime intra-op threads (default: the physical cores on the CPU, 1 with a GPU provider)")
    p.add_argument("--tf32", action="store_true",
                   help="let CUDA compute float32 in TF32: faster pure inference, scores off by ~1e-4 relative")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or tensorrt")
    p.add_argument("--category", default=None, help="category for conditional models")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="where the images are scored: this process (default) or a pool of Ray Data actors, each "
                        "holding one runtime (needs the [ray] extra; the bundle, inputs and --out must be paths "
                        "every node sees)")
    p.add_argument("--address", default=None,
                   help="Ray cluster for --engine ray: auto (the one `ray start` made here) or HOST:PORT "
                        "(default: a local Ray for this audit)")
    p.add_argument("--actors", type=int, default=None, help="Ray actors for --engine ray (default: one per cluster CPU)")
    p.add_argument("--progress", default="auto", choices=MODES,
                   help=_PROGRESS_HELP + "; counts the images still to do, with those done before (skipped), "
                        "flagged and failed")
    p.set_defaults(func=_audit)

    p = sub.add_parser("review", help="write (and optionally serve) OUT/report.html to review an audit",
                       description="Build a self-contained HTML report of an `anomaly audit` folder: images sorted by score, "
                                   "heatmap overlays, regions, the normal-score histogram with the threshold, a live "
                                   "threshold slider, and defect / false-alarm decisions saved as JSON for "
                                   "`anomaly calibrate --reviews`.")
    p.add_argument("out", help="folder written by `anomaly audit`")
    p.add_argument("--serve", action="store_true", help="serve the report on http://127.0.0.1:PORT; decisions are saved to OUT/decisions.json "
                                                        "(the printed URL carries the token that saving needs)")
    p.add_argument("--port", type=int, default=8765, help="port for --serve (0: any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address for --serve (default 127.0.0.1, this machine only; any other address lets whoever "
                        "reaches it view the images and results; requests must name it in their Host header)")
    p.add_argument("--open", action="store_true", help="open the report in the default browser")
    p.add_argument("--max-rows", type=int, default=20_000, metavar="N",
                   help="list the N highest-scoring images in full (and up to N failures, and every decided image); "
                        "counts, histogram and slider always cover all images. 0: list all (default: %(default)s)")
    p.set_defaults(func=_review)


def _export(args: argparse.Namespace) -> int:
    from anomaly.deploy.export import export_run

    scoring = {k: v for k, v in {"residual": args.residual, "smoothing_sigma": args.smoothing_sigma,
                                  "aggregate": args.aggregate, "colour": args.colour}.items() if v is not None}
    if args.texture_stats is not None:
        scoring["texture"] = "stats" if args.texture_stats else "none"
    if args.line_length is not None:
        scoring["line_length"] = args.line_length
    try:
        with CountProgress(desc="export", unit="inputs", mode=args.progress) as show:
            out = export_run(args.run, args.out, checkpoint=args.checkpoint, scoring=scoring, normalize=args.normalize,
                             tta=args.tta, latent=args.latent, progress=show)
    except ValueError as exc:  # scoring settings the run cannot take (residual, colour, latent, ...)
        print(f"anomaly export: error: {exc}", file=sys.stderr)
        return 2
    meta = json.loads((out / "model.json").read_text())
    print(f"exported {out}/model.onnx and {out}/model.json"
          + (" (test-time augmentation: each image and its 3 flips, 4x the inference)" if args.tta == "flips" else ""))
    if meta["scoring"].get("latent", "none") != "none":
        bank = meta["scoring"]["latent_bank"]
        print(f"image score: map aggregate + distance to the {meta['scoring']['latent_k']} nearest of {bank['codes']} "
              f"normal training codes (--latent none for the map alone)")
    if meta["scoring"].get("texture", "none") == "stats":
        print(f"map: residual + {meta['scoring']['texture_weight']:g} x distance to the nearest of "
              f"{meta['scoring']['texture_stats']['centres']} normal texture-statistics centres, each standardised")
    if meta.get("parity"):
        par = meta["parity"]
        # in the units decisions are made in: the normal scores' spread, the pixel threshold
        spread = (meta.get("normal_stats") or {}).get("std")
        pixel = ((meta.get("calibration") or {}).get("pixel") or {}).get("threshold")
        score_rel = f" ({100 * par['max_abs_diff_score'] / spread:.2g} % of the normal scores' spread)" if spread else ""
        map_rel = f" ({100 * par['max_abs_diff_map'] / abs(pixel):.2g} % of the pixel threshold)" if pixel else ""
        unit = "tiles of the validation images" if par.get("unit") == "tiles" else "validation images"
        print(f"onnxruntime vs torch on {par['images']} {unit}: max |score diff| {par['max_abs_diff_score']:.2e}"
              f"{score_rel}, max |map diff| {par['max_abs_diff_map']:.2e}{map_rel}")
    if meta.get("calibration"):
        print(f"default threshold {meta['calibration']['image']['threshold']:.6g} (1% FPR on validation images); "
              "run `anomaly calibrate` on held-out normal images to replace it")
    if args.int8 or args.fp16:
        from anomaly.deploy.quantize import convert_fp16, quantize_int8

        if args.int8:
            q = quantize_int8(out, out.parent / f"{out.name}_int8", args.int8)
            agree = json.loads((q / "model.json").read_text())["quantization"]["agreement_on_calibration_images"]
            print(f"int8 bundle {q} (calibrated on {agree['images']} images from {args.int8}; max |score diff| vs fp32 "
                  f"{agree['max_abs_score_diff']:.2e}" + (f", Spearman {agree['score_spearman']:.4f}" if "score_spearman" in agree else "")
                  + "); thresholds copied from fp32: refit with `anomaly calibrate`")
        if args.fp16:
            h = convert_fp16(out, out.parent / f"{out.name}_fp16")
            print(f"fp16 bundle {h} (for --device cuda/tensorrt; on a CPU use the fp32 or int8 bundle)")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from anomaly.deploy.calibrate import CalibrationError, calibrate_bundle

    if args.normal is None and args.reviews is None:
        raise CalibrationError("calibrate needs --normal (a folder of held-out normal images) and/or --reviews "
                               "(decisions JSON from `anomaly review`)")
    with CountProgress(desc="calibrate", unit="images", mode=args.progress) as show:
        rep = calibrate_bundle(args.bundle, args.normal, defects=args.defects, masks=args.masks, method=args.method,
                               target_fpr=args.target_fpr, k=args.k, percentile=args.percentile,
                               probability=args.probability, pixel_fpr=args.pixel_fpr, device=args.device,
                               reviews=args.reviews, category=args.category, progress=show)
    if rep.get("reviews"):
        rv = rep["reviews"]
        old = "none" if rv["previous_threshold"] is None else f"{rv['previous_threshold']:.6g}"
        change = "unchanged" if not rv["changed"] else f"{old} -> {rep['threshold']:.6g}"
        print(f"reviews {args.reviews}: {rv['n_defect']} defect(s), {rv['n_false_alarm']} false alarm(s); rule: {rv['rule']}")
        print(f"image threshold: {change}")
        print(f"on the reviewed images: {rv['defects_flagged']}/{rv['n_defect']} defects still flagged, "
              f"{rv['false_alarms_flagged']}/{rv['n_false_alarm']} false alarms still flagged "
              f"(before: {rv['defects_flagged_before']}/{rv['n_defect']} and {rv['false_alarms_flagged_before']}/{rv['n_false_alarm']})")
        if args.normal is None:
            print(f"wrote {args.bundle}/model.json (pixel threshold and normal-score histogram kept)")
            return 0
    print(f"calibrated {args.bundle}/model.json" + (f" for category {rep['category']}" if rep.get("category") else "")
          + f" with method {rep['method']} on {rep['n_normal']} normal images from {rep['normal']}"
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
    from anomaly.deploy.audit import AuditError, AuditProgress, run_audit

    show = CountProgress(desc="audit", unit="images", mode=args.progress)

    def progress(p: AuditProgress) -> None:
        extra = {"skipped": p.skipped} if p.skipped else {}
        show(p.done, p.total, seconds=p.seconds, **extra, flagged=p.flagged, failed=p.failed)

    try:
        with show:
            s = run_audit(args.bundle, args.inputs, args.out, batch_size=args.batch_size, heatmaps=args.heatmaps,
                          heatmap_size=args.heatmap_size,
                          masks=args.masks, save_maps=args.save_maps, reconstructions=args.reconstructions,
                          thumbnail=args.thumbnail_size, resume=args.resume, force=args.force, workers=args.workers,
                          decode_workers=args.decode_workers, threads=args.threads, tf32=args.tf32,
                          device=args.device, category=args.category, engine=args.engine, ray_address=args.address,
                          actors=args.actors, progress=progress)
    except AuditError as exc:
        print(f"anomaly audit: error: {exc}", file=sys.stderr)
        return 2
    thr = "uncalibrated" if s["threshold"] is None else f"{s['threshold']:.6g}"
    resumed = f" ({s['skipped']} from an earlier run)" if s["skipped"] else ""
    print(f"{s['images']} images{resumed}, {s['flagged']} flagged, {s['failed']} failed; threshold {thr}; "
          f"{s['images_per_second'] or 0:.1f} images/s")
    if s["failed"]:
        print(f"{s['failed']} image(s) could not be scored: see the error column of {s['results']}", file=sys.stderr)
    made = [k for k in ("heatmaps", "masks", "maps", "reconstructions") if s[k]]
    print(f"results: {s['results']} and {s['journal']}" + (f"; {', '.join(made)} in {args.out}" if made else ""))
    if args.fail_on_anomaly and s["flagged"]:
        return 1
    return 0


def _review(args: argparse.Namespace) -> int:
    from anomaly.deploy.review import ReviewError, build_report, serve_report

    try:
        report = build_report(args.out, max_rows=args.max_rows)
    except ReviewError as exc:
        print(f"anomaly review: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {report}")
    if not args.serve:
        if args.open:
            import webbrowser

            webbrowser.open(report.resolve().as_uri())
        return 0
    try:
        server = serve_report(args.out, port=args.port, build=False, host=args.host)
    except OSError as exc:
        print(f"anomaly review: error: cannot serve on {args.host}:{args.port} ({exc}); try --port 0", file=sys.stderr)
        return 2
    url = server.url
    print(f"serving {url} (decisions are saved to {args.out}/decisions.json); Ctrl-C to stop", flush=True)
    if args.open:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # the normal way to stop serving
        print("stopped")
    finally:
        server.server_close()
    return 0

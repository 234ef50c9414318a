"""Where the audit's CPU time goes, per image: decode, inference, overlay, file writing, regions.

``anomaly bench`` says how fast the audit is against pure inference; this says why. It runs
:func:`anomaly.deploy.audit.run_audit` once with each stage wrapped in a per-thread CPU clock
(``time.thread_time``: the CPU of the thread that ran the stage, whatever the other threads did,
so the figures add up on a machine whose cores are all busy) and prints milliseconds of CPU per
image:

=============  ==============================================================================
``decode``     reading the file and preprocessing it (``Runtime._decode``, worker threads)
``infer``      the onnxruntime graph (``Runtime.infer``, one intra-op thread per worker)
``finish``     everything per image after inference (``anomaly.deploy.render.finish_record``, writer threads),
               of which ``overlay`` (heatmap colouring) and ``write`` (encoding + creating the
               file)
``regions``    defect regions: ``Runtime.regions`` in the worker threads after inference (a
               look at the map's maximum for every image, the tracing for those over the pixel
               threshold), and ``find_regions`` in ``finish`` when masks are written
``main``       the calling thread: journal, CSV, hand-offs
``process``    the whole process (user + system) over the same span, and its system share; and
               in steady state (from a quarter of the images to the moment the inputs run out,
               with as many images in flight at both ends: without the start)
=============  ==============================================================================

OpenCV's own worker threads, if any, are in ``process`` but not in the stages. Stages are wrapped
by patching module attributes, so this is a measuring tool, not an API.

``--ceiling`` estimates how much of pure inference the audit's own work leaves room for on this
machine's CPU. It runs the audit with the least parallelism (the runtime decoding and inferring in
the calling thread with one onnxruntime thread, one file writer) and takes the process's CPU per
image in steady state: the work itself, with no time lost to threads competing for the cores and
none to the start. ``cores x 1000 / that`` is the rate at which the cores would finish that work if
it split over them without loss, and its ratio to the float32 graph at the same batch (the best of
``--windows`` windows, as ``anomaly bench`` times its reference) is the share the work allows. An
estimate, not a bound: the pipelined audit runs one single-threaded graph per core, which can use a
core a little better than one graph on two threads does, and has kept a few points more in some
runs. The audit's default mode is measured (heatmaps for every image).

Usage::

    python benchmarks/audit_split.py BUNDLE IMAGES... [--out DIR] [--batch-size 16]
    python benchmarks/audit_split.py BUNDLE IMAGES... --ceiling [--repeats 3] [--windows 5]
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

for _p in (str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)):  # package, sibling modules
    if _p not in sys.path:
        sys.path.insert(0, _p)

STAGES = ("decode", "infer", "finish", "overlay", "write", "regions")


def measure(bundle: str, inputs: list[str], out_dir: str | None = None, batch_size: int = 16,
            device: str = "cpu", sequential: bool = False, cleanup: bool = True) -> dict[str, Any]:
    """Run one audit with per-stage CPU clocks; returns ``{"images", "images_per_second",
    "ms_per_image": {stage: ms}, "calls": {stage: n}, "heatmap_kb"}`` (``main`` and ``process``
    included; ``heatmap_kb``: mean size of the heatmap files written). ``sequential``: the runtime
    decodes and infers in the calling thread with one onnxruntime thread, and one thread writes.
    ``cleanup``: delete the audit's output at the end (else it stays in ``out_dir``)."""
    import anomaly.deploy.audit as audit
    import anomaly.deploy.render as render
    import anomaly.deploy.regions as regions
    from anomaly.deploy.runtime import Runtime

    cpu: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    lock = threading.Lock()
    patched: list[tuple[Any, str, Callable]] = []
    caller = threading.get_ident()
    in_caller = [0.0]  # stage CPU spent in the calling thread (the sequential runtime's), kept out of ``main``

    def wrap(owner: Any, name: str, stage: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                dt = time.thread_time() - t
                with lock:
                    cpu[stage] += dt
                    calls[stage] += 1
                    if threading.get_ident() == caller and owner is Runtime:
                        in_caller[0] += dt

        patched.append((owner, name, original))
        setattr(owner, name, timed)

    for owner, name, stage in ((Runtime, "_decode", "decode"), (Runtime, "infer", "infer"), (render, "finish_record", "finish"),
                               (render, "heatmap_overlay", "overlay"), (render, "write_image", "write"),
                               (regions, "find_regions", "regions"), (Runtime, "regions", "regions")):
        wrap(owner, name, stage)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="audit-split-", dir=out_dir)
    try:
        # the totals from the process's CPU clock (nanoseconds; os.times counts 10-ms ticks, too coarse
        # for a short audit), the system share from os.times
        c0, p0, m0 = os.times(), time.process_time(), time.thread_time()
        least = {"decode_workers": 0, "threads": 1, "workers": 1} if sequential else {}
        ticks: list[tuple[int, float]] = []

        def tick(p: Any) -> None:
            ticks.append((p.done, time.process_time()))

        summary = audit.run_audit(bundle, inputs, Path(tmp) / "out", batch_size=batch_size, device=device,
                                  progress=tick, **least)
        c1, p1, m1 = os.times(), time.process_time(), time.thread_time()
        heatmaps = [f.stat().st_size for f in (Path(tmp) / "out" / "heatmaps").glob("*.jpg")]
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
        if cleanup:
            shutil.rmtree(tmp, ignore_errors=True)
    n = max(1, int(summary["images"]))
    ms = {stage: cpu[stage] / n * 1e3 for stage in STAGES}
    ms["main"] = (m1 - m0 - in_caller[0]) / n * 1e3
    ms["process"] = (p1 - p0) / n * 1e3
    ms["process_system"] = (c1.system - c0.system) / n * 1e3
    # the process in steady state: from a quarter of the images (and a full pipeline) to the moment
    # the inputs run out, with as many images in flight at both ends (as `anomaly bench` times the
    # audit's rate); without the start (session, first batches) that a long audit spreads thin
    from anomaly.deploy.bench import audit_in_flight

    in_flight = audit_in_flight(bundle, device, batch_size, 0 if sequential else None)
    lo, hi = max(n / 4, in_flight), n - in_flight
    span = [(done, c) for done, c in ticks if lo <= done <= hi]
    if len(span) >= 2 and span[-1][0] > span[0][0]:
        ms["process_steady"] = (span[-1][1] - span[0][1]) / (span[-1][0] - span[0][0]) * 1e3
    else:
        ms["process_steady"] = ms["process"]
    return {"images": n, "images_per_second": summary["images_per_second"], "ms_per_image": ms, "calls": dict(calls),
            "heatmap_kb": sum(heatmaps) / len(heatmaps) / 1e3 if heatmaps else None}


def ceiling(bundle: str, inputs: list[str], out_dir: str | None = None, batch_size: int = 16, repeats: int = 3,
            windows: int = 5, seconds: float = 1.5) -> dict[str, Any]:
    """The share of pure inference that the audit's own work allows on this machine (see the module
    docstring).

    Returns ``{"images", "cpu_ms_per_image": [per repeat], "cores", "ceiling_images_per_second",
    "reference_images_per_second": [per window], "share", "split"}``: ``share`` divides the ceiling
    (from the lowest CPU per image) by the fastest reference window; ``split``: :func:`measure`'s
    result for that repeat.
    """
    from anomaly.deploy.runtime import Runtime, physical_cores
    from harness import graph_windows

    # the outputs are deleted only at the end: for about a minute after thousands of files are
    # deleted, ext4 makes each new one cost several times more (see `anomaly bench`'s audit rows)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    root = tempfile.mkdtemp(prefix="audit-ceiling-", dir=out_dir)
    try:
        runs = [measure(bundle, inputs, root, batch_size, "cpu", sequential=True, cleanup=False)
                for _ in range(max(1, repeats))]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cpu_ms = [r["ms_per_image"]["process_steady"] for r in runs]
    cores = physical_cores()
    rt = Runtime(bundle, device="cpu")  # the reference: the runtime's default threads, as `anomaly bench`
    ref = graph_windows(rt, batch_size, inputs[0], seconds, windows)
    lowest = min(runs, key=lambda r: r["ms_per_image"]["process_steady"])
    best = cores * 1e3 / lowest["ms_per_image"]["process_steady"]
    return {"images": lowest["images"], "cpu_ms_per_image": cpu_ms, "cores": cores, "ceiling_images_per_second": best,
            "reference_images_per_second": ref, "share": best / max(ref), "split": lowest}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("inputs", nargs="+", help="images, folders, globs or list files, as for `anomaly audit`")
    p.add_argument("--out", default=None, help="folder for the audit's temporary output (default: the system's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, tensorrt or auto")
    p.add_argument("--ceiling", action="store_true",
                   help="estimate the share of pure inference that the audit's own work allows on this CPU (see above)")
    p.add_argument("--repeats", type=int, default=3, help="--ceiling: sequential audits (the lowest CPU per image counts)")
    p.add_argument("--windows", type=int, default=5, help="--ceiling: reference windows of 1.5 s (the fastest counts)")
    args = p.parse_args(argv)
    if args.ceiling:
        c = ceiling(args.bundle, args.inputs, args.out, args.batch_size, args.repeats, args.windows)
        print(f"sequential audits (heatmaps for every image): CPU ms per image in steady state "
              f"{', '.join(f'{v:.2f}' for v in c['cpu_ms_per_image'])}; the lowest:")
        _print_split(c["split"])
        print(f"that work on {c['cores']} cores without loss: {c['ceiling_images_per_second']:.0f} images/s; onnxruntime fp32 batch "
              f"{args.batch_size}: {', '.join(f'{v:.0f}' for v in c['reference_images_per_second'])} images/s")
        print(f"share of pure inference that this work allows (an estimate): {c['share']:.0%}")
        return 0
    _print_split(measure(args.bundle, args.inputs, args.out, args.batch_size, args.device))
    return 0


def _print_split(r: dict[str, Any]) -> None:
    ms = r["ms_per_image"]
    print(f"{r['images']} images, {r['images_per_second']:.0f} images/s; CPU ms per image "
          f"(process {ms['process']:.2f}, of which system {ms['process_system']:.2f}; in steady state "
          f"{ms['process_steady']:.2f}); heatmaps "
          f"{r['heatmap_kb']:.1f} kB on average:")
    for stage in ("decode", "infer", "finish", "overlay", "write", "regions", "main"):
        print(f"  {stage:8s} {ms[stage]:6.3f}" + (f"   ({r['calls'][stage]} calls)" if stage in r["calls"] else ""))


if __name__ == "__main__":
    raise SystemExit(main())

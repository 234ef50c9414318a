"""``anomaly bench``: how fast a bundle scores images, engine by engine, and what the audit keeps.

For batch 1 and batch N it times the exported graph on the same preprocessed inputs with

* **torch eager** — the run's model rebuilt from the run folder recorded in the sidecar
  (:func:`anomaly.deploy.export.load_run`, the same :class:`anomaly.scoring.Scorer` settings); only when
  torch is installed and that folder is still there; on the CPU, and on CUDA (float32 and float16
  autocast, each call copying the batch in and every output back, as onnxruntime's does) when the
  devices include a GPU that torch sees;
* **onnxruntime** — the float32 bundle, and its int8 / fp16 variants (``--variants`` or the
  sibling folders ``<bundle>_int8`` / ``<bundle>_fp16`` that ``anomaly export --int8/--fp16``
  write), on the CPU and, where onnxruntime-gpu and a GPU are there, CUDA / TensorRT (fp16 only
  on a GPU: a CPU has no float16 kernels worth timing; int8 only on the CPU, its target);

``--device`` takes one device or a comma list (``cpu,cuda``); ``--gpu-batch-sizes`` adds batch
sizes timed on GPU devices only (a GPU needs hundreds of images per call to fill: on an H200 the
default AAE at 256² ran 5,300 images/s at batch 16 and 6,300 at 256 in float32, 7,300 in float16).
A row that cannot run (no such device, out of memory) says why in its note and the table goes on.

and reports images/s and per-call latency p50/p99. Then it runs the whole audit
(:func:`anomaly.deploy.audit.run_audit`: decode -> score -> results.csv + heatmap JPEGs) on a folder of
images and gives its rate as a fraction of the float32 graph's images/s at batch N. A second audit
row writes heatmaps only for the flagged images (``anomaly audit --heatmaps flagged``; its note says
how many were flagged, which sets what it spares), a third writes no image files (journal and CSV
only), and the first row's note gives what creating one file costs on the audit's disk, so a slow
disk and a slow pipeline can be told apart.

The audit's rate is its steady state, as the graph's rate is timed after warm-up calls: the images
finished per second from a quarter of the run until the inputs run out (:class:`AuditRate`), which
leaves out the start-up (reading the first batches, the first graph runs: a quarter of a second
before the first image on a 2-core CPU, a third of a 256-image audit) and the drain at the end. That
is what a long audit runs at; the note gives the start-up and the whole run's rate beside it.

The fraction's reference is the float32 graph at batch N at its fastest: the best of the table's row
and of short windows (``reference_seconds`` each) timed before every audit repeat and after the
last, so both sides of the fraction are a best of several, timed in the same minutes. On a shared
VM a single 20-call window (under a second) can catch a slow moment: on 2026-11-22 two runs a minute
apart timed the graph row at 409 and 322 images/s, against 498 in an earlier run, and the audit
read 86 % and 101 % of it.

After the table, when the torch row is there, the CLI prints onnxruntime float32 over torch eager
at batch N as the median of ``--pairs`` back-to-back pairs of windows (:func:`paired_ratio`): the
ratio of two rows timed a minute apart swung from 1.09 to 1.39x on one VM.

Library functions return rows; the CLI handler prints them. Torch is imported only for the
torch row.

Example::

    anomaly bench bundle/ --images data/test --batch-size 16 --iterations 30
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["add_parsers", "AuditRate", "BenchRow", "PairedRatio", "audit_in_flight", "time_calls", "time_window",
           "paired_ratio", "compare_with_torch", "bench_bundle", "parse_devices", "bench_audit", "file_write_ms", "format_table",
           "find_variants", "sample_inputs"]

log = logging.getLogger(__name__)


@dataclass
class BenchRow:
    """One line of the table.

    Attributes:
        engine: ``torch eager``, ``onnxruntime`` or ``audit (end to end)``.
        precision: ``fp32``, ``int8`` or ``fp16``.
        device: ``cpu``, ``cuda`` or ``tensorrt``.
        batch: images per call.
        images_per_s: images / second over the timed calls.
        p50_ms, p99_ms: per-call latency percentiles (a call scores ``batch`` images).
        note: e.g. the audit's fraction of pure inference, or why a row is missing.
    """

    engine: str
    precision: str
    device: str
    batch: int
    images_per_s: float | None
    p50_ms: float | None = None
    p99_ms: float | None = None
    note: str = ""


@dataclass
class AuditRate:
    """How fast one audit ran (the fastest of :func:`bench_audit`'s repeats).

    Attributes:
        images_per_s: steady state: the images finished per second from a quarter of the run (and
            at least :func:`audit_in_flight` images) until that many images are left, when the
            pipeline stops filling; the whole run's rate when that span holds fewer than half of the
            images (or 8): on a 2-core CPU it takes about 400 images to have one.
        whole_run_images_per_s: all images over the whole run, start-up included.
        startup_s: seconds from the start of the audit's timed span (the bundle loaded, the
            output folder ready) to its first finished image.
        images: images audited.
        source: where they came from, in words.
        flagged: images the audit flagged (label 1).
    """

    images_per_s: float
    whole_run_images_per_s: float
    startup_s: float
    images: int
    source: str
    flagged: int = 0


def time_calls(fn: Callable[[], Any], batch: int, iterations: int, warmup: int) -> tuple[float, float, float]:
    """Time ``fn`` (scoring ``batch`` images per call) after ``warmup`` untimed calls.

    Returns:
        ``(images_per_s, p50_ms, p99_ms)``.
    """
    for _ in range(warmup):
        fn()
    lat = []
    for _ in range(max(1, iterations)):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    arr = np.asarray(lat)
    return batch * len(arr) / float(arr.sum()), float(np.percentile(arr, 50) * 1e3), float(np.percentile(arr, 99) * 1e3)


def time_window(fn: Callable[[], Any], batch: int, seconds: float, min_calls: int = 3) -> float:
    """Images/s of ``fn`` (``batch`` images per call) called back to back for ``seconds`` (and at
    least ``min_calls`` times), after one untimed call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if n >= min_calls and elapsed >= seconds:
            return batch * n / elapsed


@dataclass
class PairedRatio:
    """``a``'s images/s over ``b``'s, from windows timed back to back (:func:`paired_ratio`).

    Attributes:
        median: the median of the pairs' ratios (each pair timed within a few seconds).
        low, high: the smallest and largest pair ratio.
        best: the ratio of each side's fastest window.
        pairs: how many pairs; seconds: each window's length.
    """

    median: float
    low: float
    high: float
    best: float
    pairs: int
    seconds: float

    def describe(self) -> str:
        return (f"{self.median:.2f}x (median of {self.pairs} back-to-back pairs of {self.seconds:g} s windows, "
                f"{self.low:.2f}-{self.high:.2f}; fastest window against fastest: {self.best:.2f}x)")


def paired_ratio(a: Callable[[], Any], b: Callable[[], Any], batch: int, *, pairs: int = 5,
                 seconds: float = 1.5) -> PairedRatio:
    """Time ``a`` and ``b`` (each scoring ``batch`` images per call) in alternating windows.

    A ratio of two table rows timed a minute apart measures the VM's minute as much as the engines:
    on 2026-12-03 four runs of ``benchmarks/speed.py`` gave onnxruntime / torch at 1.39, 1.35, 1.38
    and 1.09x, the last while onnxruntime's own windows ranged 231-311 images/s. Each pair here times both
    engines within ``2 * seconds``, in alternating order (a drift favours neither side).
    """
    if pairs < 1 or seconds <= 0:
        raise ValueError(f"pairs must be >= 1 and seconds > 0, got {pairs} and {seconds}")
    ratios, best_a, best_b = [], 0.0, 0.0
    for i in range(pairs):
        if i % 2 == 0:
            ra, rb = time_window(a, batch, seconds), time_window(b, batch, seconds)
        else:
            rb, ra = time_window(b, batch, seconds), time_window(a, batch, seconds)
        ratios.append(ra / rb)
        best_a, best_b = max(best_a, ra), max(best_b, rb)
    return PairedRatio(float(np.median(ratios)), min(ratios), max(ratios), best_a / best_b, pairs, seconds)


def compare_with_torch(bundle: str | os.PathLike, *, batch_size: int = 16, images: str | os.PathLike | None = None,
                       threads: int | None = None, pairs: int = 5, seconds: float = 1.5) -> PairedRatio | None:
    """onnxruntime float32 (CPU) over torch eager at ``batch_size``, by :func:`paired_ratio`;
    ``None`` when the torch graph cannot be rebuilt (no torch, or the run folder is gone)."""
    from anomaly.deploy.runtime import Runtime, physical_cores

    threads = threads or physical_cores()
    rt = Runtime(bundle, device="cpu", threads=threads)
    fn, _why = _torch_graph(rt.meta, threads)
    if fn is None:
        return None
    x = sample_inputs(rt.preprocess, batch_size, images)
    return paired_ratio(lambda: rt.infer(x), lambda: fn(x), batch_size, pairs=pairs, seconds=seconds)


def sample_inputs(pre: Any, n: int, images: str | os.PathLike | None, seed: int = 0) -> np.ndarray:
    """``(n, C, S, S)`` float32: preprocessed files from ``images`` (cycled; a tiled bundle's: their
    tiles), or seeded noise: what the
    timed rows feed the graph (the runtime's own preprocessing ``pre``)."""
    if images is not None:
        from anomaly.data.io import paths_from

        paths = paths_from([images])[: max(n, 1)]
        if paths:
            # a tiled bundle's graph takes tiles: the images' tiles, in grid order
            xs = [t for p in paths for t in pre.tiles(pre.load(p))[0]] if pre.tiled else [pre.load(p) for p in paths]
            return np.stack([xs[i % len(xs)] for i in range(n)])
    rng = np.random.default_rng(seed)
    return rng.random((n, pre.channels, pre.image_size, pre.image_size), dtype=np.float32)


def find_variants(bundle: str | os.PathLike) -> list[Path]:
    """Sibling bundles ``<bundle>_int8`` / ``<bundle>_fp16`` (as ``anomaly export --int8/--fp16`` writes)."""
    b = Path(bundle)
    return [p for p in (b.parent / f"{b.name}_int8", b.parent / f"{b.name}_fp16") if (p / "model.onnx").is_file()]


def _torch_graph(meta: dict[str, Any], threads: int, device: str = "cpu", half: bool = False,
                 tf32: bool = False) -> tuple[Callable[[np.ndarray], Any] | None, str]:
    """The eager torch graph of the bundle's run, or ``(None, why not)``.

    On ``device="cuda"`` each call copies the batch to the GPU, runs the graph (under float16
    autocast when ``half``) and copies every output back, as onnxruntime's ``run`` does, so the
    call returns when the GPU is done and both engines pay the same transfers. ``tf32`` sets
    torch's TF32 switches for convolutions and matrix products, as the runtime's does onnxruntime's.
    """
    # Idle OpenMP threads sleep instead of spinning (set before torch loads its OpenMP runtime):
    # on a few shared cores spinning made torch 2-5x slower and erratic, which would flatter
    # onnxruntime (whose threads do not spin there either, see anomaly.deploy.runtime).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        return None, "torch not installed"
    run = meta.get("model", {}).get("run")
    if not run or not (Path(run) / "checkpoints").is_dir():
        return None, f"run folder {run!r} not found"
    from anomaly.scoring import Scorer, scoring_graph
    from anomaly.deploy.export import load_run

    model, _ckpt, cfg = load_run(run, meta["model"].get("checkpoint", "best"))
    sc = meta["scoring"]
    scorer = Scorer(residual=sc["residual"], smoothing_sigma=sc["smoothing_sigma"], aggregate=sc["aggregate"],
                    topk_fraction=sc.get("topk_fraction", 0.01), image_size=(cfg.image_size, cfg.image_size),
                    latent=sc.get("latent", "none"), latent_k=sc.get("latent_k", 5), colour=sc.get("colour", "rgb"),
                    texture=sc.get("texture", "none"), texture_weight=sc.get("texture_weight", 0.5))
    if sc.get("texture", "none") != "none":  # a bank of the stored size (its values do not change the timing)
        scorer.set_statistics_bank(torch.zeros(9), torch.ones(9), torch.randn(sc["texture_stats"]["centres"], 9))
    if sc.get("normalized"):  # same arithmetic as the export (values do not change the timing)
        s = cfg.image_size
        scorer.set_normalization(torch.zeros(1, 1, s, s), torch.ones(1, 1, s, s))
    if sc.get("mix"):  # mixed residual (l1_learned): the stored standardisation
        scorer.set_mix_statistics(torch.tensor(sc["mix"]["mean"]), torch.tensor(sc["mix"]["std"]))
    if sc.get("latent", "none") != "none":  # a bank of the stored size (its values do not change the timing)
        bank = sc["latent_bank"]
        per_class = bank.get("per_class", False)
        scorer.set_latent_bank(torch.randn(bank["codes"], bank["dim"]),
                               torch.zeros(bank["codes"], dtype=torch.int64) if per_class else None)
        scorer.set_score_mix(torch.tensor(sc["score_mix"]["mean"]), torch.tensor(sc["score_mix"]["std"]))
    graph = scoring_graph(model, scorer, sc.get("tta", "none")).eval()
    torch.set_num_threads(threads)
    conditional = bool(meta["model"].get("conditional"))
    if device == "cpu":
        def run_graph(x: np.ndarray) -> Any:
            with torch.inference_mode():
                t = torch.from_numpy(x)
                return graph(t, torch.zeros(len(x), dtype=torch.int64) if conditional else None)

        return run_graph, ""
    if device != "cuda" or not torch.cuda.is_available():
        return None, f"torch has no {device} device here"
    dev = torch.device("cuda")
    graph = graph.to(dev)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions once
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32

    def run_gpu(x: np.ndarray) -> Any:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=half):
            t = torch.from_numpy(x).to(dev)
            outs = graph(t, torch.zeros(len(x), dtype=torch.int64, device=dev) if conditional else None)
            return [o.float().cpu().numpy() for o in outs]

    return run_gpu, ""


def parse_devices(device: str) -> list[str]:
    """``auto`` (every installed onnxruntime provider), one device, or a comma list (``cpu,cuda``)."""
    from anomaly.deploy.runtime import available_devices

    if device == "auto":
        return available_devices()
    devices = [d.strip() for d in device.split(",") if d.strip()]
    unknown = [d for d in devices if d not in ("cpu", "cuda", "tensorrt")]
    if not devices or unknown:
        raise ValueError(f"unknown device {device!r}; expected auto, or cpu, cuda, tensorrt (comma-separated)")
    return devices


def _timed_row(engine: str, precision: str, dev: str, b: int, fn: Callable[[], Any], iterations: int, warmup: int,
               note: str = "") -> BenchRow:
    """One timed row; a failure (a GPU out of memory, a kernel missing) becomes the row's note."""
    try:
        ips, p50, p99 = time_calls(fn, b, iterations, warmup)
    except Exception as exc:  # noqa: BLE001 - a row that cannot run says why; the table goes on
        log.warning("%s %s %s batch %d failed: %s", engine, precision, dev, b, exc)
        return BenchRow(engine, precision, dev, b, None, note=f"failed: {str(exc).splitlines()[0][:120]}")
    return BenchRow(engine, precision, dev, b, ips, p50, p99, note=note)


def bench_bundle(bundle: str | os.PathLike, *, batch_sizes: Sequence[int] = (1, 16), iterations: int = 20,
                 warmup: int = 3, device: str = "auto", images: str | os.PathLike | None = None,
                 variants: Sequence[str | os.PathLike] | None = None, threads: int | None = None,
                 torch_eager: bool = True, gpu_batch_sizes: Sequence[int] = (), tf32: bool = False) -> list[BenchRow]:
    """Time the bundle's graph with each available engine, precision and device.

    Args:
        bundle: float32 bundle folder.
        batch_sizes: batch sizes to time.
        iterations, warmup: timed and untimed calls per row.
        device: ``auto`` (every installed provider), one of ``cpu``, ``cuda``, ``tensorrt``, or a
            comma list of them.
        images: folder of images to feed (preprocessed); ``None``: seeded noise of the same shape.
        variants: other bundles of the same model (int8, fp16); ``None``: the sibling folders.
        threads: intra-op threads for onnxruntime and torch (``None``: physical cores; on a GPU
            provider the runtime's default, 1).
        torch_eager: include the torch rows when possible: on the CPU, and on CUDA (float32 and
            float16 autocast) when the devices include a GPU and torch sees one.
        gpu_batch_sizes: further batch sizes timed on GPU devices only (a GPU needs large batches
            to fill; on a CPU they would only cost time).
        tf32: TF32 for float32 on CUDA, in onnxruntime and torch (off: the runtime's default).

    Returns:
        one :class:`BenchRow` per engine/precision/device/batch.
    """
    from anomaly.deploy.runtime import Runtime, physical_cores

    asked_threads, threads = threads, threads or physical_cores()  # GPU sessions keep the runtime's default
    devices = parse_devices(device)
    if any(b < 1 for b in [*batch_sizes, *gpu_batch_sizes]):
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)} and {list(gpu_batch_sizes)}")
    gpu_sizes = sorted({*batch_sizes, *gpu_batch_sizes})
    base = Runtime(bundle, device="cpu", threads=threads)
    xs = {b: sample_inputs(base.preprocess, b, images)
          for b in (gpu_sizes if any(d != "cpu" for d in devices) else batch_sizes)}
    rows: list[BenchRow] = []
    if torch_eager:
        fn, why = _torch_graph(base.meta, threads)
        for b in batch_sizes:
            if fn is None:
                rows.append(BenchRow("torch eager", "fp32", "cpu", b, None, note=why))
                continue
            rows.append(_timed_row("torch eager", "fp32", "cpu", b, lambda: fn(xs[b]), iterations, warmup,
                                   note=f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}"))
        if any(d != "cpu" for d in devices):
            for half in (False, True):
                precision = "fp16" if half else "fp32"
                gfn, why = _torch_graph(base.meta, threads, device="cuda", half=half, tf32=tf32)
                if gfn is None:
                    rows.append(BenchRow("torch eager", precision, "cuda", gpu_sizes[0], None, note=why))
                    continue
                for b in gpu_sizes:
                    rows.append(_timed_row("torch eager", precision, "cuda", b, lambda: gfn(xs[b]), iterations, warmup,
                                           note="float16 autocast" if half else ""))
    bundles = [Path(bundle)] + [Path(v) for v in (find_variants(bundle) if variants is None else variants)]
    from anomaly.deploy.bundle import load_sidecar

    for dev in devices:
        for bpath in bundles:
            precision = str(load_sidecar(bpath).get("precision", "fp32"))
            if precision == "int8" and dev != "cpu":
                continue  # static int8 is for CPUs; a GPU provider would run most of its nodes on the CPU
            try:
                rt = base if (bpath == Path(bundle) and dev == "cpu") else \
                    Runtime(bpath, device=dev, threads=threads if dev == "cpu" else asked_threads, tf32=tf32)
                precision = rt.precision
            except (RuntimeError, ValueError) as exc:
                rows.append(BenchRow("onnxruntime", precision, dev, batch_sizes[0], None, note=str(exc).split(";")[0]))
                continue
            if precision == "fp16" and dev == "cpu":
                continue  # float16 is for GPUs; on a CPU onnxruntime casts back to float32
            for b in (batch_sizes if dev == "cpu" else gpu_sizes):
                rows.append(_timed_row("onnxruntime", precision, dev, b, lambda: rt.infer(xs[b]), iterations, warmup))
    return rows


def _synthetic_folder(root: Path, n: int, size: int, channels: int, seed: int = 0) -> Path:
    """``n`` PNGs of a noisy texture at ``size`` x ``size`` (when no --images folder is given)."""
    import cv2

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        img = 0.5 + 0.2 * np.sin(2 * np.pi * xx / 16 + rng.uniform(0, 6.3)) * np.cos(2 * np.pi * yy / 16)
        img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
        img8 = (img * 255).astype(np.uint8)
        if channels == 3:
            img8 = np.repeat(img8[:, :, None], 3, axis=2)
        cv2.imwrite(str(root / f"{i:05d}.png"), img8)
    return root


def file_write_ms(folder: str | os.PathLike, n: int = 64, size: int = 12_000) -> float:
    """Milliseconds to create and write one ``size``-byte file in ``folder`` (median of ``n``).

    The audit writes one or two such files per image; on some disks that alone decides its rate
    (this project's 2-core VM: 0.02 to 0.9 ms per file within the same hour, mostly kernel
    time; tmpfs 0.015 ms). Much of that spread is the file system's memory of deletions: its ext4
    steps over inodes freed within about the last minute when it allocates one, so within a minute
    of deleting thousands of files (a previous bench's clean-up, a test run) a file costs 0.25-0.5
    ms, and 0.03 ms once that minute has passed.
    """
    data = os.urandom(size)
    with tempfile.TemporaryDirectory(prefix="anomaly-bench-io-", dir=folder) as tmp:
        times = []
        for i in range(n):
            t = time.perf_counter()
            with open(os.path.join(tmp, f"{i:05d}-0123456789.jpg"), "wb") as fh:
                fh.write(data)
            times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def audit_in_flight(bundle: str | os.PathLike, device: str, batch_size: int, decode_workers: int | None = None) -> int:
    """Most images :func:`anomaly.deploy.audit.run_audit` holds between reading and committing: the
    runtime's pipeline bound (``Runtime.score_paths``) plus the ``2 * batch_size`` finished images
    waiting for their files."""
    from anomaly.deploy.runtime import Runtime

    rt = Runtime(bundle, device=device, decode_workers=decode_workers)
    chunks = rt.decode_workers + rt.prefetch if rt.pipeline == "batch" else rt.prefetch + 1
    return (chunks + 2) * batch_size


def bench_audit(bundle: str | os.PathLike, *, batch_size: int = 16, device: str = "auto",
                images: str | os.PathLike | None = None, max_images: int = 1024, repeats: int = 3,
                heatmaps: bool | str = True, thumbnail: int = 256,
                out_dir: str | os.PathLike | None = None,
                before_repeat: Callable[[], Any] | None = None, workers: int | None = None,
                decode_workers: int | None = None, threads: int | None = None, tf32: bool = False) -> AuditRate:
    """Run the end-to-end audit (decode -> score -> results.csv + heatmaps) and time it.

    Args:
        images: folder of images (at most ``max_images``, evenly spaced over the sorted list so a
            folder of ``good/`` and ``defective/`` gives both); ``None``: 64 synthetic PNGs at twice
            the model's input size.
        repeats: audits run; the fastest (in steady state) counts (the first also warms the file cache).
            Three, as the reference graph gets a best of several windows (:func:`run_all`).
        heatmaps, thumbnail: as :func:`anomaly.deploy.audit.run_audit` (``heatmaps="none", thumbnail=0``:
            no image files, only the journal and CSV).
        out_dir: where the audit writes (a temporary folder inside it; default the system's).
        before_repeat: called before each repeat, outside its timing (:func:`run_all` times the
            reference graph there).
        workers, decode_workers, threads: the audit's file writers, the runtime's decoders and
            onnxruntime's intra-op threads (``None``: their defaults; see :func:`anomaly.deploy.audit.run_audit`).

    Returns:
        The :class:`AuditRate` of the fastest repeat.
    """
    from anomaly.data.io import paths_from
    from anomaly.deploy.audit import run_audit
    from anomaly.deploy.bundle import load_sidecar

    meta = load_sidecar(bundle)
    with tempfile.TemporaryDirectory(prefix="anomaly-bench-", dir=out_dir) as tmp:
        if images is None:
            pre = meta["preprocess"]
            size = 2 * int(pre["image_size"])
            src = Path(tmp) / "images"
            src.mkdir()
            paths, source = paths_from([_synthetic_folder(src, 64, size, int(pre["channels"]))]), f"64 synthetic {size}px PNGs"
        else:
            paths = paths_from([images])
            if len(paths) > max_images:  # spread over the whole folder, not its first sub-folders (one class)
                paths = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, max_images).round().astype(int))]
            source = f"{len(paths)} images from {images}"
        if not paths:
            raise FileNotFoundError(f"{images}: no images to audit")
        in_flight = audit_in_flight(bundle, device, batch_size, decode_workers)
        best: AuditRate | None = None
        for k in range(max(1, repeats)):
            out = Path(tmp) / f"audit{k}"
            ticks: list[tuple[int, float]] = []
            if before_repeat is not None:
                before_repeat()
            t = time.perf_counter()
            summary = run_audit(bundle, [str(p) for p in paths], out, batch_size=batch_size, heatmaps=heatmaps,
                                thumbnail=thumbnail, device=device, workers=workers, decode_workers=decode_workers,
                                threads=threads, tf32=tf32, progress=lambda p: ticks.append((p.done, p.seconds)))
            wall = time.perf_counter() - t
            whole = float(summary.get("images_per_second") or len(paths) / wall)
            steady = whole
            # Between a full pipeline and the moment the inputs run out, as much work is in flight at
            # both ends of the span, so the slope counts only work done inside it. Past that moment
            # the images in flight finish with nothing new behind them, and their early stages, done
            # before, would inflate it.
            lo, hi = max(len(paths) / 4, in_flight), len(paths) - in_flight
            span = [(n, sec) for n, sec in ticks if lo <= n <= hi]
            if len(span) >= max(8, len(paths) / 2) and span[-1][1] > span[0][1]:
                steady = (span[-1][0] - span[0][0]) / (span[-1][1] - span[0][1])
            rate = AuditRate(steady, whole, ticks[0][1] if ticks else wall, len(paths), source, int(summary.get("flagged") or 0))
            if best is None or rate.images_per_s > best.images_per_s:
                best = rate
    assert best is not None
    return best


def format_table(rows: Sequence[BenchRow]) -> str:
    """The rows as an aligned text table (images/s, latency p50/p99 per call)."""
    head = f"{'engine':<20} {'precision':<9} {'device':<8} {'batch':>5} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8}  note"
    lines = [head, "-" * len(head)]

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in rows:
        lines.append(f"{r.engine:<20} {r.precision:<9} {r.device:<8} {r.batch:>5} {num(r.images_per_s, '9.1f'):>9} "
                     f"{num(r.p50_ms, '8.2f'):>8} {num(r.p99_ms, '8.2f'):>8}  {r.note}".rstrip())
    return "\n".join(lines)


def run_all(bundle: str | os.PathLike, *, batch_size: int = 16, iterations: int = 20, warmup: int = 3,
            device: str = "auto", images: str | os.PathLike | None = None,
            variants: Sequence[str | os.PathLike] | None = None, threads: int | None = None,
            audit: bool = True, audit_images: int = 1024, torch_eager: bool = True,
            audit_dir: str | os.PathLike | None = None, reference_seconds: float = 1.5,
            gpu_batch_sizes: Sequence[int] = (), tf32: bool = False) -> list[BenchRow]:
    """Every row of ``anomaly bench``: the graph timings, then the audit against pure inference —
    as the CLI runs it (heatmaps, thumbnails where due), with heatmaps for flagged images only
    (``--heatmaps flagged``; how much it spares depends on the share flagged, which the note gives),
    and without image files (journal and CSV only), which separates the pipeline from the disk; the
    note gives the disk's cost per file.

    The audit's fraction divides by the float32 graph at batch N at its fastest: the best of its row
    and of windows of ``reference_seconds`` timed before each audit repeat and after the last (see
    the module docstring); ``0`` uses the row alone.
    """
    sizes = (1, batch_size) if batch_size != 1 else (1,)
    rows = bench_bundle(bundle, batch_sizes=sizes, iterations=iterations, warmup=warmup, device=device,
                        images=images, variants=variants, threads=threads, torch_eager=torch_eager,
                        gpu_batch_sizes=gpu_batch_sizes, tf32=tf32)
    if audit:
        from anomaly.deploy.runtime import Runtime

        # The audit runs on CUDA when it is among the devices and its float32 row ran, else on the
        # CPU (or the one device asked for).
        devices = parse_devices(device)
        ran = {r.device for r in rows if r.engine == "onnxruntime" and r.precision == "fp32" and r.images_per_s}
        audit_device = next((d for d in ("cuda", "cpu", "tensorrt") if d in devices and d in ran), devices[0])
        ref = next((r for r in rows if r.engine == "onnxruntime" and r.precision == "fp32" and r.device == audit_device
                    and r.batch == batch_size and r.images_per_s), None)
        windows: list[float] = []
        window: Callable[[], Any] | None = None
        if ref is not None and reference_seconds > 0:
            ref_rt = Runtime(bundle, device=audit_device, threads=threads, tf32=tf32)
            x = sample_inputs(ref_rt.preprocess, batch_size, images)

            def _window() -> None:
                windows.append(time_window(lambda: ref_rt.infer(x), batch_size, reference_seconds))

            window = _window
        where = audit_dir or tempfile.gettempdir()
        write_ms = file_write_ms(where)
        rates = []
        for engine, kwargs, what in (("audit (end to end)", {}, "heatmaps on"),
                                     ("audit (flagged maps)", {"heatmaps": "flagged"}, "heatmaps only for the {flagged} flagged"),
                                     ("audit (no files)", {"heatmaps": "none", "thumbnail": 0}, "journal + CSV only")):
            rates.append((engine, what, bench_audit(bundle, batch_size=batch_size, device=audit_device, images=images,
                                                    max_images=audit_images, out_dir=audit_dir,
                                                    before_repeat=window, tf32=tf32, **kwargs)))
        if window is not None:
            window()
        best = max([ref.images_per_s, *windows]) if ref is not None else None
        basis = ""
        if best is not None:
            basis = (f" ({best:.1f} images/s, the best of its row and {len(windows)} windows of {reference_seconds:g} s "
                     f"timed between the audits: {', '.join(f'{w:.0f}' for w in windows)})" if windows else "")
        for engine, what, rate in rates:
            frac = f"{rate.images_per_s / best:.0%} of onnxruntime fp32 batch {batch_size}{basis}" if best else ""
            whole = (f"; whole run {rate.whole_run_images_per_s:.1f} images/s"
                     + (f" ({rate.whole_run_images_per_s / best:.0%})" if best else "")
                     + f", first image after {rate.startup_s:.2f} s")
            disk = f"; a 12 kB file costs {write_ms:.2f} ms in {where}" if engine == "audit (end to end)" else ""
            rows.append(BenchRow(engine, "fp32", audit_device, batch_size, rate.images_per_s,
                                 note=f"{frac}; {rate.source}, {what.format(flagged=rate.flagged)}{whole}{disk}".lstrip("; ")))
            basis = ""  # said once, on the first audit row
    return rows


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``anomaly bench``."""
    p = sub.add_parser("bench", help="time a bundle: images/s and latency per engine, and the end-to-end audit",
                       description="Time the bundle's graph with torch eager (if the run folder and torch are there), "
                                   "onnxruntime fp32 and its int8/fp16 variants on each available device, at batch 1 "
                                   "and batch N; then the end-to-end audit rate as a fraction of pure inference.")
    p.add_argument("bundle", help="float32 bundle folder written by `anomaly export`")
    p.add_argument("--batch-size", type=int, default=16, help="batch N (batch 1 is always timed; default 16)")
    p.add_argument("--iterations", type=int, default=20, help="timed calls per row (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    p.add_argument("--device", default="auto",
                   help="auto (every installed provider), cpu, cuda or tensorrt, or a comma list (cpu,cuda)")
    p.add_argument("--gpu-batch-sizes", type=int, nargs="*", default=[], metavar="N",
                   help="further batch sizes timed on GPU devices only (e.g. 64 256: a GPU needs large batches)")
    p.add_argument("--tf32", action="store_true", help="TF32 for float32 on CUDA (onnxruntime and torch rows)")
    p.add_argument("--images", default=None, help="folder of images to feed and audit (default: generated)")
    p.add_argument("--variants", nargs="*", default=None,
                   help="int8/fp16 bundles of the same model (default: BUNDLE_int8 and BUNDLE_fp16 if present)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--audit-images", type=int, default=1024,
                   help="images audited at most (default 1024: the steady state needs a few hundred)")
    p.add_argument("--audit-dir", default=None,
                   help="folder on the disk the audit rows write to (default: the system's temporary folder)")
    p.add_argument("--reference-seconds", type=float, default=1.5,
                   help="the audit's fraction divides by the fp32 graph at batch N at its fastest: the best of its "
                        "row and of windows this long timed before each audit and after the last (default 1.5; "
                        "0: the row alone)")
    p.add_argument("--pairs", type=int, default=5,
                   help="onnxruntime fp32 / torch eager at batch N from this many back-to-back pairs of windows "
                        "(--reference-seconds long, default 1.5 s) after the table; 0: skip (default 5)")
    p.add_argument("--no-audit", dest="audit", action="store_false", help="skip the end-to-end audit rows")
    p.add_argument("--no-torch", dest="torch_eager", action="store_false", help="skip the torch eager rows")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from anomaly.deploy.runtime import physical_cores

    if args.batch_size < 1 or args.iterations < 1 or args.warmup < 0 or args.reference_seconds < 0 or args.pairs < 0:
        print("anomaly bench: error: --batch-size and --iterations must be >= 1, --warmup, --reference-seconds and "
              "--pairs >= 0", file=sys.stderr)
        return 2
    try:
        parse_devices(args.device)
    except ValueError as exc:
        print(f"anomaly bench: error: --device: {exc}", file=sys.stderr)
        return 2
    if any(b < 1 for b in args.gpu_batch_sizes):
        print("anomaly bench: error: --gpu-batch-sizes must be >= 1", file=sys.stderr)
        return 2
    if args.audit_dir is not None and not Path(args.audit_dir).is_dir():
        print(f"anomaly bench: error: --audit-dir {args.audit_dir}: no such folder", file=sys.stderr)
        return 2
    rows = run_all(args.bundle, batch_size=args.batch_size, iterations=args.iterations, warmup=args.warmup,
                   device=args.device, images=args.images, variants=args.variants, threads=args.threads,
                   audit=args.audit, audit_images=args.audit_images, torch_eager=args.torch_eager,
                   audit_dir=args.audit_dir, reference_seconds=args.reference_seconds,
                   gpu_batch_sizes=args.gpu_batch_sizes, tf32=args.tf32)
    print(f"anomaly bench {args.bundle}: {args.iterations} timed calls after {args.warmup} warm-up, "
          f"{args.threads or physical_cores()} intra-op threads on the CPU; latency is per call (batch images)")
    print(format_table(rows))
    torch_n = any(r.engine == "torch eager" and r.batch == args.batch_size and r.images_per_s for r in rows)
    if torch_n and args.pairs > 0:
        paired = compare_with_torch(args.bundle, batch_size=args.batch_size, images=args.images, threads=args.threads,
                                    pairs=args.pairs, seconds=args.reference_seconds or 1.5)
        if paired is not None:
            print(f"onnxruntime fp32 / torch eager at batch {args.batch_size}: {paired.describe()}")
    return 0

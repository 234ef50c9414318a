"""The fast paths stay correct: threaded batching, reduced-precision bundles, ``anomaly bench``.

Nothing here is timed (timings live in ``benchmarks/speed.py``); these tests check that the
pipeline returns what sequential inference returns, in order, with bounded memory, and that the
int8 / fp16 bundles are valid, self-checking bundles whose scores agree with float32.
"""
from __future__ import annotations

import itertools
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from anomaly.deploy.bundle import load_sidecar, sha256_file

# Measured on the fixture's 8 test images: int8 vs fp32 Spearman 1.0, max |score diff| ~2e-6
# (scores ~0.7, spread ~0.09); fp16 ~2e-7. On a trained ELPV model (benchmarks/speed.py) int8
# keeps Spearman > 0.99. The bars leave a wide margin for other CPUs' integer kernels.
INT8_MIN_SPEARMAN = 0.9
INT8_MAX_REL_DIFF = 0.05
FP16_MAX_REL_DIFF = 0.01


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _test_paths(trained_bundle: dict) -> list[Path]:
    return sorted((trained_bundle["data"] / "test").rglob("*.png"))


@pytest.fixture(scope="module")
def int8_bundle(trained_bundle: dict, tmp_path_factory) -> Path:
    from anomaly.deploy.quantize import quantize_int8

    out = tmp_path_factory.mktemp("int8") / "bundle_int8"
    return quantize_int8(trained_bundle["bundle"], out, trained_bundle["data"] / "train" / "good")


@pytest.mark.parametrize("pipeline", ["batch", "overlap"])
def test_pipeline_matches_sequential_infer_in_order(trained_bundle: dict, tmp_path: Path, pipeline: str) -> None:
    from anomaly.deploy.runtime import Runtime

    good = _test_paths(trained_bundle)
    empty, garbage = tmp_path / "empty.png", tmp_path / "garbage.png"
    empty.write_bytes(b"")
    garbage.write_bytes(b"not an image")
    paths = [good[0], empty, *good[1:4], tmp_path / "missing.png", *good[4:], garbage]
    rt = Runtime(trained_bundle["bundle"], device="cpu", decode_workers=2, prefetch=1, pipeline=pipeline)
    assert rt.describe()["pipeline"] == pipeline
    res = list(rt.score_paths(paths, batch_size=3, keep_image=True))

    assert [r.path for r in res] == [str(p) for p in paths]
    bad = {1, 5, len(paths) - 1}
    assert [i for i, r in enumerate(res) if r.error] == sorted(bad)
    assert "empty" in res[1].error and "no such file" in res[5].error and np.isnan(res[5].score)
    ok = [p for i, p in enumerate(paths) if i not in bad]
    ref = rt.infer(rt.preprocess.load_batch(ok))  # one sequential batch of every readable image
    got = [r for r in res if r.error is None]
    np.testing.assert_allclose([r.score for r in got], ref["score"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack([r.anomaly_map for r in got]), ref["anomaly_map"][:, 0], rtol=1e-5, atol=1e-6)
    # keep_image hands back the decoded original: what the audit draws heatmaps on
    from anomaly.data.io import read_image

    # in its own pixel type (no float copy): uint8 here, equal to the float decode once scaled
    assert got[0].image.dtype == np.uint8
    np.testing.assert_array_equal(got[0].image, read_image(ok[0], raw=True))
    np.testing.assert_allclose(got[0].image / 255.0, read_image(ok[0]), atol=1e-7)
    assert got[0].original_size == got[0].image.shape[:2] == (48, 48)
    # the sequential mode (decode_workers=0) gives the same rows
    seq = list(Runtime(trained_bundle["bundle"], device="cpu", decode_workers=0).score_paths(paths, batch_size=3))
    assert [r.path for r in seq] == [r.path for r in res] and [bool(r.error) for r in seq] == [bool(r.error) for r in res]
    np.testing.assert_allclose([r.score for r in seq if not r.error], [r.score for r in got], rtol=1e-5, atol=1e-6)
    assert all(r.image is None for r in seq)


def test_infer_runs_a_batch_as_slices_on_the_cores(trained_bundle: dict) -> None:
    """On the CPU a batch runs as one slice per core on the single-threaded session, in threads of
    its own; the outputs are those of the whole batch in one call, in order."""
    from anomaly.deploy.runtime import Runtime

    paths = _test_paths(trained_bundle)[:7]
    split = Runtime(trained_bundle["bundle"], device="cpu", threads=3)
    whole = Runtime(trained_bundle["bundle"], device="cpu", threads=3, split=False)
    assert split.split and not whole.split and split.describe()["split"]
    x = split.preprocess.load_batch(paths)
    calls: list[tuple[int, str]] = []
    single = split._single_thread_session()
    run = single.run

    def recording_run(names, feeds, *args):
        calls.append((len(feeds["image"]), threading.current_thread().name))
        return run(names, feeds, *args)

    single.run = recording_run
    got, ref = split.infer(x), whole.infer(x)
    assert sorted(n for n, _ in calls) == [2, 2, 3] and all(t.startswith("anomaly-infer") for _, t in calls)
    for key in ("score", "anomaly_map", "reconstruction"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-6)
    one_by_one = np.concatenate([whole.infer(x[i:i + 1])["score"] for i in range(len(x))])
    np.testing.assert_allclose(got["score"], one_by_one, rtol=1e-5, atol=1e-6)
    calls.clear()
    split.infer(x[:1])  # a single image: the multi-threaded session, nothing to split
    assert calls == []
    assert not Runtime(trained_bundle["bundle"], device="cpu", threads=1).split
    split.close()
    assert np.allclose(split.infer(x)["score"], got["score"])  # usable after close: the threads come back


@pytest.mark.parametrize("pipeline, workers", [("overlap", 3), ("batch", 2)])
def test_pipeline_memory_is_bounded(trained_bundle: dict, pipeline: str, workers: int) -> None:
    """However many paths, at most a bound of them are taken and decoded ahead:
    (prefetch + 1) * batch_size overlapping, (workers + prefetch) * batch_size batch-parallel."""
    from anomaly.deploy.runtime import Runtime

    good = _test_paths(trained_bundle)
    n, batch, prefetch = 60, 4, 1
    bound = (prefetch + 1) * batch if pipeline == "overlap" else (workers + prefetch) * batch
    consumed = 0

    def source():
        nonlocal consumed
        for p in itertools.islice(itertools.cycle(good), n):
            consumed += 1
            yield p

    decoded = 0
    lock = threading.Lock()

    def on_decode(_path: str) -> None:
        nonlocal decoded
        with lock:
            decoded += 1

    rt = Runtime(trained_bundle["bundle"], device="cpu", decode_workers=workers, prefetch=prefetch, pipeline=pipeline)
    rt._on_decode = on_decode
    yielded = 0
    for _ in rt.score_paths(source(), batch_size=batch):
        yielded += 1
        assert consumed - yielded < bound, (consumed, yielded)  # paths taken but not yet returned
        with lock:
            assert decoded - yielded < bound
    assert yielded == consumed == n
    assert rt.stats.bound == bound and 0 < rt.stats.peak_in_flight <= bound
    assert rt.stats.batches == n // batch

    # stopping early leaves nothing running and takes no more than the bound
    consumed = 0
    it = rt.score_paths(source(), batch_size=batch)
    next(it)
    it.close()
    assert consumed <= bound


def test_int8_bundle_is_valid_and_agrees_with_fp32(trained_bundle: dict, int8_bundle: Path) -> None:
    from anomaly.deploy.runtime import Runtime

    meta = load_sidecar(int8_bundle)  # checks schema and sha256
    assert meta["precision"] == "int8"
    assert meta["onnx"]["sha256"] == sha256_file(int8_bundle / "model.onnx")
    q = meta["quantization"]
    assert q["format"] == "QDQ" and q["per_channel"] and q["quantized_nodes"] > 0 and q["calibration_images"] > 0
    assert q["source_sha256"] == load_sidecar(trained_bundle["bundle"])["onnx"]["sha256"]

    paths = _test_paths(trained_bundle)
    fp32 = np.array([r.score for r in Runtime(trained_bundle["bundle"], device="cpu").score_paths(paths)])
    rt8 = Runtime(int8_bundle, device="cpu")
    assert rt8.precision == "int8" and rt8.threshold is not None
    int8 = np.array([r.score for r in rt8.score_paths(paths)])
    assert _spearman(fp32, int8) > INT8_MIN_SPEARMAN
    assert np.abs(int8 - fp32).max() < INT8_MAX_REL_DIFF * np.abs(fp32).max()


def test_int8_graph_scores_the_unquantised_input(int8_bundle: Path) -> None:
    """Only the reconstructor is quantised: the residual must compare x_hat with the float input."""
    import onnx

    from anomaly.deploy.quantize import reconstructor_nodes

    g = onnx.load(str(int8_bundle / "model.onnx")).graph
    recon = reconstructor_nodes(g)
    readers = [n for n in g.node if "image" in n.input]
    assert any(n.op_type == "QuantizeLinear" for n in readers)  # the encoder's copy
    assert any(n.name not in recon and n.op_type != "QuantizeLinear" for n in readers)  # the scoring tail's
    tail_q = [n for n in g.node if n.name not in recon and n.op_type in ("QuantizeLinear", "DequantizeLinear")
              and not any(o in {i for m in g.node if m.name in recon for i in m.input} for o in n.output)]
    assert not tail_q


def test_fp16_bundle_keeps_float32_io(trained_bundle: dict, tmp_path: Path) -> None:
    from anomaly.deploy.quantize import convert_fp16
    from anomaly.deploy.runtime import Runtime

    out = convert_fp16(trained_bundle["bundle"], tmp_path / "b16")
    meta = load_sidecar(out)
    assert meta["precision"] == "fp16" and meta["onnx"]["sha256"] == sha256_file(out / "model.onnx")
    rt = Runtime(out, device="cpu")  # the CPU provider runs it (casting back), which is enough to check it
    x = rt.preprocess.load_batch(_test_paths(trained_bundle))
    ref = Runtime(trained_bundle["bundle"], device="cpu").infer(x)
    got = rt.infer(x)
    assert got["score"].dtype == np.float32 and got["anomaly_map"].shape == ref["anomaly_map"].shape
    assert np.abs(got["score"] - ref["score"]).max() < FP16_MAX_REL_DIFF * np.abs(ref["score"]).max()
    with pytest.raises(ValueError, match="new folder"):
        convert_fp16(trained_bundle["bundle"], trained_bundle["bundle"])


def test_missing_provider_is_a_clear_error(trained_bundle: dict) -> None:
    from anomaly.deploy.runtime import Runtime, available_devices

    for device, provider in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        if device in available_devices():
            continue
        with pytest.raises(RuntimeError, match=f"no {provider}.*available here: cpu"):
            Runtime(trained_bundle["bundle"], device=device)


def test_bench_command_prints_the_table(trained_bundle: dict, int8_bundle: Path, capsys) -> None:
    from anomaly.cli import main

    rc = main(["bench", str(trained_bundle["bundle"]), "--iterations", "2", "--warmup", "1", "--batch-size", "4",
               "--device", "cpu", "--images", str(trained_bundle["data"] / "test"), "--audit-images", "8",
               "--variants", str(int8_bundle), "--reference-seconds", "0.05"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    assert any(line.startswith("torch eager") and "   1 " in line for line in lines)  # the run folder is there
    ort = [line for line in lines if line.startswith("onnxruntime") and " / torch eager" not in line]
    assert len(ort) == 4 and sum("int8" in line for line in ort) == 2
    audit = [line for line in lines if line.startswith("audit (end to end)")]
    assert len(audit) == 1 and "of onnxruntime fp32 batch 4" in audit[0] and "a 12 kB file costs" in audit[0]
    assert "whole run" in audit[0] and "first image after" in audit[0] and "10 windows of 0.05 s" in audit[0]
    flagged = [line for line in lines if line.startswith("audit (flagged maps)")]
    assert len(flagged) == 1 and re.search(r"heatmaps only for the [1-8] flagged", flagged[0])
    bare = [line for line in lines if line.startswith("audit (no files)")]
    assert len(bare) == 1 and "journal + CSV only" in bare[0]
    paired = [line for line in lines if line.startswith("onnxruntime fp32 / torch eager at batch 4: ")]
    assert len(paired) == 1 and "median of 5 back-to-back pairs of 0.05 s windows" in paired[0]
    assert main(["bench", str(trained_bundle["bundle"]), "--audit-dir", str(trained_bundle["data"] / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--audit-dir" in err and "no such folder" in err
    assert main(["bench", str(trained_bundle["bundle"]), "--reference-seconds", "-1"]) == 2
    assert "--reference-seconds" in capsys.readouterr().err
    assert main(["bench", str(trained_bundle["bundle"]), "--pairs", "-1"]) == 2
    assert "--pairs" in capsys.readouterr().err


def test_paired_ratio_times_both_sides_in_alternating_windows(monkeypatch) -> None:
    """Two fake engines, one twice as fast per call: the ratio is 2, and the pairs alternate which
    side goes first, so that a drift of the machine's speed favours neither."""
    import types

    import anomaly.deploy.bench as bench

    # a fake clock that only the engines move: each call of ``a`` takes 0.25 s, of ``b`` 0.5 s (binary
    # fractions, so the arithmetic is exact); the timing code reads it through ``bench.time``
    clock = {"now": 1000.0, "calls": []}
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))

    def engine(name: str, seconds: float):
        def call() -> None:
            clock["calls"].append(name)
            clock["now"] += seconds
        return call

    a, b = engine("a", 0.25), engine("b", 0.5)
    assert bench.time_window(a, batch=4, seconds=1.0) == 16.0  # one untimed call, then 4 calls of 4 images in 1 s
    assert bench.time_window(b, batch=4, seconds=0.1) == 8.0  # at least min_calls=3 calls, however short the window
    clock["calls"].clear()
    r = bench.paired_ratio(a, b, batch=4, pairs=3, seconds=1.0)
    assert r.pairs == 3 and r.low == r.median == r.high == r.best == 2.0  # a's images/s over b's
    # windows alternate which side goes first: a b | b a | a b (each: 1 untimed call, then 4 of a or 3 of b)
    runs = [c for i, c in enumerate(clock["calls"]) if i == 0 or c != clock["calls"][i - 1]]
    assert runs == ["a", "b", "a", "b"] and clock["calls"].count("a") == 3 * 5 and clock["calls"].count("b") == 3 * 4
    assert "median of 3 back-to-back pairs of 1 s windows" in r.describe() and "2.00x" in r.describe()

    order: list[str] = []
    rates = iter([100.0, 50.0, 40.0, 120.0, 90.0, 60.0])  # window rates in the order they are timed
    monkeypatch.setattr(bench, "time_window", lambda fn, batch, seconds: (order.append(fn()), next(rates))[1])
    r = bench.paired_ratio(lambda: "a", lambda: "b", batch=1, pairs=3, seconds=1)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert (r.low, r.median, r.high) == (1.5, 2.0, 3.0) and r.best == 120.0 / 60.0
    with pytest.raises(ValueError, match="pairs must be >= 1"):
        bench.paired_ratio(a, b, batch=1, pairs=0)


def test_bench_audit_rate_is_the_steady_state_after_the_first_image(trained_bundle: dict, monkeypatch) -> None:
    """The audit row is the audit's steady state, as the graph rows time calls after warm-up: images
    finished per second from a quarter of the run (and at least the images in flight) until that many
    are left. The start-up and the whole run's rate are kept beside it."""
    import anomaly.deploy.audit
    from anomaly.deploy.audit import AuditProgress
    from anomaly.deploy.bench import audit_in_flight, bench_audit

    n = 40
    images = trained_bundle["data"] / "test"
    paths = [str(p) for p in sorted(images.rglob("*.png"))]
    paths = (paths * (n // len(paths) + 1))[:n]

    def fake_run_audit(bundle, paths, out, *, progress, **kwargs):
        # first image after 1 s, then 10 images/s; with 5 images left the inputs ran out, and the rest
        # come twice as fast (the images in flight were partly done)
        t = 1.0
        for i in range(len(paths)):
            progress(AuditProgress(i + 1, len(paths), 0, t))
            t += 0.1 if i + 1 < len(paths) - 5 else 0.05
        return {"images_per_second": len(paths) / t}

    monkeypatch.setattr(anomaly.deploy.audit, "run_audit", fake_run_audit)
    monkeypatch.setattr("anomaly.data.io.paths_from", lambda _: paths)
    monkeypatch.setattr("anomaly.deploy.bench.audit_in_flight", lambda *a: 5)
    rate = bench_audit(trained_bundle["bundle"], images=images, max_images=n, repeats=1)
    assert rate.images == n and f"{n} images from" in rate.source
    assert rate.images_per_s == pytest.approx(10.0)  # images 10 to 35: neither the start-up nor the drain
    assert rate.whole_run_images_per_s == pytest.approx(n / 4.7) and rate.startup_s == pytest.approx(1.0)
    assert audit_in_flight(trained_bundle["bundle"], "cpu", 4) >= 3 * 4  # a worker's chunk, the prefetch, the writes


def test_audit_fraction_divides_by_the_fastest_reference(trained_bundle: dict, monkeypatch) -> None:
    """The audit's fraction of pure inference divides by the graph at its fastest: the best of its
    row and of the windows timed before each audit repeat and after the last. A single short window
    that catches a slow moment of a shared machine must not inflate the fraction."""
    import anomaly.deploy.bench
    from anomaly.deploy.bench import AuditRate, BenchRow, run_all

    monkeypatch.setattr(anomaly.deploy.bench, "bench_bundle", lambda *a, **k: [BenchRow("onnxruntime", "fp32", "cpu", 4, 100.0)])
    windows = iter([120.0, 90.0, 200.0, 110.0, 95.0, 105.0, 99.0])
    monkeypatch.setattr(anomaly.deploy.bench, "time_window", lambda fn, batch, seconds: next(windows))
    repeats = []

    def fake_bench_audit(bundle, *, before_repeat=None, **kwargs):
        for _ in range(2):
            if before_repeat is not None:
                before_repeat()
            repeats.append(kwargs.get("heatmaps", True))
        return AuditRate(80.0, 70.0, 0.1, 10, "10 images")

    monkeypatch.setattr(anomaly.deploy.bench, "bench_audit", fake_bench_audit)
    rows = run_all(trained_bundle["bundle"], batch_size=4, device="cpu", torch_eager=False, reference_seconds=0.01)
    audit = [r for r in rows if r.engine.startswith("audit")]
    assert len(repeats) == 6 and next(windows, None) is None  # a window before each repeat and one after the last
    assert repeats == [True, True, "flagged", "flagged", "none", "none"]
    assert audit[0].note.startswith("40% of onnxruntime fp32 batch 4 (200.0 images/s, the best of its row and 7 windows")
    assert "120, 90, 200, 110, 95, 105, 99" in audit[0].note and "whole run 70.0 images/s (35%)" in audit[0].note
    assert audit[1].note.startswith("40% of onnxruntime fp32 batch 4; 10 images")  # the basis is said once
    rows = run_all(trained_bundle["bundle"], batch_size=4, device="cpu", torch_eager=False, reference_seconds=0)
    assert [r.note.split(";")[0] for r in rows if r.engine.startswith("audit")] == ["80% of onnxruntime fp32 batch 4"] * 3


def test_fp16_of_a_flip_tta_bundle_loads_and_agrees(trained_bundle: dict, tmp_path: Path) -> None:
    """In a ``--tta flips`` graph the stacked views feed both the reconstructor (float16) and the
    scoring tail (float32): the reconstructor must keep reading its float16 copy, or onnxruntime
    refuses the model (Conv bound to float and float16)."""
    from anomaly.deploy.export import export_run
    from anomaly.deploy.quantize import convert_fp16
    from anomaly.deploy.runtime import Runtime

    tta = export_run(trained_bundle["run"], tmp_path / "tta", tta="flips")
    rt = Runtime(convert_fp16(tta, tmp_path / "tta16"), device="cpu")
    x = rt.preprocess.load_batch(_test_paths(trained_bundle))
    ref, got = Runtime(tta, device="cpu").infer(x), rt.infer(x)
    assert np.abs(got["score"] - ref["score"]).max() < FP16_MAX_REL_DIFF * np.abs(ref["score"]).max()
    assert np.abs(got["anomaly_map"] - ref["anomaly_map"]).max() < FP16_MAX_REL_DIFF * np.abs(ref["anomaly_map"]).max()


def test_bench_devices_and_gpu_rows_without_a_gpu(trained_bundle: dict) -> None:
    """``--device cpu,cuda`` on a machine without a GPU: the CPU rows are timed, each GPU row says
    why it is missing, the GPU-only batch sizes cost the CPU nothing, and a bad device is refused."""
    from anomaly.deploy.bench import bench_bundle, parse_devices
    from anomaly.deploy.runtime import available_devices

    assert parse_devices("cpu, cuda") == ["cpu", "cuda"] and parse_devices("auto") == available_devices()
    for bad in ("gpu", "", "cpu,npu"):
        with pytest.raises(ValueError, match="unknown device"):
            parse_devices(bad)
    if "cuda" in available_devices():
        pytest.skip("a CUDA provider is installed here: the GPU rows would run")
    rows = bench_bundle(trained_bundle["bundle"], batch_sizes=(1, 2), iterations=1, warmup=0, device="cpu,cuda",
                        variants=[], gpu_batch_sizes=(8,))
    cpu = [r for r in rows if r.device == "cpu"]
    assert {(r.engine, r.batch) for r in cpu} == {("torch eager", 1), ("torch eager", 2), ("onnxruntime", 1),
                                                   ("onnxruntime", 2)}
    assert all(r.images_per_s and r.images_per_s > 0 for r in cpu)
    gpu = [r for r in rows if r.device == "cuda"]
    assert gpu and all(r.images_per_s is None and r.note for r in gpu)
    assert {r.precision for r in gpu if r.engine == "torch eager"} == {"fp32", "fp16"}
    assert any("no CUDAExecutionProvider" in r.note for r in gpu if r.engine == "onnxruntime")
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        bench_bundle(trained_bundle["bundle"], batch_sizes=(1,), device="cpu", gpu_batch_sizes=(0,))
    from anomaly.cli import main

    assert main(["bench", str(trained_bundle["bundle"]), "--device", "gpu"]) == 2
    assert main(["bench", str(trained_bundle["bundle"]), "--gpu-batch-sizes", "0"]) == 2


def test_tensorrt_without_its_libraries_is_left_out(trained_bundle: dict, monkeypatch) -> None:
    """onnxruntime-gpu lists its TensorRT provider even where TensorRT is not installed; ``auto``
    must not pick it (onnxruntime would log an error and retry), and asking for it says what is
    missing."""
    import anomaly.deploy.runtime as runtime

    monkeypatch.setattr(runtime.ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "_tensorrt_loadable", lambda: False)
    assert runtime.available_devices() == ["cpu"]
    rt = runtime.Runtime(trained_bundle["bundle"], device="auto")
    assert rt.providers == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="TensorRT's libraries .*libnvinfer.so.10.* cannot be loaded"):
        runtime.Runtime(trained_bundle["bundle"], device="tensorrt")
    monkeypatch.setattr(runtime, "_tensorrt_loadable", lambda: True)
    assert runtime.available_devices() == ["cpu", "tensorrt"]


def test_gpu_sessions_get_full_float32_and_one_cpu_thread(trained_bundle: dict, monkeypatch) -> None:
    """With a CUDA provider the session asks for full float32 (no TF32) unless ``tf32=True``, and
    one intra-op thread for the nodes left on the CPU. No GPU is needed to see what is asked for:
    the provider list is recorded and the model runs on the CPU provider."""
    import anomaly.deploy.runtime as runtime

    real = runtime.ort.InferenceSession
    asked: list = []

    def fake_session(path, sess_options=None, providers=None, **kwargs):
        asked.append((providers, sess_options.intra_op_num_threads))
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime.ort, "InferenceSession", fake_session)
    rt = runtime.Runtime(trained_bundle["bundle"], device="auto")
    assert asked[-1] == ([("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"], 1)
    assert rt.threads == 1 and rt.pipeline == "overlap" and not rt.split
    runtime.Runtime(trained_bundle["bundle"], device="auto", tf32=True, threads=3)
    assert asked[-1] == ([("CUDAExecutionProvider", {"use_tf32": "1"}), "CPUExecutionProvider"], 3)
    runtime.Runtime(trained_bundle["bundle"], device="cpu")
    assert asked[-1][0] == ["CPUExecutionProvider"] and asked[-1][1] == runtime.physical_cores()


def test_benchmark_harness_times_the_graph_on_the_runtimes_inputs(monkeypatch, tmp_path: Path) -> None:
    """``benchmarks/harness.py``'s reference windows: the runtime's own inputs, ``windows`` figures, on a fake clock."""
    import types

    import anomaly.deploy.bench as bench

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from harness import graph_windows

    clock = {"now": 0.0}
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    seen = []

    class FakeRuntime:
        preprocess = types.SimpleNamespace(channels=1, image_size=8, load=None)

        def infer(self, x: np.ndarray) -> None:
            seen.append(x.shape)
            clock["now"] += 0.25

    rates = graph_windows(FakeRuntime(), batch_size=2, images=None, seconds=0.5, windows=3)
    assert rates == [8.0, 8.0, 8.0]  # 2 images per 0.25 s call, whatever the window's length (3 calls at least)
    assert set(seen) == {(2, 1, 8, 8)} and len(seen) == 3 * (1 + 3)  # each window: 1 untimed call + 3 timed

"""Reduced-precision bundles: int8 static quantisation (CPU) and fp16 conversion (GPU). Torch-free.

Both read a bundle written by ``anomaly export`` and write a complete new bundle (``model.onnx``
+ ``model.json`` with the new file's sha256 and ``"precision": "int8" | "fp16"``). The graph's
inputs and outputs stay float32, so :class:`anomaly.deploy.runtime.Runtime` feeds and reads the same
arrays whatever the precision.

Only the *reconstructor* (the nodes that produce the ``reconstruction`` output) is reduced — for
int8 its convolutions and dense layers (:data:`QUANTIZED_OPS`), for fp16 all of it; the scoring tail (residual, SSIM statistics,
smoothing, top-k) stays float32, because SSIM's ``E[x^2] - E[x]^2`` loses most of its digits in
8 or 16 bits while costing little time.

* :func:`quantize_int8` — onnxruntime's ``quantize_static`` in QDQ format, per-channel weights,
  activation ranges calibrated on preprocessed *normal* images (the same :class:`Preprocess` as
  the runtime). onnxruntime's CPU provider fuses the Q/DQ pairs into integer kernels (VNNI on
  recent x86). Needs the ``onnx`` package.
* :func:`convert_fp16` — the reconstructor's weights and activations in float16 with casts at
  its borders (written here with the ``onnx`` package: onnxconverter-common's converter, tried
  first, mistypes a blocked ``Reshape`` when the scoring tail is kept in float32), for the CUDA
  / TensorRT providers; on a CPU it runs but is not faster.

Thresholds: the copied sidecar keeps the float32 bundle's calibration (the scores move little:
the agreement measured on the calibration images is recorded under ``"quantization"``); run
``anomaly calibrate`` on the new bundle to refit them on its own scores.

Example::

    quantize_int8("bundle/", "bundle_int8/", "data/train/good")
    convert_fp16("bundle/", "bundle_fp16/")
"""
from __future__ import annotations

import copy
import datetime as _dt
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from anomaly.data.io import paths_from
from anomaly.data.preprocess import Preprocess
from anomaly.deploy.bundle import MODEL_FILE, BundleError, load_sidecar, sha256_file, write_sidecar

__all__ = ["quantize_int8", "convert_fp16", "reconstructor_nodes", "QUANTIZED_OPS"]

log = logging.getLogger(__name__)

# The weight-heavy ops with integer kernels on onnxruntime's CPU provider; everything else
# (activations, the scoring tail) stays float. ConvTranspose is left out: the CPU provider has no
# integer kernel for it, so Q/DQ around it only adds work (measured: the int8 decoder ran at the
# float speed plus the dequantisation). Pass ``op_types`` to quantise it for other providers.
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


def _need_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # the base install has onnxruntime but not onnx
        raise ImportError("quantisation needs the onnx package: pip install onnx (or the [train] extra)") from exc
    return onnx


def reconstructor_nodes(graph: Any, output: str = "reconstruction") -> set[str]:
    """Names of the nodes ``output`` depends on (the reconstructor, without the scoring tail).

    Args:
        graph: an ``onnx.GraphProto`` whose nodes all have names.
    """
    producer = {o: n for n in graph.node for o in n.output}
    seen: set[str] = set()
    stack = [output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(node.input)
    return seen


def _name_nodes(model: Any) -> None:
    """Give unnamed nodes unique names (the quantiser selects nodes by name)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)


def _unquantize_tail(model: Any, tail: set[str]) -> int:
    """Point the scoring tail back at float tensors the quantiser rerouted through Q/DQ.

    QDQ quantisation of a tensor (``image``) rewires *every* consumer to the dequantised copy,
    so the residual would compare the reconstruction with a rounded, range-clipped input. The
    tail nodes get the original tensor back; the reconstructor keeps the quantised one.

    Returns:
        the number of inputs restored.
    """
    q_in = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    dq_src = {n.output[0]: q_in[n.input[0]] for n in model.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in q_in}
    restored = 0
    for n in model.graph.node:
        if n.name in tail:
            for k, name in enumerate(n.input):
                if name in dq_src:
                    n.input[k] = dq_src[name]
                    restored += 1
    return restored


def _calibration_batches(pre: Preprocess, paths: Sequence[Path], batch_size: int) -> list[np.ndarray]:
    """Preprocessed ``(n, C, S, S)`` batches of the readable calibration images (for a tiled
    bundle, up to 8 evenly spaced tiles of each: what the graph sees)."""
    from anomaly.data.io import ImageReadError

    xs: list[np.ndarray] = []
    skipped = 0
    for p in paths:
        try:
            if pre.tiled:
                tiles, _ = pre.tiles(pre.load(p))
                xs.extend(tiles[np.linspace(0, len(tiles) - 1, min(8, len(tiles))).round().astype(int)])
            else:
                xs.append(pre.load(p))
        except (ImageReadError, ValueError) as exc:
            skipped += 1
            log.warning("calibration image skipped: %s", exc)
    if not xs:
        raise ValueError(f"none of the {len(paths)} calibration image(s) could be read (expected normal images)")
    if skipped:
        log.warning("%d of %d calibration images could not be read", skipped, len(paths))
    arr = np.stack(xs)
    return [arr[i:i + batch_size] for i in range(0, len(arr), batch_size)]


def _write_bundle(src: Path, out: Path, model_bytes_writer: Any, meta: dict[str, Any]) -> Path:
    """Write ``out/model.onnx`` (via ``model_bytes_writer(path)``) then its sidecar, atomically each."""
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: write the reduced-precision bundle to a new folder, not over its source")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp_file = Path(tmp) / MODEL_FILE
        model_bytes_writer(tmp_file)
        os.replace(tmp_file, out / MODEL_FILE)
    meta["onnx"] = {**meta.get("onnx", {}), "file": MODEL_FILE, "sha256": sha256_file(out / MODEL_FILE)}
    write_sidecar(out, meta)
    return out


def _agreement(src: Path, out: Path, batches: Iterable[np.ndarray]) -> dict[str, Any]:
    """Scores of the source and the new bundle on the same images: correlation and differences."""
    from anomaly.deploy.runtime import Runtime

    a_rt, b_rt = Runtime(src, device="cpu"), Runtime(out, device="cpu")
    a, b = [], []
    for x in batches:
        a.append(a_rt.infer(x)["score"])
        b.append(b_rt.infer(x)["score"])
    sa, sb = np.concatenate(a).astype(np.float64), np.concatenate(b).astype(np.float64)
    res: dict[str, Any] = {"images": int(len(sa)), "max_abs_score_diff": float(np.abs(sa - sb).max()),
                           "mean_rel_score_diff": float(np.mean(np.abs(sa - sb) / np.maximum(np.abs(sa), 1e-12)))}
    if len(sa) >= 3 and sa.std() > 0 and sb.std() > 0:
        ra, rb = np.argsort(np.argsort(sa)), np.argsort(np.argsort(sb))
        res["score_pearson"] = float(np.corrcoef(sa, sb)[0, 1])
        res["score_spearman"] = float(np.corrcoef(ra, rb)[0, 1])
    return res


def quantize_int8(bundle_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  calibration_images: str | os.PathLike | Sequence[str | os.PathLike], *,
                  max_images: int = 200, batch_size: int = 8, per_channel: bool = True,
                  method: str = "minmax", symmetric_activations: bool = False,
                  op_types: Sequence[str] = QUANTIZED_OPS) -> Path:
    """Write an int8 (QDQ) copy of a bundle, calibrated on normal images.

    Args:
        bundle_dir: float32 bundle from ``anomaly export``.
        out_dir: new bundle folder (must differ from ``bundle_dir``).
        calibration_images: a folder (searched recursively), a file, or a list of files of
            *normal* images, e.g. the training folder; at most ``max_images`` are used (evenly
            spread). They are preprocessed exactly as the runtime does.
        batch_size: images per calibration run.
        per_channel: one scale per output channel of each convolution (better accuracy for
            the few-channel layers of small reconstructors; free at run time).
        method: activation range estimate, ``minmax``, ``entropy`` or ``percentile``.
        symmetric_activations: int8 activations with zero point 0 instead of uint8.
        op_types: op types quantised inside the reconstructor (default :data:`QUANTIZED_OPS`).

    Returns:
        the new bundle folder.

    Raises:
        BundleError: the source bundle is missing or inconsistent.
        ValueError: no readable calibration image, or ``out_dir == bundle_dir``.
        ImportError: the ``onnx`` package is missing.
    """
    onnx = _need_onnx()
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    src, out = Path(bundle_dir), Path(out_dir)
    meta = load_sidecar(src)
    if meta.get("precision", "fp32") != "fp32":
        raise BundleError(f"{src}: already {meta['precision']}; quantise the float32 bundle")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(methods)}")
    pre = Preprocess.from_dict(meta["preprocess"])
    items = calibration_images if isinstance(calibration_images, (list, tuple)) else [calibration_images]
    missing = [str(p) for p in items if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"no such calibration file or folder: {', '.join(missing)}")
    paths = paths_from(items)
    if len(paths) > max_images:
        paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, max_images)]
    batches = _calibration_batches(pre, paths, batch_size)
    conditional = "label" in meta["inputs"]

    class _Reader(CalibrationDataReader):
        """Feeds the calibration batches (and label 0 for conditional models) once."""

        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            if x is None:
                return None
            feeds = {"image": x}
            if conditional:
                feeds["label"] = np.zeros(len(x), np.int64)
            return feeds

    model = onnx.load(str(src / MODEL_FILE))
    _name_nodes(model)
    recon = reconstructor_nodes(model.graph)
    targets = [n.name for n in model.graph.node if n.name in recon and n.op_type in op_types]
    if not targets:
        raise ValueError(f"{src}: no {'/'.join(op_types)} node feeds the reconstruction; nothing to quantise")

    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / "named.onnx"
        onnx.save(model, str(named))
        prepped = Path(tmp) / "prepped.onnx"
        try:  # shape inference + folding, as onnxruntime recommends before quantize_static
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(named), str(prepped), skip_symbolic_shape=False)
        except Exception as exc:  # pre-processing is an optimisation, not a requirement
            log.warning("quantisation pre-processing skipped (%s)", exc)
            shutil.copyfile(named, prepped)
        # quant_pre_process may rename or fold nodes: select again on the prepared graph.
        pm = onnx.load(str(prepped))
        _name_nodes(pm)
        recon = reconstructor_nodes(pm.graph)
        tail = {n.name for n in pm.graph.node if n.name not in recon}
        targets = [n.name for n in pm.graph.node if n.name in recon and n.op_type in op_types]
        onnx.save(pm, str(prepped))
        quantized = Path(tmp) / "quantized.onnx"
        # The input's range is fixed by preprocessing: [0, 1], not what the normal images span
        # (a bright defect must not be clipped before the encoder sees it).
        overrides = {"image": [{"rmin": np.float32(0.0), "rmax": np.float32(1.0)}]}
        quantize_static(
            str(prepped), str(quantized), _Reader(), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8, per_channel=per_channel, nodes_to_quantize=targets,
            calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True,
                           "TensorQuantOverrides": overrides},
        )
        qm = onnx.load(str(quantized))
        restored = _unquantize_tail(qm, tail)
        log.debug("scoring tail: %d input(s) restored to float", restored)

        def write(path: Path) -> None:
            onnx.save(qm, str(path))

        new_meta = copy.deepcopy(meta)
        new_meta["precision"] = "int8"
        new_meta["quantization"] = {
            "kind": "static", "format": "QDQ", "activations": "int8" if symmetric_activations else "uint8",
            "weights": "int8", "per_channel": per_channel, "calibration_method": method,
            "calibration_images": int(sum(len(b) for b in batches)), "quantized_nodes": len(targets),
            "ops": list(op_types), "source_sha256": meta["onnx"]["sha256"],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "thresholds": "copied from the float32 bundle; refit with `anomaly calibrate`",
        }
        _write_bundle(src, out, write, new_meta)
    new_meta["quantization"]["agreement_on_calibration_images"] = _agreement(src, out, batches)
    write_sidecar(out, new_meta)
    log.info("int8 bundle %s: %d nodes quantised; %s", out, len(targets),
             new_meta["quantization"]["agreement_on_calibration_images"])
    return out


def _half_reconstructor(model: Any) -> int:
    """In place: run the reconstructor's nodes in float16, casting at its borders.

    Float initializers read only by reconstructor nodes become float16 (shared ones are copied);
    float tensors entering the reconstructor from outside (the ``image`` input) get a ``Cast`` to
    float16, and reconstructor outputs read outside it (``reconstruction``) a ``Cast`` back to
    float32 under their original name, so the graph's IO and the scoring tail stay float32.

    Returns:
        the number of nodes converted.
    """
    onnx = _need_onnx()
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    recon = reconstructor_nodes(g)
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    float_inputs = {i.name for i in g.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    produced_in_r = {o for n in g.node if n.name in recon for o in n.output}
    # Float tensors that are float32 outside: graph inputs and tensors made by tail nodes. Type
    # information comes from shape inference (non-float tensors such as Reshape's shape stay).
    inferred = onnx.shape_inference.infer_shapes(model)
    elem = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(g.input) + list(g.output)}
    new_nodes: list[Any] = []
    casts_in: dict[str, str] = {}
    renamed: dict[str, str] = {}  # outputs whose Cast back to float32 is still to be emitted
    half_of: dict[str, str] = {}  # every renamed output: other reconstructor nodes read the float16 name
    half_inits: dict[str, str] = {}
    for n in g.node:
        if n.name not in recon:
            new_nodes.append(n)
            continue
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        for k, name in enumerate(n.input):
            if not name:
                continue
            if name in produced_in_r:  # float16 already; read the float16 copy if the name went to a Cast back
                n.input[k] = half_of.get(name, name)
                continue
            if name in inits and inits[name].data_type == TensorProto.FLOAT:
                if name not in half_inits:
                    only_r = all(c.name in recon for c in consumers.get(name, []))
                    arr = numpy_helper.to_array(inits[name]).astype(np.float16)
                    new_name = name if only_r else f"{name}__fp16"
                    t = numpy_helper.from_array(arr, new_name)
                    if only_r:
                        inits[name].CopyFrom(t)
                    else:
                        g.initializer.append(t)
                    half_inits[name] = new_name
                n.input[k] = half_inits[name]
            elif name in float_inputs or elem.get(name) == TensorProto.FLOAT:
                if name not in casts_in:
                    casts_in[name] = f"{name}__fp16"
                    new_nodes.append(helper.make_node("Cast", [name], [casts_in[name]], to=TensorProto.FLOAT16,
                                                      name=f"cast_fp16_{name}"))
                n.input[k] = casts_in[name]
        for k, name in enumerate(n.output):
            outside = name in graph_outputs or any(c.name not in recon for c in consumers.get(name, []))
            if outside and elem.get(name, TensorProto.FLOAT) == TensorProto.FLOAT:
                renamed[name] = half_of[name] = f"{name}__fp16"
                n.output[k] = renamed[name]
        new_nodes.append(n)
        for old, half in list(renamed.items()):
            if half in n.output:
                new_nodes.append(helper.make_node("Cast", [half], [old], to=TensorProto.FLOAT, name=f"cast_fp32_{old}"))
                del renamed[old]
    g.ClearField("node")
    g.node.extend(new_nodes)
    g.ClearField("value_info")  # intermediate types changed; onnxruntime infers them again
    return len(recon)


def convert_fp16(bundle_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 check_images: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> Path:
    """Write an fp16 copy of a bundle (reconstructor in float16; scoring tail and IO in float32).

    For the CUDA and TensorRT providers (tensor cores); onnxruntime's CPU provider runs it by
    casting back to float32 around the ops it has no float16 kernel for, slower than float32.

    Args:
        bundle_dir: float32 bundle from ``anomaly export``.
        out_dir: new bundle folder (must differ from ``bundle_dir``).
        check_images: optional normal images to record fp16-vs-fp32 score agreement on (CPU).

    Returns:
        the new bundle folder.

    Raises:
        ImportError: the ``onnx`` package is missing.
    """
    onnx = _need_onnx()
    src, out = Path(bundle_dir), Path(out_dir)
    meta = load_sidecar(src)
    if meta.get("precision", "fp32") != "fp32":
        raise BundleError(f"{src}: already {meta['precision']}; convert the float32 bundle")
    model = onnx.load(str(src / MODEL_FILE))
    _name_nodes(model)
    converted = _half_reconstructor(model)
    onnx.checker.check_model(model)
    new_meta = copy.deepcopy(meta)
    new_meta["precision"] = "fp16"
    new_meta["fp16"] = {"nodes": converted, "io": "float32", "scoring_tail": "float32",
                        "source_sha256": meta["onnx"]["sha256"],
                        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    _write_bundle(src, out, lambda path: onnx.save(model, str(path)), new_meta)
    if check_images is not None:
        items = check_images if isinstance(check_images, (list, tuple)) else [check_images]
        paths = paths_from(items)[:64]
        pre = Preprocess.from_dict(meta["preprocess"])
        new_meta["fp16"]["agreement"] = _agreement(src, out, _calibration_batches(pre, paths, 8))
        write_sidecar(out, new_meta)
    log.info("fp16 bundle %s written (%d nodes in float16)", out, converted)
    return out

"""Peer baselines from anomalib (GANomaly, DRAEM) on the same folders as ``benchmarks/quality.py``.

anomalib pulls lightning and friends, so it lives in its own virtualenv, never in the project's::

    python3 -m venv /tmp/anomalib_venv
    # reuse the project's CPU torch instead of downloading another one:
    .venv/bin/python -c "import torch,os;print(os.path.dirname(os.path.dirname(torch.__file__)))" \\
        > /tmp/anomalib_venv/lib/python3.11/site-packages/main_venv.pth
    /tmp/anomalib_venv/bin/pip install anomalib
    /tmp/anomalib_venv/bin/python benchmarks/peers_anomalib.py --data /tmp/qb/data/elpv_mono \\
        --models ganomaly --epochs 10 --image-size 64 --out /tmp/qb/peers_mono.json

``--data`` is an MVTec-style folder written by ``benchmarks/quality.py`` (``train/good``,
``test/good``, ``test/defective`` and, for the textures, ``ground_truth``); the same train images
and the same test images are used. The metrics come from *our* code (:mod:`anomaly.metrics`,
torch-free, imported from this checkout) on anomalib's raw ``pred_score`` and ``anomaly_map``
(not anomalib's normalised metrics): image AUROC / AP / F1-max, and pixel AUROC / AUPRO at model
resolution where the folder has masks, with the train CPU seconds of this process.

DRAEM runs offline: its ``dtd_dir`` points to an existing empty folder, so anomalib's
``PerlinAnomalyGenerator`` fills its Perlin-shaped defects with noise instead of DTD textures
(with ``dtd_dir=None`` it would try to download DTD). ``--max-minutes`` stops training on a
wall-clock budget (Lightning's ``max_time``) so peers get a CPU budget comparable to ours.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--models", default="ganomaly")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock training budget per model")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch
    from lightning.pytorch import seed_everything

    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import Draem, Ganomaly

    torch.set_num_threads(args.threads)
    root = Path(args.data)
    rows = []
    for name in args.models.split(","):
        seed_everything(args.seed)
        size = (args.image_size, args.image_size)
        if name == "ganomaly":
            model = Ganomaly(batch_size=32, pre_processor=Ganomaly.configure_pre_processor(size),
                             post_processor=True, evaluator=False, visualizer=False)
        elif name == "draem":
            dtd = Path(args.out).parent / "dtd_empty"  # exists and is empty: Perlin noise, no download
            dtd.mkdir(parents=True, exist_ok=True)
            model = Draem(dtd_dir=str(dtd), pre_processor=Draem.configure_pre_processor(size),
                          evaluator=False, visualizer=False)
        else:
            raise SystemExit(f"unknown peer {name}")
        # every defect folder (ELPV: test/defective; textures: one per defect kind); masks are
        # not given to anomalib: our metrics read them (see evaluate)
        abnormal = sorted(f"test/{d.name}" for d in (root / "test").iterdir() if d.is_dir() and d.name != "good")
        dm = Folder(name=root.name, root=root, normal_dir="train/good", abnormal_dir=abnormal,
                    normal_test_dir="test/good", train_batch_size=32, eval_batch_size=32, num_workers=0,
                    val_split_mode="same_as_test", seed=args.seed)
        budget = {"max_time": {"minutes": args.max_minutes}} if args.max_minutes else {}
        engine = Engine(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, **budget,
                        default_root_dir=str(Path(args.out).parent / f"anomalib_{root.name}_{name}"),
                        enable_progress_bar=False)
        c0, w0 = time.process_time(), time.perf_counter()
        engine.fit(model=model, datamodule=dm)
        train_cpu, train_wall = time.process_time() - c0, time.perf_counter() - w0
        preds = engine.predict(model=model, dataloaders=dm.test_dataloader())
        row = {"dataset": root.name, "config": f"anomalib {name}", "epochs": args.epochs,
               "epochs_done": int(engine.trainer.current_epoch), "image_size": args.image_size,
               **evaluate(root, preds), "train_cpu_s": round(train_cpu, 1), "train_wall_s": round(train_wall, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1))
    return 0


def evaluate(root: Path, preds: list) -> dict:
    """Our metrics on anomalib's raw predictions, matched to our test samples by file name."""
    import cv2

    from anomaly.metrics import aupro, image_metrics, pixel_metrics
    from benchmarks.quality import _mask_at, test_samples

    by_path: dict[str, tuple[float, np.ndarray | None]] = {}
    for b in preds:
        maps = getattr(b, "anomaly_map", None)
        for i, (path, score) in enumerate(zip(b.image_path, np.asarray(b.pred_score).reshape(-1))):
            amap = None if maps is None else np.asarray(maps[i], dtype=np.float32).reshape(maps[i].shape[-2:])
            by_path[str(Path(path).resolve())] = (float(score), amap)
    samples = test_samples(root)
    got = [by_path[str(Path(s.path).resolve())] for s in samples]
    labels = np.array([s.label for s in samples])
    m = image_metrics(labels, np.array([g[0] for g in got]))
    out = {"image_auroc": m["auroc"], "image_ap": m["ap"], "image_f1_max": m["f1_max"],
           "n_test_good": int((labels == 0).sum()), "n_test_bad": int((labels == 1).sum())}
    if any(s.mask is not None for s in samples) and all(g[1] is not None for g in got):
        size = got[0][1].shape[0]
        maps = np.stack([cv2.resize(g[1], (size, size)) for g in got])
        masks = np.stack([_mask_at(s.mask, size) for s in samples])
        out.update(pixel_metrics(masks, maps))
        out["aupro"] = aupro(masks, maps)
    return out


if __name__ == "__main__":
    raise SystemExit(main())

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
``test/good``, ``test/defective``); the same train images and the same test images are used.
Image AUROC / AP / F1-max are computed here with scikit-learn from anomalib's raw
``pred_score`` (not anomalib's normalised metrics), with the train CPU seconds of this process.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--models", default="ganomaly")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch
    from lightning.pytorch import seed_everything
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

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
            model = Draem(dtd_dir=None, pre_processor=Draem.configure_pre_processor(size),
                          evaluator=False, visualizer=False)
        else:
            raise SystemExit(f"unknown peer {name}")
        dm = Folder(name=root.name, root=root, normal_dir="train/good", abnormal_dir="test/defective",
                    normal_test_dir="test/good", train_batch_size=32, eval_batch_size=32, num_workers=0,
                    val_split_mode="same_as_test", seed=args.seed)
        engine = Engine(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        default_root_dir=str(Path(args.out).parent / f"anomalib_{root.name}_{name}"),
                        enable_progress_bar=False)
        c0, w0 = time.process_time(), time.perf_counter()
        engine.fit(model=model, datamodule=dm)
        train_cpu, train_wall = time.process_time() - c0, time.perf_counter() - w0
        preds = engine.predict(model=model, dataloaders=dm.test_dataloader())
        scores = np.concatenate([np.asarray(b.pred_score).reshape(-1) for b in preds])
        labels = np.concatenate([np.asarray(b.gt_label).reshape(-1) for b in preds]).astype(int)
        pr, rc, _ = precision_recall_curve(labels, scores)
        f1 = np.max(2 * pr * rc / np.maximum(pr + rc, 1e-12))
        row = {"dataset": root.name, "config": f"anomalib {name}", "epochs": args.epochs, "image_size": args.image_size,
               "image_auroc": float(roc_auc_score(labels, scores)),
               "image_ap": float(average_precision_score(labels, scores)), "image_f1_max": float(f1),
               "n_test_good": int((labels == 0).sum()), "n_test_bad": int((labels == 1).sum()),
               "train_cpu_s": round(train_cpu, 1), "train_wall_s": round(train_wall, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

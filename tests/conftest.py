"""Shared fixtures: small generated datasets, so tests never download anything.

The same tests also run in a venv without torch (``tests/test_packaging.py``): there the trained
bundle comes from the torch venv through ``ANOMALY_TEST_TRAINED`` and torch is never imported.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test trains with one torch thread: CI has 2 cores and results must not depend on it."""
    if importlib.util.find_spec("torch") is None:  # the torch-free venv: nothing to pin
        yield
        return
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth periodic texture with noise, uint8 (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    img = 0.5 + 0.2 * np.sin(2 * np.pi * xx / 16 + phase) * np.cos(2 * np.pi * yy / 16)
    img += rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_mvtec(root: Path, n_train: int = 12, n_good: int = 4, n_bad: int = 4, size: int = 48, seed: int = 0) -> Path:
    """Write an MVTec-style category: train/good, test/good, test/blob + ground_truth/blob masks."""
    rng = np.random.default_rng(seed)
    for sub in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        cv2.imwrite(str(root / "train/good" / f"{i:03d}.png"), _texture(rng, size))
    for i in range(n_good):
        cv2.imwrite(str(root / "test/good" / f"{i:03d}.png"), _texture(rng, size))
    for i in range(n_bad):
        img = _texture(rng, size)
        mask = np.zeros_like(img)
        cx, cy = rng.integers(size // 4, 3 * size // 4, 2)
        cv2.circle(mask, (int(cx), int(cy)), size // 8, 255, -1)
        img[mask > 0] = 250
        cv2.imwrite(str(root / "test/blob" / f"{i:03d}.png"), img)
        cv2.imwrite(str(root / "ground_truth/blob" / f"{i:03d}_mask.png"), mask)
    return root


@pytest.fixture
def mvtec_dir(tmp_path: Path) -> Path:
    """A tiny MVTec-style category folder (48x48 grayscale textures, blob defects with masks)."""
    return make_mvtec(tmp_path / "tiles")


@pytest.fixture
def plain_dir(tmp_path: Path) -> Path:
    """A plain folder of 8 normal images, two of them in a subfolder."""
    rng = np.random.default_rng(1)
    root = tmp_path / "plain"
    (root / "sub").mkdir(parents=True)
    for i in range(8):
        target = root / ("sub" if i < 2 else "") / f"img{i}.png"
        cv2.imwrite(str(target), _texture(rng, 40))
    return root


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory) -> dict:
    """Train a tiny AAE on a generated category, export it; shared by export/runtime/CLI tests.

    Returns a dict with ``data`` (category folder), ``run`` (run folder) and ``bundle`` paths. In the
    torch-free venv, ``ANOMALY_TEST_TRAINED`` (JSON of those three paths) names a copy made by the torch
    venv instead.
    """
    given = os.environ.get("ANOMALY_TEST_TRAINED")
    if given:
        return {k: Path(v) for k, v in json.loads(given).items()}
    import torch

    from anomaly.deploy.export import export_run
    from anomaly.training.config import TrainConfig
    from anomaly.training.run import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    data = make_mvtec(root / "tiles", n_train=24, size=48)
    cfg = TrainConfig(data=str(data), out=str(root / "run"), model="aae", image_size=32, epochs=3, batch_size=8,
                      model_kwargs={"latent_dim": 16, "base_channels": 8}, seed=0)
    train(cfg)
    # The map's aggregate alone: the runtime tests compare scores across batch compositions at
    # rtol 1e-5, and this 3-epoch model's normal scores barely vary (std 0.003 on a mean of 0.5),
    # so the latent knn score's standardisation would magnify float noise ~200-fold. The default
    # export (knn for an AAE) is tested from the same run in test_export_runtime.py.
    bundle = export_run(root / "run", root / "bundle", latent="none")
    return {"data": data, "run": root / "run", "bundle": bundle}


def grow_audit(src: Path, dst: Path, copies: int, errors: int = 3, seed: int = 0) -> list[dict]:
    """An audit folder ``dst`` that looks like a large run: ``src``'s manifest and records, plus
    ``copies`` copies of its records under other paths with other (float32) scores, ``errors`` error
    rows, and a torn last line as a killed run leaves it. The copies point at ``src``'s image files.

    Returns the complete records, in journal order.
    """
    import json
    import shutil

    rng = np.random.default_rng(seed)
    dst.mkdir(parents=True)
    shutil.copy(src / "audit.json", dst / "audit.json")
    base = [json.loads(line) for line in (src / "results.jsonl").read_text().splitlines()]
    records = list(base)
    for i in range(copies):
        rec = dict(base[i % len(base)])
        rec.update(id=f"copy{i:05d}", path=str(Path(rec["path"]).with_name(f"copy{i:05d}.png")),
                   score=float(np.float32(rng.gamma(2.0, 0.5))))
        records.append(rec)
    for i in range(errors):
        records.insert(1 + i * 7, {"id": f"bad{i}", "path": f"/nowhere/bad{i}.png", "score": None, "probability": None,
                                   "label": None, "error": "not an image"})
    with open(dst / "results.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
        fh.write('{"id": "torn", "path": "/now')
    for name in ("heatmaps", "reconstructions", "thumbs"):
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name)
    return records

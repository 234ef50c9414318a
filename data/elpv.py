"""The built-in default data: real electroluminescence images of solar cells (ELPV).

The ``elpv-dataset`` package (Buerhop-Lutz et al., 2018; Deitsch et al., 2019) ships 2,624
300x300 8-bit grayscale cell images, each with a defect probability (0, 1/3, 2/3, 1) and a cell
type (mono/poly). :func:`prepare_elpv` writes an MVTec-style category from it — functional
cells (probability 0) as normal, defective cells (probability 1) as anomalies — split
deterministically by a seed:

    ROOT/elpv_<type>/train/good      60 % of the functional cells (training + validation)
    ROOT/elpv_<type>/calibrate/good  15 % (held out for threshold calibration)
    ROOT/elpv_<type>/test/good       25 % (held out for evaluation)
    ROOT/elpv_<type>/test/defective  every cell with defect probability 1

The images are read from the installed package, never downloaded; install it with the
``[demo]`` extra.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from anomaly.data.io import atomic_write

__all__ = ["elpv_root", "load_labels", "prepare_elpv", "CELL_TYPES"]

log = logging.getLogger(__name__)
CELL_TYPES = ("mono", "poly", "all")


def elpv_root() -> Path:
    """Folder of the installed ``elpv-dataset`` data (``labels.csv`` + ``images/``)."""
    try:
        import elpv_dataset
    except ImportError as exc:
        raise ModuleNotFoundError("the demo data needs the elpv-dataset package: pip install 'anomaly[demo]' "
                                  "(or pip install elpv-dataset)") from exc
    root = Path(elpv_dataset.__file__).parent / "data"
    if not (root / "labels.csv").is_file():
        raise FileNotFoundError(f"{root}: labels.csv missing from the elpv-dataset package")
    return root


def load_labels() -> list[tuple[Path, float, str]]:
    """``[(image path, defect probability, cell type), ...]`` in the package's order."""
    root = elpv_root()
    rows = []
    for line in (root / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            rows.append((root / parts[0], float(parts[1]), parts[2]))
    return rows


def prepare_elpv(out: str | os.PathLike, cell_type: str = "mono", seed: int = 0,
                 train_fraction: float = 0.6, calibrate_fraction: float = 0.15) -> Path:
    """Write the MVTec-style ELPV category under ``out`` (see module docstring); returns its folder.

    Re-running with the same arguments reuses the existing folder (checked via ``split.json``).
    """
    if cell_type not in CELL_TYPES:
        raise ValueError(f"cell_type must be one of {CELL_TYPES}, got {cell_type!r}")
    root = Path(out) / f"elpv_{cell_type}"
    settings = {"cell_type": cell_type, "seed": seed, "train_fraction": train_fraction,
                "calibrate_fraction": calibrate_fraction, "defect_probability": 1.0}
    manifest = root / "split.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("settings") == settings:
        return root
    rows = [r for r in load_labels() if cell_type == "all" or r[2] == cell_type]
    good = [r[0] for r in rows if r[1] == 0.0]
    bad = [r[0] for r in rows if r[1] == 1.0]
    order = np.random.default_rng(seed).permutation(len(good))
    n_train = int(round(train_fraction * len(good)))
    n_cal = int(round(calibrate_fraction * len(good)))
    parts = {
        "train/good": [good[i] for i in order[:n_train]],
        "calibrate/good": [good[i] for i in order[n_train:n_train + n_cal]],
        "test/good": [good[i] for i in order[n_train + n_cal:]],
        "test/defective": bad,
    }
    if root.exists():
        shutil.rmtree(root)
    for sub, paths in parts.items():
        d = root / sub
        d.mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copyfile(p, d / p.name)
    with atomic_write(manifest) as fh:
        json.dump({"settings": settings, "counts": {k: len(v) for k, v in parts.items()},
                   "files": {k: sorted(p.name for p in v) for k, v in parts.items()}}, fh, indent=1)
    log.info("wrote ELPV %s split to %s: %s", cell_type, root, {k: len(v) for k, v in parts.items()})
    return root

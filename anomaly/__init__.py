"""anomaly: find and localize defects in images, trained on normal images only.

The public API is re-exported lazily (``from anomaly import Runtime``) so that importing the
package stays cheap and torch-free; torch is imported only by the training-side names.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AnomalyDetector": "anomaly.detector",
    "create_model": "anomaly.registry",
    "list_models": "anomaly.registry",
    "get_spec": "anomaly.registry",
    "register_model": "anomaly.registry",
    "ThresholdCalibrator": "anomaly.calibration",
    "PixelThresholdCalibrator": "anomaly.calibration",
    "Scorer": "anomaly.scoring",
    "ReconstructionScorer": "anomaly.scoring",
    "FlipAveraged": "anomaly.scoring",
    "Preprocess": "anomaly.data.preprocess",
    "read_image": "anomaly.data.io",
    "Runtime": "anomaly.deploy.runtime",
    "ImageResult": "anomaly.deploy.runtime",
    "TrainConfig": "anomaly.training.config",
    "train": "anomaly.training.run",
    "export_run": "anomaly.deploy.export",
    "calibrate_bundle": "anomaly.deploy.calibrate",
    "run_audit": "anomaly.deploy.audit",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'anomaly' has no attribute {name!r}")

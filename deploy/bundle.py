"""The deployable bundle: ``model.onnx`` + ``model.json`` (the sidecar), checked on load.

The sidecar (schema version :data:`SCHEMA_VERSION`) holds the preprocessing, the model's name
and arguments, input/output names, scoring settings, score statistics of the normal validation
set, the calibrated thresholds with the method that produced them, the ONNX file's sha256 and
the package versions. Thresholds live here, not in the graph, so a line engineer can move them
without re-exporting; a modified or mismatched ONNX file is refused with a clear error.

Torch-free: numpy and the standard library only.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from anomaly.data.io import atomic_write

__all__ = ["SCHEMA_VERSION", "MODEL_FILE", "SIDECAR_FILE", "BundleError", "sha256_file", "load_sidecar",
           "write_sidecar", "update_calibration"]

SCHEMA_VERSION = 1
MODEL_FILE = "model.onnx"
SIDECAR_FILE = "model.json"


class BundleError(ValueError):
    """A bundle folder that is missing, incomplete, from another schema, or tampered with."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_sidecar(bundle: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Read and check ``bundle/model.json``.

    Args:
        bundle: the bundle folder.
        verify: check the ONNX file's sha256 against the sidecar.

    Raises:
        BundleError: missing folder or files, unreadable JSON, other schema version, hash mismatch.
    """
    root = Path(bundle)
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle folder (expected a folder written by `anomaly export`)")
    side, onnx_path = root / SIDECAR_FILE, root / MODEL_FILE
    for f in (side, onnx_path):
        if not f.is_file():
            raise BundleError(f"{root}: missing {f.name} (a bundle holds {MODEL_FILE} and {SIDECAR_FILE})")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{side}: not valid JSON ({exc})") from exc
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{side}: schema version {version!r}, this anomaly reads version {SCHEMA_VERSION}; "
                          "re-export the bundle with this version")
    if verify:
        expected = meta.get("onnx", {}).get("sha256")
        actual = sha256_file(onnx_path)
        if expected != actual:
            raise BundleError(f"{onnx_path}: sha256 {actual[:12]}… does not match the sidecar's {str(expected)[:12]}…; "
                              "the model file was modified or belongs to another bundle — re-export it")
    return meta


def write_sidecar(bundle: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Write ``bundle/model.json`` atomically."""
    with atomic_write(Path(bundle) / SIDECAR_FILE) as fh:
        json.dump(meta, fh, indent=2, sort_keys=False)
        fh.write("\n")


def update_calibration(bundle: str | os.PathLike, calibration: dict[str, Any]) -> dict[str, Any]:
    """Replace only the sidecar's ``calibration`` section (atomically); returns the new sidecar."""
    meta = load_sidecar(bundle)
    meta["calibration"] = calibration
    write_sidecar(bundle, meta)
    return meta

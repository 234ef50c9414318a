"""Timing helpers the benchmark scripts share (not part of the installed product).

``anomaly bench`` (:mod:`anomaly.deploy.bench`) holds what the command itself times: the graph rows,
the audit rows, paired ratios. The scripts here compare the audit with pure inference in other
ways (``audit_split.py --ceiling``, ``audit_workers.py``); the reference they divide by is the
float32 graph timed the way ``anomaly bench`` times its own reference: back-to-back windows on
the same preprocessed images.

Example::

    import sys; sys.path.insert(0, "benchmarks")
    from harness import graph_windows

    rates = graph_windows(Runtime("bundle/"), batch_size=16, images="data/test", seconds=1.5, windows=5)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["graph_windows"]


def graph_windows(runtime: Any, batch_size: int, images: str | os.PathLike | None, seconds: float,
                  windows: int = 1) -> list[float]:
    """Images/s of ``runtime``'s graph alone, in ``windows`` back-to-back windows of ``seconds``.

    Args:
        runtime: an :class:`anomaly.deploy.runtime.Runtime` (its device and threads are what is timed).
        batch_size: images per call.
        images: a folder whose files (preprocessed by the runtime, cycled) are fed; ``None`` or a
            file list: seeded noise of the model's input shape.
        seconds, windows: each window's length and how many (at least one).

    Returns:
        one images/s figure per window, in the order timed.
    """
    from anomaly.deploy.bench import sample_inputs, time_window

    folder = images if images is not None and Path(images).is_dir() else None
    x = sample_inputs(runtime.preprocess, batch_size, folder)
    return [time_window(lambda: runtime.infer(x), batch_size, seconds) for _ in range(max(1, windows))]

"""Review an audit in the browser: ``OUT/report.html``, self-contained, and an optional local server.

``anomaly review OUT`` writes one HTML file that opens from disk (no network access); with
``--serve`` it also serves it on 127.0.0.1 and saves decisions back into ``OUT``. The parts:

* :mod:`anomaly.deploy.review_report` — :func:`build_report`: the audit's journal -> the page, with its
  data embedded; :func:`validate_decisions`.
* ``anomaly/deploy/review_static/`` — the page itself as package data: ``review.html`` (markup),
  ``review.css``, ``review.js``, inlined by the builder.
* :mod:`anomaly.deploy.review_server` — :func:`serve_report`: the local server (``Host`` checked on
  every request, a per-run token for ``POST /decisions``).

The page shows

* the histogram of the normal calibration scores (the sidecar's ``calibration.image.normal_histogram``,
  copied into ``audit.json`` by the audit) and of this audit's scores, with the calibrated threshold
  (dashed) and the threshold being tried (red) — an inline SVG rendered by the builder, moved by the page;
* a threshold slider that recounts flagged images live, and filters (all / flagged / passed / errors);
* images sorted by score: thumbnail, score, probability, regions; a viewer with the heatmap over the
  original (opacity, zoom), the regions' boxes, and the reconstruction beside it when saved;
* per flagged image, "defect" / "false alarm" buttons (keys ``d`` / ``f``; ``j`` / ``k`` move), kept in
  the browser's local storage, and "save decisions": a ``decisions.json`` download and, when the page
  is served by :func:`serve_report`, a POST that writes ``OUT/decisions.json`` atomically.

Decisions file (input of ``anomaly calibrate --reviews``)::

    {"bundle_sha256": "<the ONNX model's sha256>",
     "decisions": [{"path": "/abs/img.png", "score": 0.123, "decision": "defect" | "false_alarm"}, ...],
     "threshold": <slider value when saved>, "calibrated_threshold": ..., "saved": "<ISO time>"}

Example::

    report = build_report("audit_out/")             # -> audit_out/report.html
    server = serve_report("audit_out/", port=0)     # 127.0.0.1 only
    print(server.url)                               # http://127.0.0.1:PORT/?token=...
    server.serve_forever()
"""
from __future__ import annotations

from anomaly.deploy.review_report import (DECISIONS, DECISIONS_FILE, REPORT_FILE, REPORT_ROWS, ReviewError, build_report,
                                          page_data, validate_decisions)
from anomaly.deploy.review_server import TOKEN_HEADER, ReviewServer, serve_report

__all__ = ["build_report", "serve_report", "validate_decisions", "page_data", "ReviewError", "ReviewServer", "DECISIONS",
           "DECISIONS_FILE", "REPORT_FILE", "REPORT_ROWS", "TOKEN_HEADER"]

"""Review an audit in the browser: ``OUT/report.html``, self-contained, and an optional local server.

:func:`build_report` reads an ``anomaly audit`` folder (``audit.json`` + ``results.jsonl``) and writes
``OUT/report.html``: one file with inline CSS and JavaScript, no network access. Images are
referenced by relative paths inside ``OUT`` (``thumbs/``, ``heatmaps/``, ``reconstructions/``) and the
original files by their path relative to ``OUT`` (a local server maps them to ``/original/<id>``).
The page shows

* the histogram of the normal calibration scores (the sidecar's ``calibration.image.normal_histogram``,
  copied into ``audit.json`` by the audit) and of this audit's scores, with the calibrated threshold
  (dashed) and the threshold being tried (red) — an inline SVG rendered here, moved by the page;
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
    server.serve_forever()
"""
from __future__ import annotations

import base64
import heapq
import html
import json
import logging
import math
import mimetypes
import os
from datetime import datetime, timezone
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from anomaly.data.io import atomic_write
from anomaly.deploy.audit import BROWSER_IMAGES, iter_journal

__all__ = ["build_report", "serve_report", "validate_decisions", "ReviewError", "DECISIONS", "REPORT_FILE", "REPORT_ROWS"]

log = logging.getLogger(__name__)

DECISIONS = ("defect", "false_alarm")
REPORT_FILE = "report.html"
DECISIONS_FILE = "decisions.json"
#: Images listed in full on the page by default (the highest scores; all images are counted).
REPORT_ROWS = 20_000
_MAX_POST = 64 << 20


class ReviewError(ValueError):
    """An audit folder that cannot be reviewed (missing, empty, not written by ``anomaly audit``)."""


def validate_decisions(doc: Any) -> list[dict[str, Any]]:
    """Check a decisions document; returns its decisions (the last one per path wins).

    Raises:
        ValueError: not ``{"bundle_sha256": str, "decisions": [{"path", "score", "decision"}]}``.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("decisions"), list):
        raise ValueError('expected {"bundle_sha256": ..., "decisions": [...]}')
    if not isinstance(doc.get("bundle_sha256"), str):
        raise ValueError("missing bundle_sha256 (the model the scores come from)")
    out: dict[str, dict[str, Any]] = {}
    for i, d in enumerate(doc["decisions"]):
        if not isinstance(d, dict) or not isinstance(d.get("path"), str):
            raise ValueError(f"decision {i}: expected an object with a path")
        if d.get("decision") not in DECISIONS:
            raise ValueError(f"decision {i} ({d['path']}): decision must be one of {list(DECISIONS)}, got {d.get('decision')!r}")
        score = d.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"decision {i} ({d['path']}): score must be a finite number, got {score!r}")
        out[d["path"]] = {"path": d["path"], "score": float(score), "decision": d["decision"]}
    return list(out.values())


def _load_manifest(out: Path) -> dict[str, Any]:
    if not out.is_dir():
        raise ReviewError(f"{out}: no such folder (expected an `anomaly audit` output folder)")
    manifest_path = out / "audit.json"
    if not manifest_path.is_file():
        raise ReviewError(f"{out}: no audit.json; this is not a folder written by `anomaly audit`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReviewError(f"{manifest_path}: not valid JSON ({exc})") from exc
    return manifest


class _Selection:
    """One streaming pass over the journal: every score, and the records the page lists in full.

    The page lists the ``limit`` highest-scoring images, up to ``limit`` failed ones, and every
    image with a saved decision; ``limit`` None lists all. Scores of all images travel as one
    packed array, so the page's counts stay exact for any threshold.
    """

    def __init__(self, limit: int | None, decided: set[str]) -> None:
        self.limit, self.decided = limit, decided
        self.total = 0
        self.scores: list[float] = []
        self.heap: list[tuple[float, int, dict[str, Any]]] = []  # min-heap of the top ``limit``
        self.errors: list[dict[str, Any]] = []
        self.n_errors = 0
        self.extra: dict[str, dict[str, Any]] = {}  # decided records outside the top

    def add(self, rec: dict[str, Any]) -> None:
        seq = self.total
        self.total += 1
        if rec.get("error") is not None or rec.get("score") is None:
            self.n_errors += 1
            if self.limit is None or len(self.errors) < self.limit:
                self.errors.append(rec)
            elif rec["path"] in self.decided:
                self.extra[rec["path"]] = rec
            return
        score = float(rec["score"])
        self.scores.append(score)
        item = (score, -seq, rec)  # ties: the earlier record ranks higher
        if self.limit is None or len(self.heap) < self.limit:
            heapq.heappush(self.heap, item)
            return
        if item[:2] > self.heap[0][:2]:
            item = heapq.heapreplace(self.heap, item)
        if item[2]["path"] in self.decided:
            self.extra[item[2]["path"]] = item[2]

    def records(self) -> list[dict[str, Any]]:
        listed = [r for *_, r in self.heap] + self.errors
        paths = {r["path"] for r in listed}
        return listed + [r for p, r in self.extra.items() if p not in paths]


def _packed_scores(scores: list[float]) -> tuple[str, str]:
    """Sorted scores as base64 little-endian floats -> (text, "f4" | "f8"). float32 (half the bytes)
    when every score survives the round trip: the model's scores are float32."""
    a = np.sort(np.asarray(scores, dtype=np.float64))
    dtype = "<f4" if np.array_equal(a.astype(np.float32).astype(np.float64), a) else "<f8"
    return base64.b64encode(a.astype(dtype).tobytes()).decode("ascii"), dtype[1:]


def _existing_decisions(out: Path, sha: str | None) -> dict[str, str]:
    p = out / DECISIONS_FILE
    if not p.is_file():
        return {}
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        decisions = validate_decisions(doc)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        log.warning("%s: ignored (%s)", p, exc)
        return {}
    if doc.get("bundle_sha256") != sha:
        log.warning("%s: made with another model; not loaded into the report", p)
        return {}
    return {d["path"]: d["decision"] for d in decisions}


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _histogram_svg(normal: dict[str, list] | None, scores: list[float], threshold: float | None) -> tuple[str, float, float]:
    """Inline SVG of the normal-score and audit-score densities with threshold lines -> (svg, lo, hi)."""
    W, H, ml, mr, mt, mb = 640, 200, 30, 26, 26, 30
    pw, ph = W - ml - mr, H - mt - mb
    values = ([min(scores), max(scores)] if len(scores) else []) + ([threshold] if threshold is not None else [])
    if normal and normal.get("edges"):
        values += [normal["edges"][0], normal["edges"][-1]]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.03 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def sx(v: float) -> float:
        return ml + (v - lo) / (hi - lo) * pw

    # both distributions on the same display bins (the stored normal histogram is re-binned by bin
    # centre), each scaled to its own peak: the calibration set and the audit differ in size and spread
    nbins = 40
    edges = np.linspace(lo, hi, nbins + 1)
    bars: list[tuple[str, float, float, float]] = []  # (class, x0, x1, count)
    if normal and normal.get("counts") and sum(normal["counts"]) > 0:
        ne = np.asarray(normal["edges"], dtype=np.float64)
        counts, _ = np.histogram(0.5 * (ne[:-1] + ne[1:]), bins=edges, weights=np.asarray(normal["counts"], dtype=np.float64))
        bars += [("h-normal", float(a), float(b), float(c)) for a, b, c in zip(edges[:-1], edges[1:], counts)]
    if len(scores):
        counts, _ = np.histogram(np.asarray(scores), bins=edges)
        bars += [("h-audit", float(a), float(b), float(c)) for a, b, c in zip(edges[:-1], edges[1:], counts)]
    peak = {cls: max([d for c, *_, d in bars if c == cls] + [1e-12]) * 1.08 for cls in ("h-normal", "h-audit")}
    parts = [f'<svg id="histogram" class="histogram" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
             f'aria-label="score histogram" data-lo="{lo!r}" data-hi="{hi!r}" data-left="{ml}" data-width="{pw}">',
             f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" class="h-bg"/>']
    for cls, a, b, d in bars:
        if d <= 0:
            continue
        x0, x1 = sx(a), sx(b)
        h = d / peak[cls] * ph
        parts.append(f'<rect class="{cls}" x="{x0:.2f}" y="{mt + ph - h:.2f}" width="{max(x1 - x0 - 0.4, 0.6):.2f}" height="{h:.2f}"/>')
    parts.append(f'<line class="h-axis" x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}"/>')
    for i in range(6):
        v = lo + (hi - lo) * i / 5
        x = sx(v)
        parts.append(f'<line class="h-tick" x1="{x:.1f}" y1="{mt + ph}" x2="{x:.1f}" y2="{mt + ph + 4}"/>'
                     f'<text class="h-label" x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle">{_fmt(v)}</text>')
    parts.append(f'<text class="h-label" x="{ml + pw / 2}" y="{H - 2}" text-anchor="middle">image score</text>')
    parts.append(f'<text class="h-label" x="12" y="{mt + ph / 2}" transform="rotate(-90 12 {mt + ph / 2})" '
                 'text-anchor="middle">frequency</text>')
    if threshold is not None:
        x = sx(threshold)
        parts.append(f'<line id="thr-cal" class="thr-cal" x1="{x:.2f}" y1="{mt - 4}" x2="{x:.2f}" y2="{mt + ph}"/>')
    x = sx(threshold if threshold is not None else hi)
    parts.append(f'<line id="thr-line" class="thr-line" x1="{x:.2f}" y1="{mt - 4}" x2="{x:.2f}" y2="{mt + ph}"/>'
                 f'<text id="thr-label" class="thr-label" x="{x + 4:.2f}" y="{mt + 8}"></text>')
    n_normal = sum(normal["counts"]) if normal and normal.get("counts") else 0
    legend = [("h-normal", f"normal calibration images (n={n_normal})" if n_normal else "no normal-score histogram in the bundle"),
              ("h-audit", f"this audit (n={len(scores)})")]
    lx = ml + 6
    for cls, text in legend:
        parts.append(f'<rect class="{cls}" x="{lx}" y="6" width="12" height="10"/>'
                     f'<text class="h-legend" x="{lx + 16}" y="15">{html.escape(text)}</text>')
        lx += 22 + 6.2 * len(text)
    parts.append(f'<line class="thr-cal" x1="{lx}" y1="11" x2="{lx + 16}" y2="11"/><text class="h-legend" x="{lx + 20}" y="15">calibrated</text>')
    parts.append(f'<line class="thr-line" x1="{lx + 90}" y1="11" x2="{lx + 106}" y2="11"/><text class="h-legend" x="{lx + 110}" y="15">trying</text>')
    parts.append("</svg>")
    return "".join(parts), lo, hi


def _row(rec: dict[str, Any], out: Path) -> dict[str, Any]:
    path = rec["path"]
    try:
        rel = os.path.relpath(path, out)
    except ValueError:  # another drive on Windows
        rel = None
    displayable = Path(path).suffix.lower() in BROWSER_IMAGES
    return {"id": rec.get("id"), "path": path, "name": Path(path).name, "score": rec.get("score"),
            "probability": rec.get("probability"), "label": rec.get("label"), "width": rec.get("width"),
            "height": rec.get("height"), "regions": rec.get("regions") or [], "thumb": rec.get("thumbnail"),
            "heatmap": rec.get("heatmap"), "mask": rec.get("mask"), "recon": rec.get("reconstruction"),
            "original": rel.replace(os.sep, "/") if rel and displayable else None, "error": rec.get("error")}


def build_report(out: str | os.PathLike, title: str | None = None, max_rows: int = REPORT_ROWS) -> Path:
    """Write ``out/report.html`` for the audit in ``out``; returns its path.

    Args:
        max_rows: the page lists the ``max_rows`` highest-scoring images in full (and up to as many
            failed ones, and every image with a saved decision); 0 lists all. The counts, the
            histogram and the threshold slider always cover every image. Listing a million images
            made a 358 MB page that took 71 s and 4.8 GB to write, and that headless Chromium
            showed empty (its script failed); with the default it is 13.5 MB, 9.8 s and 0.29 GB.

    Raises:
        ReviewError: ``out`` is not an audit folder or holds no results, or ``max_rows`` < 0.
    """
    if max_rows < 0:
        raise ReviewError(f"max_rows must be >= 0 (0: list every image), got {max_rows}")
    out = Path(out)
    manifest = _load_manifest(out)
    cal = manifest.get("calibration") or {}
    threshold = cal.get("threshold")
    decisions = _existing_decisions(out, manifest.get("bundle_sha256"))
    sel = _Selection(max_rows or None, set(decisions))
    for rec in iter_journal(out / "results.jsonl"):
        sel.add(rec)
    if not sel.total:
        raise ReviewError(f"{out}: results.jsonl holds no results yet; run `anomaly audit` first")
    rows = sorted((_row(r, out) for r in sel.records()),
                  key=lambda r: (r["error"] is not None, -(r["score"] if r["score"] is not None else -math.inf)))
    svg, lo, hi = _histogram_svg(cal.get("normal_histogram"), sel.scores, threshold)
    packed, dtype = _packed_scores(sel.scores)
    data = {
        "title": title or f"Audit review: {out.resolve().name}",
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bundle": manifest.get("bundle"), "bundle_sha256": manifest.get("bundle_sha256"), "model": manifest.get("model"),
        "threshold": threshold, "method": cal.get("method"), "pixel_threshold": cal.get("pixel_threshold"),
        "lo": lo, "hi": hi, "rows": rows, "decisions": decisions,
        "total": sel.total, "n_errors": sel.n_errors, "scores": packed, "scores_dtype": dtype,
    }
    blob = json.dumps(data, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")
    page = (_TEMPLATE.replace("__TITLE__", html.escape(data["title"]))
            .replace("__HISTOGRAM__", svg)
            .replace("__CSS__", _CSS)
            .replace("__JS__", _JS)
            .replace("__DATA__", blob))
    target = out / REPORT_FILE
    with atomic_write(target, encoding="utf-8") as fh:
        fh.write(page)
    if len(rows) < sel.total:
        log.info("wrote %s (%d images; it lists %d of them: the highest scores, failures, decided ones)",
                 target, sel.total, len(rows))
    else:
        log.info("wrote %s (%d images)", target, sel.total)
    return target


# -- server ------------------------------------------------------------------------------------
class _Handler(SimpleHTTPRequestHandler):
    """Static files of ``OUT``, originals by id, and ``POST /decisions``."""

    originals: dict[str, str] = {}
    bundle_sha256: str | None = None
    out: Path = Path(".")

    def log_message(self, fmt: str, *args: Any) -> None:  # route to logging, not stderr
        log.debug("review server: " + fmt, *args)

    def _reply(self, status: int, obj: dict[str, Any]) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.path.startswith("/original/"):
            oid = self.path[len("/original/"):].split("?", 1)[0]
            src = self.originals.get(oid)
            if src is None or not Path(src).is_file():
                self.send_error(HTTPStatus.NOT_FOUND, "no such original")
                return
            data = Path(src).read_bytes()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", mimetypes.guess_type(src)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        super().do_GET()

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] != "/decisions":
            self._reply(HTTPStatus.NOT_FOUND, {"ok": False, "error": "POST /decisions only"})
            return
        # a JSON content type makes cross-site posts need a CORS preflight, which this server never grants
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            self._reply(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"ok": False, "error": "expected application/json"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= _MAX_POST:
            self._reply(HTTPStatus.BAD_REQUEST, {"ok": False, "error": "empty or too large body"})
            return
        try:
            doc = json.loads(self.rfile.read(length))
            validate_decisions(doc)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
            self._reply(HTTPStatus.BAD_REQUEST, {"ok": False, "error": str(exc)})
            return
        if doc.get("bundle_sha256") != self.bundle_sha256:
            self._reply(HTTPStatus.CONFLICT, {"ok": False, "error": "decisions are for another model than this audit"})
            return
        target = self.out / DECISIONS_FILE
        with atomic_write(target, encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
        log.info("wrote %s (%d decisions)", target, len(doc["decisions"]))
        self._reply(HTTPStatus.OK, {"ok": True, "path": str(target), "n": len(doc["decisions"])})


def _page_data(report: Path) -> dict[str, Any]:
    """The data embedded in a written ``report.html``."""
    page = report.read_text(encoding="utf-8")
    start = page.find(_DATA_OPEN)
    end = page.find("</script>", start)
    if start < 0 or end < 0:
        raise ReviewError(f"{report}: not a report written by `anomaly review`; rebuild it")
    return json.loads(page[start + len(_DATA_OPEN):end])


def serve_report(out: str | os.PathLike, port: int = 8765, build: bool = True,
                 max_rows: int = REPORT_ROWS) -> ThreadingHTTPServer:
    """A server on ``127.0.0.1:port`` (``0``: any free port) for the report in ``out``.

    Serves ``out``'s files, the originals of the images the page lists at ``/original/<id>``, and
    accepts ``POST /decisions`` (JSON, validated, same model) written atomically to
    ``out/decisions.json``. The caller runs ``serve_forever()`` (e.g. in a thread) and ``shutdown()``.

    Args:
        build: (re)write ``report.html`` first (listing ``max_rows`` images, see :func:`build_report`).
    """
    out = Path(out).resolve()
    manifest = _load_manifest(out)
    report = build_report(out, max_rows=max_rows) if build else out / REPORT_FILE
    if not report.is_file():
        raise ReviewError(f"{report}: no report to serve; run `anomaly review {out}` first")
    handler = type("ReviewHandler", (_Handler,), {
        "originals": {r["id"]: r["path"] for r in _page_data(report)["rows"] if r.get("id")},
        "bundle_sha256": manifest.get("bundle_sha256"), "out": out})
    server = ThreadingHTTPServer(("127.0.0.1", port), partial(handler, directory=str(out)))
    server.daemon_threads = True
    log.info("serving %s on 127.0.0.1:%d", out, server.server_address[1])
    return server


# -- page --------------------------------------------------------------------------------------
_DATA_OPEN = '<script type="application/json" id="review-data">'  # in _TEMPLATE; _page_data finds the data by it
_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<header>
  <h1 id="title">__TITLE__</h1>
  <div id="meta" class="meta"></div>
</header>
<section class="top">
  <div class="panel hist-panel">__HISTOGRAM__</div>
  <div class="panel controls">
    <label class="ctl">threshold
      <input id="thr-slider" type="range" min="0" max="1" step="any">
      <input id="thr-input" type="number" step="any">
      <button id="thr-reset" type="button" title="back to the calibrated threshold">calibrated</button>
    </label>
    <div id="flagged-count" class="flagged-count"></div>
    <div class="filters" id="filters">
      <button type="button" data-filter="all" class="active">all <span></span></button>
      <button type="button" data-filter="flagged">flagged <span></span></button>
      <button type="button" data-filter="passed">passed <span></span></button>
      <button type="button" data-filter="errors">errors <span></span></button>
      <button type="button" data-filter="undecided">flagged, undecided <span></span></button>
    </div>
    <div class="decide-bar">
      <span id="decision-count"></span>
      <button id="save" type="button" class="primary">save decisions</button>
      <a id="download" download="decisions.json" hidden>decisions.json</a>
      <span id="save-status"></span>
    </div>
    <div class="help">keys: <b>j</b>/<b>k</b> next/previous, <b>d</b> defect, <b>f</b> false alarm, <b>u</b> undo</div>
  </div>
</section>
<main>
  <section class="list panel">
    <table id="rows"><thead><tr><th>#</th><th></th><th>image</th><th>score</th><th>P(defect)</th><th>regions</th><th>review</th></tr></thead>
    <tbody></tbody></table>
    <button id="more" type="button" hidden>show more</button>
    <p id="listed-note" class="note" hidden></p>
  </section>
  <section class="viewer panel" id="viewer">
    <div id="viewer-empty" class="empty">select an image</div>
    <div id="viewer-body" hidden>
      <div class="v-head"><b id="v-name"></b> <span id="v-verdict" class="badge"></span><div id="v-path" class="path"></div>
        <div id="v-facts" class="facts"></div></div>
      <div class="v-ctl">
        <label>heatmap opacity <input id="opacity" type="range" min="0" max="1" step="0.05" value="0.8"></label>
        <label>zoom <input id="zoom" type="range" min="1" max="8" step="0.25" value="1"> <span id="zoom-val">1x</span></label>
        <label><input id="boxes" type="checkbox" checked> boxes</label>
        <span class="v-decide"><button type="button" id="v-defect" class="d-defect">defect</button>
        <button type="button" id="v-fa" class="d-fa">false alarm</button></span>
      </div>
      <div class="v-images">
        <figure><figcaption>input + heatmap</figcaption>
          <div class="zoom-outer" id="zoom-outer"><div class="zoom-inner" id="zoom-inner">
            <img id="v-orig" alt="input"><img id="v-heat" class="heat" alt="">
            <svg id="v-boxes" class="boxes" preserveAspectRatio="none"></svg>
          </div></div></figure>
        <figure id="v-recon-fig"><figcaption>reconstruction (what it should look like)</figcaption>
          <img id="v-recon" alt="reconstruction"></figure>
      </div>
      <table id="v-regions" class="regions"></table>
      <pre id="v-error" class="error" hidden></pre>
    </div>
  </section>
</main>
<script type="application/json" id="review-data">__DATA__</script>
<script>__JS__</script>
</body>
</html>
"""

_CSS = """
*{box-sizing:border-box}
body{margin:0;font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;background:#eef1f5}
header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:17px;margin:0;font-weight:600}
.meta{color:#b8c1d1;font-size:12px}
.note{color:#6b7383;font-size:12px;margin:8px 4px 0}
.panel{background:#fff;border-radius:6px;box-shadow:0 1px 2px rgba(0,0,0,.08);padding:10px}
.top{display:flex;gap:12px;padding:12px 12px 0;flex-wrap:wrap}
.hist-panel{flex:0 0 auto}
.controls{flex:1 1 380px;display:flex;flex-direction:column;gap:10px}
.ctl{display:flex;align-items:center;gap:8px;font-weight:600}
#thr-slider{flex:1}
#thr-input{width:110px}
.flagged-count{font-size:18px;font-weight:600}
.filters button,.decide-bar button,.ctl button{border:1px solid #c7ceda;background:#f6f8fb;border-radius:4px;padding:4px 9px;cursor:pointer;font:inherit}
.filters button.active{background:#1d2330;color:#fff;border-color:#1d2330}
.filters span{opacity:.75}
button.primary{background:#2563eb!important;color:#fff;border-color:#2563eb!important}
.help{color:#6b7383;font-size:12px}
#save-status{color:#0a7a3b}
main{display:flex;gap:12px;padding:12px;align-items:flex-start}
.list{flex:1 1 55%;min-width:0;overflow:auto}
.viewer{flex:1 1 45%;position:sticky;top:8px;max-height:calc(100vh - 16px);overflow:auto}
table#rows{width:100%;border-collapse:collapse}
#rows th{text-align:left;font-weight:600;color:#6b7383;border-bottom:1px solid #dde2ea;padding:4px 6px;position:sticky;top:0;background:#fff}
#rows td{border-bottom:1px solid #eef1f5;padding:4px 6px;vertical-align:middle}
#rows tr.row{cursor:pointer}
#rows tr.row:hover{background:#f5f8ff}
#rows tr.sel{background:#e3ecff!important}
#rows tr.flag td:first-child{box-shadow:inset 3px 0 #dc2626}
.thumb{width:56px;height:56px;object-fit:cover;border-radius:3px;background:#dde2ea;display:block}
.name{font-weight:600;word-break:break-all}
.path{color:#6b7383;font-size:11px;word-break:break-all}
.bar{height:4px;background:#e5e9f0;border-radius:2px;margin-top:3px;width:90px}
.bar i{display:block;height:4px;border-radius:2px;background:#2563eb}
.flag .bar i{background:#dc2626}
.badge{display:inline-block;padding:1px 6px;border-radius:9px;font-size:11px;font-weight:600;background:#e5e9f0;color:#374151}
.badge.flagged{background:#fde2e2;color:#b91c1c}.badge.passed{background:#dcfce7;color:#166534}.badge.error{background:#fef3c7;color:#92400e}
.dec button{border:1px solid #c7ceda;background:#fff;border-radius:4px;padding:2px 7px;cursor:pointer;font:inherit;font-size:12px;margin:1px}
.dec button.on.d-defect,.v-decide button.on.d-defect{background:#dc2626;color:#fff;border-color:#dc2626}
.dec button.on.d-fa,.v-decide button.on.d-fa{background:#0f766e;color:#fff;border-color:#0f766e}
.v-decide button{border:1px solid #c7ceda;background:#fff;border-radius:4px;padding:4px 10px;cursor:pointer;font:inherit}
.empty{color:#6b7383;padding:30px;text-align:center}
.v-head{margin-bottom:6px}.facts{color:#374151;margin-top:4px}
.v-ctl{display:flex;gap:14px;align-items:center;flex-wrap:wrap;margin:6px 0}
.v-images{display:flex;gap:10px;align-items:flex-start}
.v-images figure{margin:0;flex:1 1 0;min-width:0}
figcaption{color:#6b7383;font-size:11px;margin-bottom:3px}
.zoom-outer{overflow:auto;max-height:70vh;border:1px solid #dde2ea;background:#111}
.zoom-inner{position:relative;width:100%}
.zoom-inner img{display:block;width:100%;height:auto}
.zoom-inner img.heat{position:absolute;left:0;top:0;height:100%}
svg.boxes{position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none}
svg.boxes rect{fill:none;stroke:#00e5ff;stroke-width:2;vector-effect:non-scaling-stroke}
#v-recon{width:100%;display:block;border:1px solid #dde2ea;image-rendering:auto}
table.regions{border-collapse:collapse;margin-top:8px;font-size:12px}
table.regions td,table.regions th{padding:2px 8px;border-bottom:1px solid #eef1f5;text-align:right}
.error{color:#92400e;background:#fef3c7;padding:8px;white-space:pre-wrap}
svg.histogram{display:block;max-width:100%;height:auto}
.h-bg{fill:#fafbfc}
.h-normal{fill:#7c93b8;opacity:.75}
.h-audit{fill:#f59e0b;opacity:.55}
.h-axis,.h-tick{stroke:#6b7383;stroke-width:1}
.h-label{font-size:10px;fill:#4b5563}
.h-legend{font-size:11px;fill:#1d2330}
.thr-cal{stroke:#111827;stroke-width:1.5;stroke-dasharray:4 3}
.thr-line{stroke:#dc2626;stroke-width:2}
.thr-label{font-size:11px;fill:#dc2626;font-weight:600}
"""

_JS = r"""
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("review-data").textContent);
  const rows = D.rows;
  const served = location.protocol.indexOf("http") === 0;
  function originalSrc(r) { return r.original ? (served ? "original/" + encodeURIComponent(r.id) : r.original) : null; }
  const PAGE = 200;
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
  const fmt = (v) => (v === null || v === undefined) ? "–" : Number(v).toPrecision(4);
  rows.forEach((r, i) => { r._i = i; });
  // every scored image's score, ascending: the counts cover all images, while ``rows`` may hold
  // only the highest-scoring ones (``anomaly review --max-rows``)
  const all = (function () {
    const bin = atob(D.scores), bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return D.scores_dtype === "f8" ? new Float64Array(bytes.buffer) : new Float32Array(bytes.buffer);
  })();
  function countAbove(t) {  // images with score > t
    let lo = 0, hi = all.length;
    while (lo < hi) { const m = (lo + hi) >> 1; if (all[m] > t) hi = m; else lo = m + 1; }
    return all.length - lo;
  }
  const maxScore = all.length ? all[all.length - 1] : 1;
  const storeKey = "anomaly-review:" + D.bundle_sha256 + ":" + D.title;
  const state = {thr: D.threshold !== null ? D.threshold : maxScore, filter: "all", shown: PAGE, sel: null};
  const decisions = new Map(Object.entries(D.decisions || {}));
  try {
    const saved = JSON.parse(localStorage.getItem(storeKey) || "{}");
    for (const k in saved) if (!decisions.has(k)) decisions.set(k, saved[k]);
  } catch (e) { /* storage unavailable: decisions live in this page only */ }

  const flagged = (r) => r.error === null && r.score !== null && r.score > state.thr;
  const FILTERS = {
    all: () => true, flagged: flagged, passed: (r) => r.error === null && !flagged(r),
    errors: (r) => r.error !== null, undecided: (r) => flagged(r) && !decisions.has(r.path),
  };

  $("meta").textContent = [
    "model " + (D.model || "?"), "bundle " + (D.bundle || "?"), "sha256 " + String(D.bundle_sha256).slice(0, 12) + "…",
    "calibrated threshold " + (D.threshold === null ? "none" : fmt(D.threshold) + " (" + (D.method || "?") + ")"),
    D.total + " images" + (rows.length < D.total ? " (" + rows.length + " listed)" : ""), "generated " + D.generated,
  ].join("  ·  ");
  if (rows.length < D.total) {
    $("listed-note").hidden = false;
    $("listed-note").textContent = "This page lists " + rows.length + " of the " + D.total + " images: the highest scores" +
      (D.n_errors ? ", failures" : "") + " and any with a saved decision. Counts and the histogram cover all of them; " +
      "every row is in results.csv, and `anomaly review --max-rows N` lists more.";
  }

  // -- threshold ---------------------------------------------------------------------------
  const slider = $("thr-slider"), input = $("thr-input");
  slider.min = D.lo; slider.max = D.hi; slider.step = (D.hi - D.lo) / 2000;
  const hist = $("histogram");
  const hx = (v) => Number(hist.dataset.left) + (v - Number(hist.dataset.lo)) / (Number(hist.dataset.hi) - Number(hist.dataset.lo)) * Number(hist.dataset.width);

  function setThreshold(v, fromSlider) {
    if (!isFinite(v)) return;
    state.thr = v;
    if (!fromSlider) slider.value = v;
    input.value = Number(v).toPrecision(6);
    const x = Math.max(Number(hist.dataset.left), Math.min(hx(v), Number(hist.dataset.left) + Number(hist.dataset.width)));
    const line = $("thr-line"), label = $("thr-label");
    line.setAttribute("x1", x); line.setAttribute("x2", x);
    label.setAttribute("x", x + 4); label.textContent = fmt(v);
    update();
  }
  slider.addEventListener("input", () => setThreshold(Number(slider.value), true));
  input.addEventListener("change", () => setThreshold(Number(input.value), false));
  $("thr-reset").addEventListener("click", () => setThreshold(D.threshold !== null ? D.threshold : maxScore, false));
  $("thr-reset").disabled = D.threshold === null;

  // -- list --------------------------------------------------------------------------------
  const tbody = document.querySelector("#rows tbody");
  function decisionButtons(r) {
    const d = decisions.get(r.path);
    if (r.error !== null || (!flagged(r) && !d)) return "";
    return '<span class="dec"><button type="button" class="d-defect' + (d === "defect" ? " on" : "") + '" data-decision="defect">defect</button>' +
      '<button type="button" class="d-fa' + (d === "false_alarm" ? " on" : "") + '" data-decision="false_alarm">false alarm</button></span>';
  }
  function verdict(r) {
    if (r.error !== null) return '<span class="badge error">error</span>';
    return flagged(r) ? '<span class="badge flagged">flagged</span>' : '<span class="badge passed">passed</span>';
  }
  function rowHTML(r, i) {
    const w = r.score === null ? 0 : Math.max(2, Math.min(100, 100 * (r.score - D.lo) / (D.hi - D.lo)));
    // an image passed under `--heatmaps flagged` has neither: the original (a small browser image) stands in
    const thumb = r.thumb || r.heatmap || originalSrc(r);
    return '<tr class="row' + (flagged(r) ? " flag" : "") + (state.sel === r ? " sel" : "") + '" data-i="' + r._i + '">' +
      "<td>" + (i + 1) + "</td>" +
      "<td>" + (thumb ? '<img class="thumb" loading="lazy" src="' + esc(thumb) + '" alt="">' : '<div class="thumb"></div>') + "</td>" +
      '<td><div class="name">' + esc(r.name) + " " + verdict(r) + '</div><div class="path">' + esc(r.path) + "</div>" +
      (r.error !== null ? '<div class="path">' + esc(r.error) + "</div>" : "") + "</td>" +
      "<td>" + fmt(r.score) + '<div class="bar"><i style="width:' + w + '%"></i></div></td>' +
      "<td>" + fmt(r.probability) + "</td>" +
      "<td>" + (r.error !== null ? "" : r.regions.length) + "</td>" +
      "<td>" + decisionButtons(r) + "</td></tr>";
  }
  function visible() { return rows.filter(FILTERS[state.filter]); }
  function renderList() {
    const v = visible();
    tbody.innerHTML = v.slice(0, state.shown).map(rowHTML).join("");
    $("more").hidden = v.length <= state.shown;
    $("more").textContent = "show more (" + (v.length - state.shown) + " left)";
  }
  function update() {
    const nFlag = countAbove(state.thr);
    const counts = {all: D.total, flagged: nFlag, passed: all.length - nFlag, errors: D.n_errors,
                    undecided: nFlag - rows.filter((r) => flagged(r) && decisions.has(r.path)).length};
    $("flagged-count").textContent = nFlag + " of " + all.length + " flagged at threshold " + fmt(state.thr);
    document.querySelectorAll("#filters button").forEach((b) => {
      b.querySelector("span").textContent = counts[b.dataset.filter];
    });
    let nd = 0, nf = 0;
    decisions.forEach((d) => { if (d === "defect") nd++; else nf++; });
    $("decision-count").textContent = nd + " defect, " + nf + " false alarm marked";
    renderList();
    if (state.sel) renderViewer();
  }
  $("filters").addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (!b) return;
    state.filter = b.dataset.filter; state.shown = PAGE;
    document.querySelectorAll("#filters button").forEach((x) => x.classList.toggle("active", x === b));
    update();
  });
  $("more").addEventListener("click", () => { state.shown += PAGE; renderList(); });
  tbody.addEventListener("click", (e) => {
    const tr = e.target.closest("tr.row");
    if (!tr) return;
    const r = rows[Number(tr.dataset.i)];
    const b = e.target.closest("button[data-decision]");
    if (b) decide(r, b.dataset.decision);
    select(r);
  });

  // -- decisions ---------------------------------------------------------------------------
  function persist() {
    try { localStorage.setItem(storeKey, JSON.stringify(Object.fromEntries(decisions))); } catch (e) { /* ignore */ }
  }
  function decide(r, d) {
    if (!r || r.error !== null) return;
    if (decisions.get(r.path) === d) decisions.delete(r.path); else decisions.set(r.path, d);
    persist(); update();
  }
  function decisionsDoc() {
    const byPath = new Map(rows.map((r) => [r.path, r]));
    const list = [];
    decisions.forEach((d, p) => { const r = byPath.get(p); if (r && r.score !== null) list.push({path: p, score: r.score, decision: d}); });
    return {bundle_sha256: D.bundle_sha256, decisions: list, threshold: state.thr, calibrated_threshold: D.threshold,
            saved: new Date().toISOString()};
  }
  function save() {
    const text = JSON.stringify(decisionsDoc(), null, 2);
    window.anomalyReview.lastSaved = text;
    const a = $("download");
    if (a.href) URL.revokeObjectURL(a.href);
    a.href = URL.createObjectURL(new Blob([text], {type: "application/json"}));
    if (!window.anomalyReview.noDownload) a.click();
    $("save-status").textContent = "downloaded decisions.json";
    if (served) {
      fetch("decisions", {method: "POST", headers: {"Content-Type": "application/json"}, body: text})
        .then((r) => r.json()).then((j) => {
          $("save-status").textContent = j.ok ? "saved " + j.n + " decision(s) to " + j.path : "server refused: " + j.error;
          window.anomalyReview.serverReply = j;
        }).catch((e) => { $("save-status").textContent = "server unreachable: " + e; });
    }
  }
  $("save").addEventListener("click", save);

  // -- viewer ------------------------------------------------------------------------------
  function select(r) { state.sel = r; renderViewer(); renderList(); }
  function renderViewer() {
    const r = state.sel;
    $("viewer-empty").hidden = !!r; $("viewer-body").hidden = !r;
    if (!r) return;
    $("v-name").textContent = r.name;
    $("v-verdict").className = "badge " + (r.error !== null ? "error" : flagged(r) ? "flagged" : "passed");
    $("v-verdict").textContent = r.error !== null ? "error" : flagged(r) ? "flagged" : "passed";
    $("v-path").textContent = r.path;
    $("v-facts").textContent = r.error !== null ? "" : "score " + fmt(r.score) + "  ·  P(defect) " + fmt(r.probability) +
      "  ·  " + r.width + "×" + r.height + " px  ·  " + r.regions.length + " region(s)";
    const d = decisions.get(r.path);
    $("v-defect").classList.toggle("on", d === "defect"); $("v-fa").classList.toggle("on", d === "false_alarm");
    $("v-error").hidden = r.error === null; $("v-error").textContent = r.error || "";
    const orig = $("v-orig"), heat = $("v-heat");
    const src = originalSrc(r) || r.thumb || r.heatmap || "";
    if (orig.dataset.src !== src) {
      orig.dataset.src = src;
      const fallback = r.thumb || r.heatmap;  // the original moved, or the browser cannot decode it
      orig.onerror = () => { if (fallback && orig.getAttribute("src") !== fallback) orig.src = fallback; };
      if (src) orig.src = src; else orig.removeAttribute("src");
    }
    if (r.heatmap) { heat.src = r.heatmap; heat.hidden = false; } else { heat.hidden = true; heat.removeAttribute("src"); }
    heat.style.opacity = $("opacity").value;
    const svg = $("v-boxes");
    svg.setAttribute("viewBox", "0 0 " + (r.width || 1) + " " + (r.height || 1));
    svg.innerHTML = r.regions.map((g) => '<rect x="' + g.x + '" y="' + g.y + '" width="' + g.w + '" height="' + g.h + '"></rect>').join("");
    svg.style.display = $("boxes").checked ? "" : "none";
    $("v-recon-fig").hidden = !r.recon;
    if (r.recon) $("v-recon").src = r.recon;
    $("v-regions").innerHTML = r.regions.length ? "<tr><th>#</th><th>x</th><th>y</th><th>w</th><th>h</th><th>area</th><th>peak</th></tr>" +
      r.regions.map((g, i) => "<tr><td>" + (i + 1) + "</td><td>" + g.x + "</td><td>" + g.y + "</td><td>" + g.w + "</td><td>" + g.h +
        "</td><td>" + g.area + "</td><td>" + fmt(g.peak) + "</td></tr>").join("") : "";
  }
  $("opacity").addEventListener("input", () => { $("v-heat").style.opacity = $("opacity").value; });
  function setZoom(z) {
    z = Math.max(1, Math.min(8, z));
    $("zoom").value = z; $("zoom-val").textContent = z + "x"; $("zoom-inner").style.width = (100 * z) + "%";
  }
  $("zoom").addEventListener("input", () => setZoom(Number($("zoom").value)));
  $("zoom-outer").addEventListener("wheel", (e) => {
    if (!e.ctrlKey && !e.altKey) return;
    e.preventDefault(); setZoom(Number($("zoom").value) * (e.deltaY < 0 ? 1.25 : 0.8));
  }, {passive: false});
  $("boxes").addEventListener("change", () => { $("v-boxes").style.display = $("boxes").checked ? "" : "none"; });
  $("v-defect").addEventListener("click", () => decide(state.sel, "defect"));
  $("v-fa").addEventListener("click", () => decide(state.sel, "false_alarm"));
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" || e.metaKey || e.ctrlKey) return;
    const v = visible(), i = state.sel ? v.indexOf(state.sel) : -1;
    if (e.key === "j" && i + 1 < v.length) { if (i + 1 >= state.shown) state.shown += PAGE; select(v[i + 1]); }
    else if (e.key === "k" && i > 0) select(v[i - 1]);
    else if (e.key === "d") decide(state.sel, "defect");
    else if (e.key === "f") decide(state.sel, "false_alarm");
    else if (e.key === "u" && state.sel) { decisions.delete(state.sel.path); persist(); update(); }
  });

  window.anomalyReview = {
    lastSaved: null, serverReply: null, noDownload: false,
    decisionsJSON: () => JSON.stringify(decisionsDoc()),
    setThreshold: (v) => setThreshold(v, false), decide: (path, d) => decide(rows.find((r) => r.path === path), d),
  };
  slider.value = state.thr;
  setThreshold(state.thr, false);
  if (rows.length) select(rows[0]);
})();
"""

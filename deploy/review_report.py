"""The review page's builder: an ``anomaly audit`` folder -> ``OUT/report.html``, one self-contained file.

:func:`build_report` reads the audit's ``audit.json`` and ``results.jsonl`` and writes
``OUT/report.html``: the page's markup, style and script (the package data files
``review_static/review.html``, ``review.css``, ``review.js``) inlined with the audit's data, so the
file opens from disk with no network access. Images are referenced by relative paths inside ``OUT``
(``thumbs/``, ``heatmaps/``, ``reconstructions/``) and the original files by their path relative to
``OUT`` (the local server of :mod:`anomaly.deploy.review_server` maps them to ``/original/<id>``).

What the page shows and the decisions file it saves are described in :mod:`anomaly.deploy.review`.

Example::

    report = build_report("audit_out/")             # -> audit_out/report.html
    data = page_data(report)                        # the rows, scores and decisions it embeds
"""
from __future__ import annotations

import base64
import heapq
import html
import json
import logging
import math
import os
import re
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from anomaly.data.io import atomic_write
from anomaly.deploy.audit import BROWSER_IMAGES, iter_journal

__all__ = ["build_report", "page_data", "validate_decisions", "load_manifest", "ReviewError", "DECISIONS",
           "DECISIONS_FILE", "REPORT_FILE", "REPORT_ROWS", "STATIC_FILES"]

log = logging.getLogger(__name__)

DECISIONS = ("defect", "false_alarm")
REPORT_FILE = "report.html"
DECISIONS_FILE = "decisions.json"
#: Images listed in full on the page by default (the highest scores; all images are counted).
REPORT_ROWS = 20_000
#: The page's package data files, in ``anomaly/deploy/review_static/``.
STATIC_FILES = ("review.html", "review.css", "review.js")
#: Where the page's data sits in ``review.html``; :func:`page_data` finds it by this opening tag.
DATA_OPEN = '<script type="application/json" id="review-data">'
_PLACEHOLDER = re.compile(r"__(TITLE|HISTOGRAM|CSS|JS|DATA)__")


@lru_cache(maxsize=None)
def static_text(name: str) -> str:
    """One of :data:`STATIC_FILES`, read from the installed package (``anomaly.deploy/review_static``).

    Raises:
        ReviewError: the file is missing (an install without the package data).
    """
    if name not in STATIC_FILES:
        raise ValueError(f"unknown review asset {name!r}; expected one of {STATIC_FILES}")
    try:
        return (resources.files("anomaly.deploy") / "review_static" / name).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ReviewError(f"the review page's file review_static/{name} is missing from the installed anomaly.deploy "
                          f"package ({exc}); reinstall the package") from exc


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


def load_manifest(out: Path) -> dict[str, Any]:
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
    manifest = load_manifest(out)
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
    parts = {"TITLE": html.escape(data["title"]), "HISTOGRAM": svg, "CSS": static_text("review.css"),
             "JS": static_text("review.js"), "DATA": blob}
    # one pass over the template: a title or a path holding "__JS__" is text, never a placeholder
    page = _PLACEHOLDER.sub(lambda m: parts[m.group(1)], static_text("review.html"))
    target = out / REPORT_FILE
    with atomic_write(target, encoding="utf-8") as fh:
        fh.write(page)
    if len(rows) < sel.total:
        log.info("wrote %s (%d images; it lists %d of them: the highest scores, failures, decided ones)",
                 target, sel.total, len(rows))
    else:
        log.info("wrote %s (%d images)", target, sel.total)
    return target


def page_data(report: str | os.PathLike) -> dict[str, Any]:
    """The data embedded in a written ``report.html`` (rows, packed scores, decisions).

    Raises:
        ReviewError: the file is not a report written by :func:`build_report`.
    """
    report = Path(report)
    page = report.read_text(encoding="utf-8")
    start = page.find(DATA_OPEN)
    end = page.find("</script>", start)
    if start < 0 or end < 0:
        raise ReviewError(f"{report}: not a report written by `anomaly review`; rebuild it")
    return json.loads(page[start + len(DATA_OPEN):end])

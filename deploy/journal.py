"""The audit's journal (``results.jsonl``) and its tables: append, read back, repair, durable writes.

The journal is the one source of truth of an audit folder: one JSON object per image, appended in
commit order. :class:`JournalWriter` appends records and makes them durable a batch at a time
(flush + fsync of the journal; ``results.csv`` follows, flushed every ``csv_every`` rows and
fsynced at the end), so a power cut loses at most the last uncommitted batch, which a resume scores
again. :func:`iter_journal` reads it back line by line and skips what a killed run can leave (a
torn last line, a garbled line); :func:`repair_journal` rewrites it without them so appending goes
on from a clean line boundary. ``results.csv``, ``summary.json`` and ``audit.json`` are written
with :func:`anomaly.data.io.atomic_write` (temporary file, fsync, rename, fsync of the folder).

Example::

    with JournalWriter(out / "results.jsonl", out / "results.csv") as w:
        for rec in records:
            w.append(rec)
            if w.pending >= 16:
                w.commit()
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from anomaly.data.io import atomic_write, fsync_dir

__all__ = ["RESULT_FIELDS", "iter_journal", "load_journal", "repair_journal", "csv_row", "write_csv", "write_json",
           "JournalWriter"]

log = logging.getLogger(__name__)

#: Columns of ``results.csv`` (``regions`` holds the JSON list of regions).
RESULT_FIELDS = ("path", "id", "score", "probability", "label", "threshold", "n_regions", "regions", "width",
                 "height", "thumbnail", "heatmap", "mask", "map", "reconstruction", "error")


#: ``results.csv`` is UTF-8; a file name that is not (bytes the filesystem allows, which Python holds
#: as surrogate escapes) is written back as its own bytes, so the row names the file as it is on disk
#: (``results.jsonl`` escapes it as ``\udcXX``, JSON's way)
CSV_ERRORS = "surrogateescape"

def iter_journal(path: str | os.PathLike, bad: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """The records of ``results.jsonl``, in journal order, read line by line.

    A million-image journal is some 370 MB: a resume that held every record took 3.3 GB, so
    callers that need one pass (a resume, the review page) stream it. A truncated or unparsable
    line (a killed run) is skipped with a warning.

    Args:
        bad: if given, the 1-based numbers of the skipped lines are appended to it.
    """
    p = Path(path)
    if not p.is_file():
        return
    skipped: list[int] = [] if bad is None else bad
    first = len(skipped)
    with open(p, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):  # a last line without its newline was being written when the run stopped
                if line.strip():
                    skipped.append(number)
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                skipped.append(number)
                continue
            if isinstance(rec, dict) and "path" in rec:
                yield rec
            else:
                skipped.append(number)
    if len(skipped) > first:
        log.warning("%s: skipped %d incomplete line(s) left by an interrupted run", p, len(skipped) - first)


def repair_journal(path: str | os.PathLike, bad: Sequence[int]) -> None:
    """Rewrite ``path`` (atomically and durably, streaming) without the lines ``bad`` and without a
    torn last line, so that appending continues from a clean line boundary."""
    drop = set(bad)
    path = Path(path)
    with open(path, "rb") as src, atomic_write(path, "wb") as dst:
        for number, line in enumerate(src, 1):
            if line.endswith(b"\n") and number not in drop:
                dst.write(line)


def load_journal(path: str | os.PathLike, repair: bool = False) -> list[dict[str, Any]]:
    """Read ``results.jsonl`` into a list (:func:`iter_journal` streams it); a truncated or
    unparsable line (a killed run) is dropped.

    Args:
        repair: rewrite the file (atomically) without the dropped lines, so appending continues
            from a clean line boundary.

    Returns:
        The records, in journal order.
    """
    bad: list[int] = []
    records = list(iter_journal(path, bad))
    if repair and bad:
        repair_journal(path, bad)
    return records


def csv_row(rec: dict[str, Any]) -> list[Any]:
    """The CSV row of one record, in :data:`RESULT_FIELDS` order."""
    def num(v: Any) -> str:
        return "" if v is None else f"{v:.6g}"

    regions = rec.get("regions") or []
    label = rec.get("label")
    row = {"score": num(rec.get("score")), "probability": num(rec.get("probability")),
           "threshold": num(rec.get("threshold")), "label": "" if label is None else label,
           "n_regions": len(regions) if rec.get("error") is None else "",
           "regions": json.dumps(regions, separators=(",", ":")) if regions else "", "error": rec.get("error") or ""}
    return [row[k] if k in row else ("" if rec.get(k) is None else rec[k]) for k in RESULT_FIELDS]


def write_csv(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Write ``results.csv`` (header + one row per record) atomically and durably; ``records`` is
    consumed once, as it streams."""
    with atomic_write(path, newline="", encoding="utf-8", errors=CSV_ERRORS) as fh:
        writer = csv.writer(fh)
        writer.writerow(RESULT_FIELDS)
        writer.writerows(csv_row(rec) for rec in records)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically and durably (``audit.json``, ``summary.json``)."""
    with atomic_write(path, encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")


class JournalWriter:
    """Appends records to ``results.jsonl`` and their rows to ``results.csv``.

    :meth:`append` writes a record's line (and flushes it to the OS, so a killed process leaves
    only whole lines but perhaps the one being written); :meth:`commit` makes every appended line
    durable (fsync), which the audit does once per batch: an fsync per line cost as much as
    scoring a small image. The CSV is a view of the journal, rebuilt on resume: it is flushed every
    ``csv_every`` rows and fsynced on :meth:`close`.

    Args:
        journal: the ``results.jsonl`` path (appended to; created).
        csv_path: the ``results.csv`` path (appended to: its header is written by :func:`write_csv`).
        csv_every: flush the CSV after this many rows (0: only at the end).
        fsync: make commits durable (``False``: flush only, for throwaway folders).
    """

    def __init__(self, journal: str | os.PathLike, csv_path: str | os.PathLike, csv_every: int = 256,
                 fsync: bool = True) -> None:
        self.path = Path(journal)
        self.csv_path = Path(csv_path)
        self.csv_every = csv_every
        self.fsync = fsync
        self.appended = 0  #: records appended by this writer
        self.pending = 0  #: records appended since the last commit
        self._new_file = not self.path.exists()
        self._journal = open(self.path, "a", encoding="utf-8")
        self._csv_file = open(self.csv_path, "a", newline="", encoding="utf-8", errors=CSV_ERRORS)
        self._csv = csv.writer(self._csv_file)

    def append(self, rec: dict[str, Any]) -> None:
        """Append one record (a JSON object with ``path``; NaN is refused) to the journal and the CSV."""
        self._journal.write(json.dumps(rec, allow_nan=False) + "\n")
        self._journal.flush()
        self._csv.writerow(csv_row(rec))
        self.appended += 1
        self.pending += 1
        if self.csv_every > 0 and self.appended % self.csv_every == 0:
            self._csv_file.flush()

    def commit(self) -> None:
        """Make the appended lines durable (fsync of the journal; of its folder the first time)."""
        if not self.pending:
            return
        self._journal.flush()
        if self.fsync:
            os.fsync(self._journal.fileno())
            if self._new_file:  # the journal's own directory entry, once
                fsync_dir(self.path.parent)
                self._new_file = False
        self.pending = 0

    def close(self) -> None:
        """Commit, then flush and fsync the CSV and close both files."""
        try:
            self.commit()
            self._csv_file.flush()
            if self.fsync:
                os.fsync(self._csv_file.fileno())
        finally:
            self._journal.close()
            self._csv_file.close()

    def __enter__(self) -> "JournalWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

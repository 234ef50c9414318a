"""Audit inputs: files, folders, globs, list files and manifests expanded into image paths; output ids.

:func:`iter_inputs` checks the inputs at once (a mistyped path is an error before any work) and then
streams the paths: folders are walked one directory at a time and list files read line by line, so
a 100k-line list is never one list of ``Path`` objects (the audit keeps the paths as strings).

Entries that look like images but cannot be one are kept, so that the audit reports them as error
rows instead of skipping them silently: a dangling symbolic link, a folder named like an image
(``x.png/``), a listed path that does not exist.

A manifest is a table with a ``path`` column (other columns are ignored): ``.csv`` (read with the
standard library) or ``.parquet`` (read a row group at a time with pyarrow, the ``[ray]`` extra), as a
data team exports it from its catalogue.

Example::

    for path in iter_inputs(["line3/", "todo.txt", "cam2/*.png", "catalogue.parquet"]):
        print(path, output_id(path))
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

from anomaly.data.io import IMAGE_EXTENSIONS

__all__ = ["iter_inputs", "expand_inputs", "output_id", "AuditError", "LIST_SUFFIXES", "MANIFEST_SUFFIXES"]

log = logging.getLogger(__name__)

#: Inputs read as list files: one image path per line.
LIST_SUFFIXES = (".txt", ".lst")
#: Inputs read as manifests: tables with a ``path`` column.
MANIFEST_SUFFIXES = (".csv", ".parquet")
#: The manifest column that holds the image paths.
MANIFEST_COLUMN = "path"
_GLOB_CHARS = set("*?[")


class AuditError(ValueError):
    """A usage problem with an audit folder or its inputs (e.g. resuming with another bundle)."""


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(folder: str) -> Iterator[str]:
    """Image entries under ``folder``, depth first with each directory's entries sorted by name:
    the order of ``sorted(Path(folder).rglob("*"))`` (paths compare part by part), without
    holding the whole tree.

    Yields regular files (and links to them) with an image extension, plus the entries an image
    name promises but that are not images: dangling links and folders named like images (whose
    contents are walked as well). Links to folders are not followed (as ``rglob``), which also
    keeps a link loop from walking forever.
    """
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:  # not a place images can come from; the audit goes on with the rest
        log.warning("%s: cannot list this folder (%s); its images are not audited", folder, exc.strerror or exc)
        return
    for e in entries:
        image_name = _is_image_name(e.name)
        try:
            is_dir = e.is_dir()
            is_file = not is_dir and e.is_file()
            is_link = e.is_symlink()
        except OSError:  # vanished since the listing: let the audit say so
            is_dir = is_file = is_link = False
        if is_dir:
            if image_name:
                yield e.path  # a folder named like an image: an error row ("is a folder")
            if not is_link:
                yield from _walk(e.path)
        elif image_name:
            yield e.path  # a file, a dangling link, or something that vanished: the audit reads it


def _read_list(path: Path) -> Iterator[str]:
    """The paths listed in ``path``, as strings, one line at a time (a million-line list took 11.4 s
    and 721 MB to expand into Path objects at once; as streamed strings it holds one line)."""
    base = os.fspath(path.parent)
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                p = os.path.expanduser(line)
                yield p if os.path.isabs(p) else os.path.join(base, p)
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"{path}: cannot read the list file ({exc}); expected one image path per line") from exc


def _resolve(line: str, base: str) -> str:
    p = os.path.expanduser(line)
    return p if os.path.isabs(p) else os.path.join(base, p)


def _read_manifest(path: Path) -> Iterator[str]:
    """The ``path`` column of a CSV or Parquet manifest, streamed (relative paths: relative to the
    manifest's folder)."""
    base = os.fspath(path.parent)
    if path.suffix.lower() == ".csv":
        import csv

        try:
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                if MANIFEST_COLUMN not in (reader.fieldnames or []):
                    raise AuditError(f"{path}: a manifest needs a {MANIFEST_COLUMN!r} column; found columns "
                                     f"{', '.join(reader.fieldnames or []) or 'none'}")
                for row in reader:
                    value = (row.get(MANIFEST_COLUMN) or "").strip()
                    if value:
                        yield _resolve(value, base)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise AuditError(f"{path}: cannot read the CSV manifest ({exc})") from exc
        return
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise AuditError(f"{path}: reading a Parquet manifest needs pyarrow (pip install 'anomaly[ray]'), "
                         "or give the paths as a CSV manifest or a .txt list") from None
    try:
        pf = pq.ParquetFile(path)
        if MANIFEST_COLUMN not in pf.schema_arrow.names:
            raise AuditError(f"{path}: a manifest needs a {MANIFEST_COLUMN!r} column; found columns "
                             f"{', '.join(pf.schema_arrow.names) or 'none'}")
        for batch in pf.iter_batches(columns=[MANIFEST_COLUMN], batch_size=8192):
            for value in batch.column(0).to_pylist():
                if value:
                    yield _resolve(str(value), base)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        if isinstance(exc, AuditError):
            raise
        raise AuditError(f"{path}: cannot read the Parquet manifest ({exc})") from exc


def _sources(inputs: Sequence[str | os.PathLike]) -> list[tuple[str, str]]:
    """Classify each input as ``("folder" | "list" | "path", str)``, glob matches included; raise
    for the inputs that are none of them (all named in one message)."""
    sources: list[tuple[str, str]] = []
    missing: list[str] = []
    for item in inputs:
        s = os.fspath(item)
        p = Path(s).expanduser()
        if p.is_dir():
            sources.append(("folder", str(p)))
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            sources.append(("list", str(p)))
        elif p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
            sources.append(("manifest", str(p)))
        elif p.exists() or p.is_symlink():  # a dangling link is an entry too: an error row, not "missing"
            sources.append(("path", str(p)))
        elif _GLOB_CHARS & set(s):
            matches = sorted(glob.glob(os.path.expanduser(s), recursive=True))
            if not matches:
                missing.append(f"{s} (glob matched nothing)")
            # files, dangling links and the like first, then the folders' contents (as before)
            sources.extend(("path", m) for m in matches if not os.path.isdir(m))
            sources.extend(("folder", m) for m in matches if os.path.isdir(m))
        else:
            missing.append(s)
    if missing:
        raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}")
    return sources


def iter_inputs(inputs: Sequence[str | os.PathLike]) -> Iterator[str]:
    """Expand audit inputs into de-duplicated absolute paths (strings), in the order given.

    The inputs themselves are checked when this is called, before anything is yielded; the
    paths are then produced lazily.

    Args:
        inputs: image files; folders (searched recursively for image extensions); globs (anything
            containing ``* ? [``, expanded with :func:`glob.glob`, ``**`` recursive); list files
            (``.txt``/``.lst``: one path per line, blank and ``#`` lines ignored, relative paths
            relative to the list file); manifests (``.csv``/``.parquet`` with a ``path`` column,
            relative paths relative to the manifest). A listed path that does not exist is kept, and so are a
            dangling link and a folder named like an image in a folder: each becomes an error row.

    Returns:
        An iterator of absolute paths (not symlink-resolved); folder contents and glob matches sorted.

    Raises:
        FileNotFoundError: an input that is neither an existing path nor a glob with matches (at call).
        AuditError: a list file that cannot be read (while iterating).
    """
    sources = _sources(inputs)

    def paths() -> Iterator[str]:
        seen: set[str] = set()
        for kind, s in sources:
            it = (_walk(s) if kind == "folder" else _read_list(Path(s)) if kind == "list"
                  else _read_manifest(Path(s)) if kind == "manifest" else iter((s,)))
            for p in it:
                a = os.path.abspath(p)
                if a not in seen:
                    seen.add(a)
                    yield a

    return paths()


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """:func:`iter_inputs` as a list of :class:`~pathlib.Path` (absolute, in order, de-duplicated)."""
    return [Path(a) for a in iter_inputs(inputs)]


def output_id(path: str | os.PathLike) -> str:
    """File-name stem of the outputs of ``path``: ``<stem>-<sha1 of the absolute path, 10 hex>``.

    Stable across runs and unique per input even when inputs share a file name.
    """
    a = os.path.abspath(path)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(a).stem)[:48] or "image"
    return f"{stem}-{hashlib.sha1(a.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}"

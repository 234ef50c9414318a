"""The review page's local server: the audit folder's files, originals by id, and ``POST /decisions``.

:func:`serve_report` binds ``127.0.0.1`` (or the host asked for) and serves

* ``/`` and ``/report.html``: the page :func:`anomaly.deploy.review_report.build_report` wrote;
* the audit folder's own files (``thumbs/``, ``heatmaps/``, ``reconstructions/``; no folder listings);
* ``/original/<id>``: the original file of an image the page lists (and no other file);
* ``POST /decisions``: a decisions document (JSON, validated, for the audit's model), written
  atomically to ``OUT/decisions.json``, where ``anomaly calibrate --reviews`` reads it.

Two checks keep other web pages out, since the browser that shows the page also visits others:

* **Host header**: a request whose ``Host`` is not the bound address (``127.0.0.1``, ``localhost`` or
  ``[::1]`` with the port, or the host the server was started with) is answered
  ``421 Misdirected Request``. A page on a hostile site can rebind its own name to 127.0.0.1 (DNS
  rebinding) and then read this server as its own origin; its requests still carry its name in
  ``Host``.
* **Token**: each server draws a random token (:func:`secrets.token_urlsafe`); the URL it is opened
  at carries it (``/?token=...``, printed by ``anomaly review --serve``), the page sends it back in
  the ``X-Review-Token`` header, and ``POST /decisions`` without it, or with another, is answered
  ``403`` (compared in constant time). Decisions move thresholds, so only the page opened from that
  URL can post them. The JSON content type and the custom header also make any cross-site post need
  a CORS preflight, which this server never grants.

Example::

    server = serve_report("audit_out/", port=0)     # 127.0.0.1, any free port
    print(server.url)                               # http://127.0.0.1:PORT/?token=...
    server.serve_forever()                          # shutdown() from another thread stops it
"""
from __future__ import annotations

import hmac
import json
import logging
import mimetypes
import os
import secrets
import socket
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from anomaly.data.io import atomic_write
from anomaly.deploy.review_report import (DECISIONS_FILE, REPORT_FILE, REPORT_ROWS, ReviewError, build_report,
                                          load_manifest, page_data, validate_decisions)

__all__ = ["serve_report", "ReviewServer", "TOKEN_HEADER", "LOOPBACK_NAMES"]

log = logging.getLogger(__name__)

#: The request header that carries the server's token (the page's script sets it).
TOKEN_HEADER = "X-Review-Token"
#: Host names that always reach a server bound to a loopback address.
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_MAX_POST = 64 << 20
_WILDCARDS = ("", "0.0.0.0", "::")


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` header -> ``(lower-case name without brackets, port or None)``; ``None`` if malformed."""
    try:
        parts = urlsplit("//" + value.strip())
        return (parts.hostname or "").lower(), parts.port
    except ValueError:  # a port that is not a number, an unclosed bracket
        return None


class ReviewServer(ThreadingHTTPServer):
    """A :class:`ThreadingHTTPServer` that knows its token, the ``Host`` names it answers, and its URL.

    Attributes:
        token: the per-run secret the page sends with ``POST /decisions``.
        allowed_hosts: lower-case host names (no port, IPv6 without brackets) accepted in ``Host``.
        url: where to open the page, token included.
    """

    daemon_threads = True

    def __init__(self, host: str, port: int, handler: Any, token: str, allowed_hosts: Sequence[str]) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), handler)
        self.token = token
        self.allowed_hosts = frozenset(h.lower().strip("[]") for h in allowed_hosts)
        shown = "127.0.0.1" if host in _WILDCARDS else host
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{self.server_address[1]}/?token={token}"

    def host_allowed(self, value: str | None) -> bool:
        """Whether a request's ``Host`` header names this server (a listed name and the bound port)."""
        if not value:
            return False
        parsed = _split_host(value)
        if parsed is None:
            return False
        name, port = parsed
        return name in self.allowed_hosts and (port if port is not None else 80) == self.server_address[1]


class _Handler(SimpleHTTPRequestHandler):
    """Static files of ``OUT``, originals by id, and ``POST /decisions``; every request's ``Host``
    checked first."""

    originals: dict[str, str] = {}
    bundle_sha256: str | None = None
    out: Path = Path(".")
    server: ReviewServer

    def log_message(self, fmt: str, *args: Any) -> None:  # route to logging, not stderr
        log.debug("review server: " + fmt, *args)

    def _reply(self, status: int, obj: dict[str, Any]) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _host_ok(self) -> bool:
        if self.server.host_allowed(self.headers.get("Host")):
            return True
        log.warning("review server: refused a request for Host %r (expected one of %s with port %d)",
                    self.headers.get("Host"), sorted(self.server.allowed_hosts), self.server.server_address[1])
        self._reply(HTTPStatus.MISDIRECTED_REQUEST, {"ok": False, "error": "unexpected Host header"})
        return False

    def list_directory(self, path: str | os.PathLike) -> None:  # noqa: D102 - no folder listings
        self.send_error(HTTPStatus.NOT_FOUND, "no such file")
        return None

    def do_HEAD(self) -> None:  # noqa: N802 (http.server naming)
        if self._host_ok():
            super().do_HEAD()

    def do_GET(self) -> None:  # noqa: N802
        if not self._host_ok():
            return
        route, _, query = self.path.partition("?")
        if route == "/":  # the URL printed: /?token=...
            self.path = "/" + REPORT_FILE + ("?" + query if query else "")
        if route.startswith("/original/"):
            src = self.originals.get(route[len("/original/"):])
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
        if not self._host_ok():
            return
        if self.path.split("?", 1)[0] != "/decisions":
            self._reply(HTTPStatus.NOT_FOUND, {"ok": False, "error": "POST /decisions only"})
            return
        given = self.headers.get(TOKEN_HEADER) or ""
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self.server.token.encode()):
            self._reply(HTTPStatus.FORBIDDEN, {"ok": False, "error": f"missing or wrong {TOKEN_HEADER}: open the page "
                                                                     "from the URL `anomaly review --serve` printed"})
            return
        # a JSON content type makes cross-site posts need a CORS preflight, which this server never grants
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            self._reply(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"ok": False, "error": "expected application/json"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
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


def _host_names(host: str) -> list[str]:
    """The ``Host`` names a server bound to ``host`` answers: the loopback names for a loopback or
    wildcard address, plus ``host`` itself (and, for a wildcard, this machine's name)."""
    names = list(LOOPBACK_NAMES)
    if host in _WILDCARDS:
        names += [socket.gethostname(), socket.getfqdn()]
    else:
        names.append(host)
    return names


def serve_report(out: str | os.PathLike, port: int = 8765, build: bool = True, max_rows: int = REPORT_ROWS, *,
                 host: str = "127.0.0.1", allowed_hosts: Sequence[str] = (), token: str | None = None) -> ReviewServer:
    """A server on ``host:port`` (``0``: any free port) for the report in ``out``.

    Serves ``out``'s files, the originals of the images the page lists at ``/original/<id>``, and
    accepts ``POST /decisions`` (JSON, validated, same model, with the token) written atomically to
    ``out/decisions.json``. The caller runs ``serve_forever()`` (e.g. in a thread), then
    ``shutdown()`` and ``server_close()``.

    Args:
        build: (re)write ``report.html`` first (listing ``max_rows`` images, see
            :func:`anomaly.deploy.review_report.build_report`).
        host: the address to bind (default loopback only). Anything else makes the originals and
            results readable by whoever reaches that address.
        allowed_hosts: further ``Host`` names to answer (e.g. a DNS name of this machine); the
            loopback names and ``host`` are always accepted.
        token: the secret ``POST /decisions`` needs (default: a fresh :func:`secrets.token_urlsafe`).

    Returns:
        The bound :class:`ReviewServer`; its ``url`` carries the token.

    Raises:
        ReviewError: ``out`` is not an audit folder, or there is no report to serve.
        OSError: the address cannot be bound (port in use).
    """
    out = Path(out).resolve()
    manifest = load_manifest(out)
    report = build_report(out, max_rows=max_rows) if build else out / REPORT_FILE
    if not report.is_file():
        raise ReviewError(f"{report}: no report to serve; run `anomaly review {out}` first")
    handler = type("ReviewHandler", (_Handler,), {
        "originals": {r["id"]: r["path"] for r in page_data(report)["rows"] if r.get("id")},
        "bundle_sha256": manifest.get("bundle_sha256"), "out": out})
    server = ReviewServer(host, port, partial(handler, directory=str(out)), token or secrets.token_urlsafe(32),
                          [*_host_names(host), *allowed_hosts])
    log.info("serving %s on %s:%d", out, host, server.server_address[1])
    return server

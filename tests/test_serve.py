"""The inspection service over real sockets: uvicorn on a free 127.0.0.1 port, started by the tests.

The served bundles are copies of the session's tiny AAE (32², grayscale); real ELPV cells are
posted to it. Its scores of cells mean little, but every way in must give the score the runtime
gives alone, and a lighting shift of the cells must move them out of their calibration
distribution (the drift alarm), which needs nothing more of the model.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import httpx
import numpy as np
import pytest

from anomaly.data.elpv import load_labels
from anomaly.data.io import decode_image
from anomaly.deploy.bundle import load_sidecar, reference_scores, write_sidecar
from anomaly.deploy.runtime import Runtime
from anomaly.deploy.serve import parse_bundles
from anomaly.deploy.serve_app import ServeConfig, Service, run_in_thread
from anomaly.deploy.serve_batcher import MicroBatcher
from anomaly.deploy.serve_limits import image_dimensions

TOKEN = "a-test-token-of-enough-length"
PNG = {"Content-Type": "image/png"}
N_REFERENCE, N_WINDOW = 250, 150
RTOL = 1e-5  # batched vs single-image float32 runs of the same graph (measured: 1.3e-7)


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def cells() -> dict[str, list[bytes]]:
    """Functional mono ELPV cells, as their PNG files' bytes: a calibration reference and a disjoint
    window's worth of others."""
    rows = [r for r in load_labels() if r[1] == 0.0 and r[2] == "mono"]
    order = np.random.default_rng(0).permutation(len(rows))
    pick = [rows[i][0].read_bytes() for i in order[:N_REFERENCE + N_WINDOW]]
    return {"reference": pick[:N_REFERENCE], "window": pick[N_REFERENCE:]}


@pytest.fixture(scope="module")
def bundles(trained_bundle, tmp_path_factory, cells) -> dict[str, Path]:
    """Two copies of the session bundle: ``cells`` with the reference cells' scores as its drift
    reference, ``tiles`` for threshold changes."""
    root = tmp_path_factory.mktemp("serve")
    out = {name: Path(shutil.copytree(trained_bundle["bundle"], root / name)) for name in ("cells", "tiles")}
    rt = Runtime(out["cells"])
    scores = [r.score for r in rt.score_images([decode_image(b, raw=True) for b in cells["reference"]])]
    meta = load_sidecar(out["cells"])
    meta["calibration"]["reference_scores"] = reference_scores(scores)
    write_sidecar(out["cells"], meta)
    return out


@pytest.fixture(scope="module")
def server(bundles):
    config = ServeConfig(max_batch=16, max_wait_ms=10, queue_size=64, max_bytes=1 << 20, max_pixels=2_000_000,
                         token=TOKEN, drift_window=N_WINDOW, drift_min_scores=100, graceful_timeout=10)
    service = Service({"cells": bundles["cells"], "tiles": bundles["tiles"]}, config).load()
    with run_in_thread(service) as srv:
        yield srv


def _metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _post_all(url: str, bodies: list[bytes], clients: int, path: str = "/v1/models/cells/inspect") -> list[httpx.Response]:
    """``clients`` concurrent connections, each posting its share of ``bodies`` one after another."""
    out: list[httpx.Response | None] = [None] * len(bodies)

    async def client(k: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            for i in range(k, len(bodies), clients):
                out[i] = await c.post(path, content=bodies[i], headers=PNG)

    await asyncio.gather(*(client(k) for k in range(clients)))
    return out  # type: ignore[return-value]


def test_health_metadata_and_no_server_paths(server, bundles):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True, "state": "ready"}
        assert c.get("/v2").json()["models"] == ["cells", "tiles"]
        r = c.get("/v2/models/cells")
        assert r.status_code == 200
        meta = r.json()
        side = load_sidecar(bundles["cells"])
        assert meta["onnx_sha256"] == side["onnx"]["sha256"] and meta["input_size"] == 32 and meta["channels"] == 1
        assert meta["threshold"] == side["calibration"]["image"]["threshold"]
        assert meta["calibration_method"] == side["calibration"]["image"]["method"]
        assert meta["sidecar_schema"] == side["schema_version"]
        assert meta["drift"]["reference"] == N_REFERENCE
        text = r.text + c.get("/v2/models/tiles").text + c.get("/openapi.json").text
        for p in bundles.values():  # nothing of the server's file system leaves it
            assert str(p) not in text and str(p.parent) not in text
        assert c.get("/v2/models/nope").status_code == 404


def test_32_concurrent_clients_get_the_single_image_scores(server, cells):
    bodies = cells["window"][:128]
    rt = Runtime(server.server.service.models["cells"]._bundle)
    expected = [rt.score_image(decode_image(b, raw=True)) for b in bodies]
    before = httpx.get(server.url + "/metrics").text
    got = asyncio.run(_post_all(server.url, bodies, clients=32))
    assert [r.status_code for r in got] == [200] * len(bodies)
    for r, e in zip(got, expected):
        body = r.json()
        assert body["score"] == pytest.approx(e.score, rel=RTOL)
        assert body["label"] == e.label and body["threshold"] == e.threshold
        assert [(g["x"], g["y"], g["w"], g["h"]) for g in body["regions"]] == [(g.x, g.y, g.w, g.h) for g in e.regions]
        assert (body["width"], body["height"]) == (300, 300)
    after = httpx.get(server.url + "/metrics").text
    count = _metric(after, "anomaly_batch_size_count", model="cells") - _metric(before, "anomaly_batch_size_count", model="cells")
    singles = (_metric(after, "anomaly_batch_size_bucket", model="cells", le="1.0")
               - _metric(before, "anomaly_batch_size_bucket", model="cells", le="1.0"))
    assert count > 0 and count - singles > 0, "no batch of more than one image"
    assert count < len(bodies)
    assert max(r.json()["timings"]["batch_size"] for r in got) > 1


def test_batch_endpoint_and_heatmap(server, cells):
    bodies = cells["window"][:3]
    files = [("images", (f"cell{i}.png", b, "image/png")) for i, b in enumerate(bodies)]
    files.append(("images", ("broken.png", b"\x89PNG\r\n\x1a\nnot really", "image/png")))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/models/cells/inspect/batch", files=files)
        assert r.status_code == 200, r.text
        items = r.json()["results"]
        assert [i["status"] for i in items] == [200, 200, 200, 422]
        assert "broken.png" in items[3]["error"] and "PNG" in items[3]["error"]
        single = c.post("/v1/models/cells/inspect?heatmap=png", content=bodies[0], headers=PNG).json()
        assert items[0]["result"]["score"] == pytest.approx(single["score"], rel=RTOL)
        overlay = decode_image(__import__("base64").b64decode(single["heatmap_png"]))
        assert overlay.shape == (300, 300, 3)
        form = c.post("/v1/models/cells/inspect", files={"image": ("c.png", bodies[0], "image/png")}).json()
        assert form["score"] == pytest.approx(single["score"], rel=RTOL)


def test_bad_inputs_get_their_status_and_message(server):
    big = np.zeros((3000, 3000), np.uint8)  # 9 MP of zeros: a 9 kB PNG, a decompression bomb at 2 MP
    bomb = _png(big)
    assert len(bomb) < 100_000
    good = _png((np.random.default_rng(0).random((48, 48)) * 255).astype(np.uint8))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        def post(content: bytes, headers: dict | None = PNG, path: str = "/v1/models/tiles/inspect") -> httpx.Response:
            return c.post(path, content=content, headers=headers)

        cases = [
            (post(good, path="/v1/models/nope/inspect"), 404, "no model named 'nope'.*cells"),
            (post(good, {"Content-Type": "text/plain"}), 415, "unsupported content type 'text/plain'.*image/png"),
            (post(good, {}), 415, "image/png"),
            (post(b""), 422, "empty.*expected one encoded image"),
            (post(b"hello, world"), 422, "not a decodable image.*PNG, JPEG"),
            (post(good[:40]), 422, "not a decodable image"),
            (post(bomb), 413, "3000x3000.*at most 2,000,000 pixels"),
            (post(b"\0" * ((1 << 20) + 1)), 413, "at most 1,048,576 bytes"),
            (post(good, path="/v1/models/tiles/inspect?heatmap=jpeg"), 422, "heatmap"),
            (post(good, path="/v1/models/tiles/inspect/batch"), 415, "multipart/form-data"),
            (c.post("/v1/models/tiles/inspect", files={"note": (None, "text only")}), 422, "no file"),
        ]
        for r, status, message in cases:
            assert r.status_code == status, (status, r.text)
            assert re.search(message, r.json()["detail"]), (message, r.json())
        # a chunked body without Content-Length is cut off at the limit while reading
        def chunks():
            for _ in range(40):
                yield b"\0" * (64 << 10)
        r = c.post("/v1/models/tiles/inspect", content=chunks(), headers=PNG)
        assert r.status_code == 413 and "exceeds 1,048,576 bytes" in r.json()["detail"]
        ok = post(good)  # and it keeps serving
        assert ok.status_code == 200 and ok.json()["width"] == 48
        text = c.get("/metrics").text
        assert _metric(text, "anomaly_requests_total", model="tiles", endpoint="inspect", code="413") >= 3
        assert _metric(text, "anomaly_requests_total", model="-", endpoint="inspect", code="404") >= 1
        assert _metric(text, "anomaly_queue_admitted", model="tiles") == 0  # every refusal gave its place back


def test_overload_gets_429_at_once_and_admitted_requests_are_answered(bundles, cells):
    config = ServeConfig(max_batch=2, max_wait_ms=30, queue_size=4, graceful_timeout=10)  # no token: changes are off
    service = Service({"tiles": bundles["tiles"]}, config).load()
    bodies = cells["window"][:48]
    with run_in_thread(service) as srv:
        async def client(c: httpx.AsyncClient, body: bytes) -> tuple[httpx.Response, float]:
            t = time.perf_counter()
            r = await c.post("/v1/models/tiles/inspect", content=body, headers=PNG)
            return r, time.perf_counter() - t

        async def main() -> list[tuple[httpx.Response, float]]:
            limits = httpx.Limits(max_connections=48)
            async with httpx.AsyncClient(base_url=srv.url, timeout=30, limits=limits) as c:
                return await asyncio.gather(*(client(c, b) for b in bodies))

        got = asyncio.run(main())
        codes = [r.status_code for r, _ in got]
        assert set(codes) <= {200, 429}, codes
        assert 0 < codes.count(429) and codes.count(200) >= 4
        for r, took in got:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1 and "busy" in r.json()["detail"]
            else:
                assert np.isfinite(r.json()["score"])
        r = httpx.put(srv.url + "/v1/models/tiles/threshold", json={"threshold": 0.1},
                      headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 403 and "ANOMALY_SERVE_TOKEN" in r.json()["detail"]


def _raw_request(body_length: int) -> bytes:
    return (f"POST /v1/models/tiles/inspect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {body_length}\r\n\r\n").encode()


def _raw_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(rest) < int(headers["content-length"]):
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), headers, rest


def test_a_full_queue_answers_429_from_the_headers_before_routing_or_reading_the_body(bundles, cells):
    config = ServeConfig(max_batch=1, max_wait_ms=0, queue_size=1, graceful_timeout=10)
    service = Service({"tiles": bundles["tiles"]}, config).load()
    body = cells["window"][0]
    with run_in_thread(service) as srv:
        port = srv.server.port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as holder, \
                socket.create_connection(("127.0.0.1", port), timeout=10) as late:
            holder.sendall(_raw_request(len(body)) + body[:100])  # admitted: it holds the one place while its body comes
            deadline = time.monotonic() + 10
            while service.models["tiles"].batcher.admitted < 1:
                assert time.monotonic() < deadline, "the first request was never admitted"
                time.sleep(0.01)
            t = time.perf_counter()
            late.sendall(_raw_request(len(body)))  # the headers only: its body never comes
            status, headers, answer = _raw_response(late)
            took = time.perf_counter() - t
            assert status == 429 and int(headers["retry-after"]) >= 1, (status, headers)
            assert "busy" in json.loads(answer)["detail"] and "1 of 1 queue places" in json.loads(answer)["detail"]
            assert took < 2.0  # answered at once, not after a body timeout
            # the edge answered it: FastAPI never routed it, and nothing asked for its body
            asked: list[str] = []

            async def receive() -> dict:
                asked.append("receive")
                return {"type": "http.disconnect"}

            async def call() -> tuple[dict, list[dict]]:
                sent: list[dict] = []

                async def send(message: dict) -> None:
                    sent.append(message)

                scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                         "scheme": "http", "path": "/v1/models/tiles/inspect", "raw_path": b"/v1/models/tiles/inspect",
                         "query_string": b"", "root_path": "", "server": ("127.0.0.1", port), "client": ("127.0.0.1", 1),
                         "headers": [(b"content-type", b"image/png"), (b"content-length", b"100")]}
                await srv.server.config.app(scope, receive, send)
                return scope, sent

            scope, sent = asyncio.run(call())
            assert sent[0]["status"] == 429 and "route" not in scope and asked == []
            # a request another check refuses first still gets its own status, full queue or not
            r = httpx.post(srv.url + "/v1/models/tiles/inspect", content=body, headers={"Content-Type": "text/plain"})
            assert r.status_code == 415
            holder.sendall(body[100:])
            status, _, answer = _raw_response(holder)
            assert status == 200 and np.isfinite(json.loads(answer)["score"])
        text = httpx.get(srv.url + "/metrics").text
        assert _metric(text, "anomaly_requests_total", model="tiles", endpoint="inspect", code="429") == 2
        assert _metric(text, "anomaly_refusal_seconds_count", model="tiles") == 2
        assert _metric(text, "anomaly_refusal_seconds_bucket", model="tiles", le="10.0") == 2


def test_the_batcher_hands_a_tiled_bundles_images_over_as_a_list():
    seen: list = []

    class FakeRuntime:
        def __init__(self, tiled: bool | None) -> None:
            if tiled is not None:
                self.preprocess = SimpleNamespace(tiled=tiled)
            else:  # a preprocessing from before tiling: no such attribute
                self.preprocess = SimpleNamespace()

        def score_batch(self, batch, sizes):
            seen.append((batch, list(sizes)))
            return [SimpleNamespace(score=float(i)) for i in range(len(sizes))]

    for tiled in (True, False, None):
        seen.clear()
        rt = FakeRuntime(tiled)
        b = MicroBatcher("t", max_batch=4, max_wait=0.2, queue_size=4)
        b.set_runtime(rt)
        try:
            b.reserve(2)
            shapes = [(1, 40, 60), (1, 40, 60)] if not tiled else [(1, 40, 60), (1, 64, 96)]
            futures = [b.submit(rt, np.zeros(shape, np.float32), shape[1:]) for shape in shapes]
            assert [f.result(10).result.score for f in futures] in ([0.0, 1.0], [0.0, 0.0])
        finally:
            b.stop(10)
        assert sum(len(sizes) for _, sizes in seen) == 2
        for batch, sizes in seen:
            if tiled:
                assert isinstance(batch, list) and [x.shape[1:] for x in batch] == sizes
            else:
                assert isinstance(batch, np.ndarray) and batch.shape == (len(sizes), 1, 40, 60)


def test_a_second_lane_scores_only_a_full_batch_while_the_first_is_busy():
    gate = threading.Event()
    calls: list[int] = []

    class HeldRuntime:  # the first batch holds its lane until the gate opens
        preprocess = SimpleNamespace(tiled=False)

        def score_batch(self, batch, sizes):
            calls.append(len(sizes))
            if len(calls) == 1:
                gate.wait(10)
            return [SimpleNamespace(score=float(x[0, 0, 0])) for x in batch]

    def until(predicate) -> None:
        deadline = time.monotonic() + 10
        while not predicate():
            assert time.monotonic() < deadline, calls
            time.sleep(0.01)

    b = MicroBatcher("t", max_batch=4, max_wait=0.0, queue_size=16)
    rt = HeldRuntime()
    b.set_runtime(rt)

    def put(value: float):
        b.reserve()
        return b.submit(rt, np.full((1, 2, 2), value, np.float32), (2, 2))

    try:
        first = put(0)
        until(lambda: calls == [1])
        partial = [put(v) for v in (1, 2, 3)]
        time.sleep(0.2)
        assert calls == [1] and b.depth == 3  # less than a full batch waits for the busy lane
        full = put(4)
        until(lambda: calls == [1, 4])  # a full batch runs beside it
        assert [f.result(10).result.score for f in (*partial, full)] == [1.0, 2.0, 3.0, 4.0]
        assert not first.done()
        gate.set()
        assert first.result(10).result.score == 0.0
    finally:
        gate.set()
        assert b.stop(10)


def test_threshold_change_needs_the_token_and_is_written_to_the_sidecar(server, bundles):
    good = _png((np.random.default_rng(3).random((40, 40)) * 255).astype(np.uint8))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        score = c.post("/v1/models/tiles/inspect", content=good, headers=PNG).json()["score"]
        r = c.put("/v1/models/tiles/threshold", json={"threshold": score / 2})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        r = c.put("/v1/models/tiles/threshold", json={"threshold": score / 2}, headers={"Authorization": "Bearer " + "x" * 30})
        assert r.status_code == 403 and "not this server's" in r.json()["detail"]
        assert load_sidecar(bundles["tiles"])["calibration"]["image"]["threshold"] != score / 2
        for new, label in ((score / 2, 1), (score * 2, 0)):
            r = c.put("/v1/models/tiles/threshold", json={"threshold": new}, headers=auth)
            assert r.status_code == 200 and r.json()["threshold"] == new and r.json()["calibration_method"] == "manual"
            assert load_sidecar(bundles["tiles"])["calibration"]["image"]["threshold"] == new  # and the hash still checks
            after = c.post("/v1/models/tiles/inspect", content=good, headers=PNG).json()
            assert after["threshold"] == new and after["label"] == label
        r = c.put("/v1/models/tiles/threshold", json={"threshold": -1.0}, headers=auth)
        assert r.status_code == 422 and ">= 0" in r.json()["detail"]
        r = c.put("/v1/models/tiles/threshold", json={}, headers=auth)
        assert r.status_code == 422


def test_hot_reload_under_load_fails_no_request(server, bundles, cells):
    bodies = cells["window"][:32]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    thresholds = [0.3, 0.7, 0.55]
    changes: list[int] = []
    done, loaded = threading.Event(), threading.Event()

    def change() -> None:
        try:
            loaded.wait(20)
            with httpx.Client(base_url=server.url, timeout=30) as c:
                for t in thresholds:
                    time.sleep(0.1)
                    changes.append(c.put("/v1/models/tiles/threshold", json={"threshold": t}, headers=auth).status_code)
                    changes.append(c.post("/v1/models/tiles/reload", headers=auth).status_code)
                time.sleep(0.1)
        finally:
            done.set()

    async def load() -> list[httpx.Response]:  # 16 clients posting until the changes are done (at most 2,000)
        got: list[httpx.Response] = []

        async def client(k: int) -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
                i = k
                while not done.is_set() and len(got) < 2000:
                    got.append(await c.post("/v1/models/tiles/inspect", content=bodies[i % len(bodies)], headers=PNG))
                    i += 16
                    if len(got) >= 32:
                        loaded.set()

        await asyncio.gather(*(client(k) for k in range(16)))
        return got

    worker = threading.Thread(target=change)
    worker.start()
    got = asyncio.run(load())
    worker.join(30)
    assert changes == [200] * 6
    assert len(got) > 64 and [r.status_code for r in got] == [200] * len(got)
    seen = set()
    for r in got:
        body = r.json()
        seen.add(body["threshold"])
        assert body["label"] == int(body["score"] > body["threshold"])  # each answer decided by one threshold
    assert len(seen & set(thresholds)) >= 2, seen  # the changes landed during the load
    assert load_sidecar(bundles["tiles"])["calibration"]["image"]["threshold"] == thresholds[-1]


def test_drift_alarm_on_a_real_lighting_shift_not_on_normal_cells(server, cells):
    window = cells["window"]
    asyncio.run(_post_all(server.url, window, clients=16))
    calm = httpx.get(server.url + "/v2/models/cells").json()["drift"]
    assert calm["scores"] == N_WINDOW and not calm["alarm"], calm
    assert calm["ks_pvalue"] > 0.05 and calm["psi"] < 0.2
    # the lamp dims by 15 % and the camera's offset rises: the same cells, as a line would see them
    shifted = [_png(np.clip(decode_image(b, raw=True).astype(np.float32) * 0.85 + 12, 0, 255).astype(np.uint8))
               for b in window]
    asyncio.run(_post_all(server.url, shifted, clients=16))
    alarm = httpx.get(server.url + "/v2/models/cells").json()["drift"]
    assert alarm["scores"] == N_WINDOW and alarm["alarm"], alarm
    text = httpx.get(server.url + "/metrics").text
    assert _metric(text, "anomaly_drift_alarm", model="cells") == 1.0
    assert _metric(text, "anomaly_drift_ks_pvalue", model="cells") < 0.05
    # the session bundle's own reference is its 4 validation images: too few for a verdict
    assert 'anomaly_drift_ks_pvalue{model="tiles"}' not in text and _metric(text, "anomaly_drift_alarm", model="tiles") == 0
    assert "reference too small" in httpx.get(server.url + "/v2/models/tiles").json()["drift"]["reason"]


def test_schemathesis_against_the_served_schema(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                                   response_schema_conformance, status_code_conformance)

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              response_headers_conformance]
    ran = []
    for result in schema.get_all_operations():
        op = result.ok()

        @settings(max_examples=6, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case) -> None:
            case.call_and_validate(base_url=server.url, checks=checks, timeout=30)
            ran.append(op.label)

        run()
    assert {"POST /v1/models/{name}/inspect", "PUT /v1/models/{name}/threshold", "GET /v2/models/{name}"} <= set(ran)
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200


def test_sigterm_drains_in_flight_requests_and_exits_zero(bundles, cells):
    cmd = [sys.executable, "-m", "anomaly.cli", "serve", f"tiles={bundles['tiles']}", "--port", "0", "--max-batch", "8",
           "--drain-delay", "1.0", "--graceful-timeout", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = f"http://127.0.0.1:{m.group(1)}"
        answer: dict = {}

        body = cells["window"][0]

        def slow_body():  # a station on a slow link: the request is in flight for 1.6 s
            step = len(body) // 4 + 1
            for i in range(0, len(body), step):
                yield body[i:i + step]
                time.sleep(0.4)

        def inflight() -> None:
            answer["r"] = httpx.post(url + "/v1/models/tiles/inspect", content=slow_body(), headers=PNG, timeout=20)

        t = threading.Thread(target=inflight)
        t.start()
        deadline = time.monotonic() + 10
        while "queue" not in answer and time.monotonic() < deadline:
            text = httpx.get(url + "/metrics").text
            if _metric(text, "anomaly_queue_admitted", model="tiles") >= 1:  # admitted, its body still arriving
                answer["queue"] = True
            time.sleep(0.02)
        assert answer.get("queue"), "the request was never admitted"
        proc.send_signal(signal.SIGTERM)
        r = httpx.get(url + "/v2/health/ready", timeout=5)  # during the drain delay: answering, not ready
        assert r.status_code == 503 and r.json() == {"ready": False, "state": "draining"}
        t.join(20)
        assert answer["r"].status_code == 200 and np.isfinite(answer["r"].json()["score"])
        assert answer["r"].json()["score"] == pytest.approx(Runtime(bundles["tiles"]).score_image(
            decode_image(body, raw=True)).score, rel=RTOL)
        assert proc.wait(20) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_service_imports_no_torch_and_says_what_to_install_without_the_extra(tmp_path):
    probe = ("import sys\n"
             "import anomaly.deploy.serve_app, anomaly.deploy.serve, anomaly.deploy.drift\n"
             "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'anomaly.training', 'sklearn'))]\n"
             "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    missing = ("import sys\nsys.modules['fastapi'] = None\n"
               "from anomaly.cli import main\nsys.exit(main(['serve', 'some/bundle']))\n")
    out = subprocess.run([sys.executable, "-c", missing], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "pip install 'anomaly[serve]'" in out.stderr, out.stderr


def test_bundle_names_and_cli_errors(tmp_path):
    assert parse_bundles(["cells=a/b", "c/tiles/"]) == {"cells": Path("a/b"), "tiles": Path("c/tiles/")}
    with pytest.raises(ValueError, match="given twice"):
        parse_bundles(["x/cells", "y/cells"])
    with pytest.raises(ValueError, match="letters, digits"):
        parse_bundles(["bad name=a"])
    from anomaly.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2  # a bad bundle stops before the port opens
    with pytest.raises(SystemExit):
        main(["serve", str(tmp_path), "--max-batch", "12"])


def test_image_headers_are_read_without_decoding():
    img = (np.random.default_rng(0).random((37, 53, 3)) * 255).astype(np.uint8)
    for ext, fmt in ((".png", "PNG"), (".jpg", "JPEG"), (".bmp", "BMP"), (".tiff", "TIFF"), (".webp", "WebP"),
                     (".ppm", "PNM")):
        ok, buf = cv2.imencode(ext, img)
        assert image_dimensions(buf.tobytes()) == (fmt, 53, 37), ext
    assert image_dimensions(b"GIF89a...") is None


def test_audit_summary_carries_the_drift_verdict(bundles, cells, tmp_path):
    from anomaly.deploy.audit import run_audit

    folder = tmp_path / "shifted"
    folder.mkdir()
    for i, b in enumerate(cells["window"][:110]):  # a dimmer lamp again, as files this time
        img = np.clip(decode_image(b, raw=True).astype(np.float32) * 0.85 + 12, 0, 255).astype(np.uint8)
        (folder / f"{i:03d}.png").write_bytes(_png(img))
    summary = run_audit(bundles["cells"], [folder], tmp_path / "audit", heatmaps="none", thumbnail=0)
    drift = summary["drift"]
    assert drift["reference"] == N_REFERENCE and drift["scores"] == 110 and drift["alarm"], drift
    assert json.loads((tmp_path / "audit" / "summary.json").read_text())["drift"]["alarm"] is True

"""`anomaly review` (report.html, local server) and `anomaly calibrate --reviews`."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from anomaly.cli import main


@pytest.fixture
def audited(trained_bundle: dict, tmp_path: Path) -> dict:
    """A private copy of the bundle (calibrate rewrites it) and an audit of the test images."""
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_bundle["bundle"], bundle)
    out = tmp_path / "audit"
    assert main(["audit", str(bundle), str(trained_bundle["data"] / "test"), "--out", str(out), "--reconstructions"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {"bundle": bundle, "out": out, "records": records,
            "sha": json.loads((bundle / "model.json").read_text())["onnx"]["sha256"]}


def _threshold(bundle: Path) -> float:
    return json.loads((bundle / "model.json").read_text())["calibration"]["image"]["threshold"]


def test_report_is_complete_and_self_contained(audited: dict, capsys) -> None:
    out = audited["out"]
    assert main(["review", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    for r in audited["records"]:
        assert json.dumps(r["path"])[1:-1] in page
    data = json.loads(re.search(r'<script type="application/json" id="review-data">(.*?)</script>', page, re.S).group(1))
    assert len(data["rows"]) == len(audited["records"])
    scores = [r["score"] for r in data["rows"]]
    assert scores == sorted(scores, reverse=True)
    # histogram of the normal calibration scores with the threshold, as inline SVG
    assert '<svg id="histogram"' in page and 'class="h-normal"' in page and 'id="thr-cal"' in page
    assert data["threshold"] == pytest.approx(_threshold(audited["bundle"]))
    # no network: no absolute URLs, no external scripts or stylesheets; images are files inside OUT
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script src" not in page
    for row in data["rows"]:
        for key in ("heatmap", "recon"):
            assert row[key] and (out / row[key]).is_file() and not Path(row[key]).is_absolute()
        assert row["thumb"] is None and row["original"]  # small PNGs: shown from the file and the heatmap
    assert 'id="thr-slider"' in page and 'id="flagged-count"' in page and 'data-filter="errors"' in page


def test_review_of_a_non_audit_folder(tmp_path: Path, capsys) -> None:
    assert main(["review", str(tmp_path)]) == 2
    assert "not a folder written by `anomaly audit`" in capsys.readouterr().err


def test_calibrate_with_reviews_refits_the_threshold(audited: dict, tmp_path: Path, capsys) -> None:
    bundle, recs = audited["bundle"], audited["records"]
    before = _threshold(bundle)
    flagged = [r for r in recs if r["label"] == 1]
    good_flagged = [r for r in flagged if "/good/" in r["path"]]
    defects = [r for r in flagged if "/blob/" in r["path"]]
    assert defects, "the blob images should be flagged"
    if not good_flagged:  # make sure there is a false alarm to learn from
        good_flagged = [max((r for r in recs if "/good/" in r["path"]), key=lambda r: r["score"])]

    # only false alarms: the threshold goes just above the highest one
    fa = tmp_path / "fa.json"
    fa.write_text(json.dumps({"bundle_sha256": audited["sha"], "decisions": [
        {"path": r["path"], "score": r["score"], "decision": "false_alarm"} for r in good_flagged]}))
    assert main(["calibrate", str(bundle), "--reviews", str(fa)]) == 0
    printed = capsys.readouterr().out
    top_fa = max(r["score"] for r in good_flagged)
    after = _threshold(bundle)
    assert after >= top_fa and after == pytest.approx(max(before, top_fa), rel=1e-9)
    assert "false alarm" in printed and "image threshold" in printed

    # both classes: a labelled method (f1) separates them
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"bundle_sha256": audited["sha"], "decisions": [
        {"path": r["path"], "score": r["score"], "decision": "false_alarm"} for r in good_flagged] + [
        {"path": r["path"], "score": r["score"], "decision": "defect"} for r in defects]}))
    assert main(["calibrate", str(bundle), "--reviews", str(both)]) == 0
    cal = json.loads((bundle / "model.json").read_text())["calibration"]
    thr = cal["image"]["threshold"]
    assert cal["image"]["method"] == "f1" and cal["source"]["reviews"]["n_defect"] == len(defects)
    assert all(r["score"] > thr for r in defects) and all(r["score"] <= thr for r in good_flagged)
    assert cal["image"]["normal_histogram"] and cal["pixel"]["threshold"] is not None  # kept
    assert f"{len(defects)}/{len(defects)} defects still flagged" in capsys.readouterr().out

    # decisions about another model are refused; --normal or --reviews is required
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"bundle_sha256": "f" * 64, "decisions": []}))
    assert main(["calibrate", str(bundle), "--reviews", str(other)]) == 2
    assert "another model" in capsys.readouterr().err
    assert main(["calibrate", str(bundle)]) == 2


def test_server_writes_decisions_atomically(audited: dict) -> None:
    from anomaly.deploy.review import serve_report

    server = serve_report(audited["out"], port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert urllib.request.urlopen(f"{base}/report.html").status == 200
        r0 = audited["records"][0]
        assert urllib.request.urlopen(f"{base}/original/{r0['id']}").read() == Path(r0["path"]).read_bytes()
        doc = {"bundle_sha256": audited["sha"], "decisions": [{"path": r0["path"], "score": r0["score"], "decision": "defect"}]}

        def post(body: bytes, ctype: str = "application/json") -> int:
            req = urllib.request.Request(f"{base}/decisions", data=body, method="POST",
                                         headers={"Content-Type": ctype, "X-Review-Token": server.token})
            try:
                return urllib.request.urlopen(req).status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert post(json.dumps(doc).encode(), "text/plain") == 415
        assert post(b"{not json") == 400
        assert post(json.dumps({**doc, "bundle_sha256": "0" * 64}).encode()) == 409
        assert not (audited["out"] / "decisions.json").exists()
        assert post(json.dumps(doc).encode()) == 200
        assert json.loads((audited["out"] / "decisions.json").read_text())["decisions"] == doc["decisions"]
    finally:
        server.shutdown()
        server.server_close()
    # the report picks saved decisions up again
    from anomaly.deploy.review import build_report

    assert '"decisions":{' + json.dumps(r0["path"]) + ':"defect"}' in build_report(audited["out"]).read_text()


def test_review_is_torch_free(tmp_path: Path) -> None:
    code = "import sys, anomaly.deploy.review, anomaly.deploy.audit, anomaly.deploy.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-P", "-c", code], check=True, cwd=tmp_path)


def _page_data(page: Path) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="review-data">(.*?)</script>', page.read_text(), re.S).group(1))


def test_a_large_audit_lists_the_top_images_and_counts_all(audited: dict, tmp_path: Path, capsys, caplog) -> None:
    """``--max-rows``: the page lists the highest scores, every failure (up to the limit) and every
    decided image; the packed scores keep the counts exact for all images."""
    import base64

    import numpy as np

    from conftest import grow_audit
    from anomaly.deploy.review import ReviewError, build_report

    big = tmp_path / "big"
    records = grow_audit(audited["out"], big, copies=300)
    scored = [r for r in records if r["error"] is None]
    failed = [r for r in records if r["error"] is not None]
    ranked = sorted(scored, key=lambda r: -r["score"])
    low = ranked[-5]  # decided, far outside the top
    (big / "decisions.json").write_text(json.dumps({"bundle_sha256": audited["sha"], "decisions": [
        {"path": low["path"], "score": low["score"], "decision": "false_alarm"}]}))

    with caplog.at_level("WARNING", logger="anomaly.deploy.audit"):
        data = _page_data(build_report(big, max_rows=10))
    assert "skipped 1 incomplete line" in caplog.text  # the torn last line
    assert data["total"] == len(records) == 311 and data["n_errors"] == len(failed) == 3
    listed = [r["path"] for r in data["rows"]]
    assert listed == [r["path"] for r in ranked[:10]] + [low["path"]] + [r["path"] for r in failed]
    assert data["decisions"] == {low["path"]: "false_alarm"}
    # every score, sorted, exactly (float32 scores travel as float32)
    assert data["scores_dtype"] == "f4"
    packed = np.frombuffer(base64.b64decode(data["scores"]), dtype="<f4")
    assert packed.tolist() == sorted(r["score"] for r in scored)

    # a limit larger than the failures keeps them all; a small one keeps the first ones
    assert [r["path"] for r in _page_data(build_report(big, max_rows=2))["rows"]][-2:] == [r["path"] for r in failed[:2]]
    # 0 lists everything, in score order with failures last
    rows = _page_data(build_report(big, max_rows=0))["rows"]
    assert [r["path"] for r in rows] == [r["path"] for r in ranked] + [r["path"] for r in failed]

    # scores that float32 would round travel as float64
    lines = (big / "results.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    lines[0] = json.dumps({**first, "score": 0.1})
    (big / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    data = _page_data(build_report(big, max_rows=5))
    assert data["scores_dtype"] == "f8" and 0.1 in np.frombuffer(base64.b64decode(data["scores"]), dtype="<f8")

    with pytest.raises(ReviewError, match="max_rows must be >= 0"):
        build_report(big, max_rows=-1)
    assert main(["review", str(big), "--max-rows", "-1"]) == 2
    assert "max_rows must be >= 0" in capsys.readouterr().err
    assert main(["review", str(big), "--max-rows", "7"]) == 0
    assert len(_page_data(big / "report.html")["rows"]) == 7 + 1 + 3


def test_server_serves_only_the_listed_originals(audited: dict) -> None:
    from anomaly.deploy.review import serve_report

    server = serve_report(audited["out"], port=0, max_rows=2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    ranked = sorted(audited["records"], key=lambda r: -r["score"])
    try:
        assert urllib.request.urlopen(f"{base}/original/{ranked[0]['id']}").status == 200
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"{base}/original/{ranked[-1]['id']}")
        assert exc.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


# -- who may use the server --------------------------------------------------------------------
def _request(port: int, method: str, path: str, host: str | None, body: bytes | None = None,
             headers: dict | None = None) -> tuple[int, bytes]:
    """One request over a real loopback socket with exactly the ``Host`` header given (None: none)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def served(audited: dict):
    from anomaly.deploy.review import serve_report

    server = serve_report(audited["out"], port=0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _decisions_body(audited: dict) -> bytes:
    r0 = audited["records"][0]
    return json.dumps({"bundle_sha256": audited["sha"], "decisions": [
        {"path": r0["path"], "score": r0["score"], "decision": "defect"}]}).encode()


def test_server_answers_only_requests_that_name_it(audited: dict, served) -> None:
    """DNS rebinding: a hostile page whose name now resolves to 127.0.0.1 still sends its own name
    in Host; the server answers only its own names, on its own port."""
    port = served.server_address[1]
    oid = audited["records"][0]["id"]
    post = {"Content-Type": "application/json", "X-Review-Token": served.token}
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}"):
        assert _request(port, "GET", "/report.html", host)[0] == 200, host
    assert _request(port, "GET", f"/original/{oid}", f"localhost:{port}")[1] == Path(audited["records"][0]["path"]).read_bytes()
    for host in (f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", f"localhost.:{port}", "localhost",
                 f"127.0.0.1:{port + 1}", f"127.0.0.1:{port}@evil.example", "", None):
        assert _request(port, "GET", "/report.html", host)[0] == 421, host
        assert _request(port, "GET", f"/original/{oid}", host)[0] == 421, host
        assert _request(port, "GET", "/results.jsonl", host)[0] == 421, host
        assert _request(port, "POST", "/decisions", host, _decisions_body(audited), post)[0] == 421, host
    assert not (audited["out"] / "decisions.json").exists()
    assert _request(port, "POST", "/decisions", f"127.0.0.1:{port}", _decisions_body(audited), post)[0] == 200


def test_decisions_need_the_token_of_this_run(audited: dict, served, monkeypatch) -> None:
    import anomaly.deploy.review_server as review_server

    port = served.server_address[1]
    host = f"127.0.0.1:{port}"
    assert served.url == f"http://127.0.0.1:{port}/?token={served.token}" and len(served.token) >= 32
    status, page = _request(port, "GET", f"/?token={served.token}", host)  # the URL printed opens the page
    assert status == 200 and page == (audited["out"] / "report.html").read_bytes()
    compared = []
    real = review_server.hmac.compare_digest
    monkeypatch.setattr(review_server.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))

    wrong = served.token[:-1] + ("A" if served.token[-1] != "A" else "B")
    for headers in ({}, {"X-Review-Token": ""}, {"X-Review-Token": wrong}, {"X-Review-Token": served.token + "x"}):
        status, body = _request(port, "POST", "/decisions", host, _decisions_body(audited),
                                {"Content-Type": "application/json", **headers})
        assert status == 403 and "X-Review-Token" in json.loads(body)["error"], headers
    assert not (audited["out"] / "decisions.json").exists()
    status, body = _request(port, "POST", "/decisions", host, _decisions_body(audited),
                            {"Content-Type": "application/json", "X-Review-Token": served.token})
    assert status == 200 and json.loads(body)["n"] == 1 and (audited["out"] / "decisions.json").is_file()
    assert len(compared) == 5  # every token check went through the constant-time comparison

    from anomaly.deploy.review import serve_report

    other = serve_report(audited["out"], port=0, build=False)
    try:
        assert other.token != served.token  # a fresh secret per run
    finally:
        other.server_close()


def test_review_serve_prints_a_url_that_can_save(audited: dict) -> None:
    """``anomaly review --serve``: the printed URL opens the page and carries the token that saving needs."""
    import signal

    code = "import sys; from anomaly.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "review", str(audited["out"]), "--serve", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        url = re.search(r"serving (http://127\.0\.0\.1:(\d+)/\?token=([\w-]+)) ", lines[1]).group(1)
        port, token = int(re.search(r":(\d+)/", url).group(1)), url.rsplit("=", 1)[1]
        assert urllib.request.urlopen(url, timeout=10).read() == (audited["out"] / "report.html").read_bytes()
        status, _ = _request(port, "POST", "/decisions", f"127.0.0.1:{port}", _decisions_body(audited),
                             {"Content-Type": "application/json", "X-Review-Token": token})
        assert status == 200 and json.loads((audited["out"] / "decisions.json").read_text())["decisions"]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "stopped" in out, err
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_page_files_are_package_data() -> None:
    """The page's markup, style and script are real files of the package, inlined by the builder."""
    from importlib import resources

    from anomaly.deploy.review_report import DATA_OPEN, STATIC_FILES, static_text

    folder = resources.files("anomaly.deploy") / "review_static"
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == sorted(STATIC_FILES)
    page = static_text("review.html")
    assert DATA_OPEN + "__DATA__</script>" in page and "<style>__CSS__</style>" in page and "<script>__JS__</script>" in page
    assert "X-Review-Token" in static_text("review.js") and "thr-slider" in page


def test_a_title_that_looks_like_a_placeholder_stays_text(audited: dict) -> None:
    from anomaly.deploy.review import build_report, page_data

    report = build_report(audited["out"], title="__JS__ and __DATA__ <b>")
    text = report.read_text()
    assert "<title>__JS__ and __DATA__ &lt;b&gt;</title>" in text
    assert page_data(report)["title"] == "__JS__ and __DATA__ <b>"

"""report.html in a real browser: headless Chromium driven by Selenium.

Needs ``chromium`` + ``chromium-driver`` (Debian/Ubuntu apt packages) and ``selenium`` (pip);
skipped with the reason when any of them is missing.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from anomaly.cli import main

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "",
                             shutil.which("google-chrome") or "") if p and Path(p).is_file()), None)
CHROMEDRIVER = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver") or "") if p and Path(p).is_file()), None)
_missing = [name for name, ok in (("selenium (pip install selenium)", importlib.util.find_spec("selenium") is not None),
                                  ("chromium (apt install chromium)", CHROMIUM is not None),
                                  ("chromedriver (apt install chromium-driver)", CHROMEDRIVER is not None)) if not ok]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"browser test needs {', '.join(_missing)}")


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="anomaly-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1400,900"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def audit_out(trained_bundle: dict, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("browser") / "audit"
    assert main(["audit", str(trained_bundle["bundle"]), str(trained_bundle["data"] / "test"), "--out", str(out)]) == 0
    assert main(["review", str(out)]) == 0
    return out


def _wait(predicate, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the page")


def test_slider_decisions_and_download(driver, audit_out: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.get((audit_out / "report.html").as_uri())
    count = driver.find_element(By.ID, "flagged-count")
    initial = count.text
    assert " of 8 flagged" in initial
    assert len(driver.find_elements(By.CSS_SELECTOR, "#rows tbody tr.row")) == 8
    assert driver.execute_script("return [...document.images].filter(i => i.complete && i.naturalWidth == 0 && i.src).length") == 0

    # slider to the bottom: every scored image is flagged; to the top: none
    move = ("const s = document.getElementById('thr-slider'); s.value = arguments[0] === 'min' ? s.min : s.max;"
            "s.dispatchEvent(new Event('input', {bubbles: true}));")
    driver.execute_script(move, "min")
    assert count.text.startswith("8 of 8 flagged") and count.text != initial
    driver.execute_script(move, "max")
    assert count.text.startswith("0 of 8 flagged")
    driver.find_element(By.ID, "thr-reset").click()
    assert count.text == initial

    # filters
    driver.find_element(By.CSS_SELECTOR, "#filters button[data-filter='errors']").click()
    assert driver.find_elements(By.CSS_SELECTOR, "#rows tbody tr.row") == []
    driver.find_element(By.CSS_SELECTOR, "#filters button[data-filter='flagged']").click()
    flagged_rows = driver.find_elements(By.CSS_SELECTOR, "#rows tbody tr.row")
    assert len(flagged_rows) == int(initial.split()[0]) > 0

    # mark the top image a defect, the next a false alarm, and save
    driver.find_element(By.CSS_SELECTOR, "#rows tbody tr.row button[data-decision='defect']").click()
    second = driver.find_elements(By.CSS_SELECTOR, "#rows tbody tr.row")[1]
    second.find_element(By.CSS_SELECTOR, "button[data-decision='false_alarm']").click()
    assert "1 defect, 1 false alarm" in driver.find_element(By.ID, "decision-count").text
    driver.execute_script("window.anomalyReview.noDownload = true;")
    driver.find_element(By.ID, "save").click()
    assert driver.find_element(By.ID, "download").get_attribute("href").startswith("blob:")
    doc = json.loads(driver.execute_script("return window.anomalyReview.lastSaved"))
    rows = sorted((json.loads(line) for line in (audit_out / "results.jsonl").read_text().splitlines()),
                  key=lambda r: -r["score"])
    assert doc["bundle_sha256"] == json.loads((audit_out / "audit.json").read_text())["bundle_sha256"]
    assert {d["path"]: d["decision"] for d in doc["decisions"]} == {rows[0]["path"]: "defect", rows[1]["path"]: "false_alarm"}
    assert doc["decisions"][0]["score"] in (rows[0]["score"], rows[1]["score"])

    # the viewer: opacity and zoom act on the overlay
    driver.execute_script("const o = document.getElementById('opacity'); o.value = 0.3; o.dispatchEvent(new Event('input'));")
    assert driver.find_element(By.ID, "v-heat").value_of_css_property("opacity") == "0.3"
    driver.execute_script("const z = document.getElementById('zoom'); z.value = 2; z.dispatchEvent(new Event('input'));")
    assert driver.find_element(By.ID, "zoom-val").text == "2x"


def test_served_page_saves_decisions_json(driver, audit_out: Path) -> None:
    from selenium.webdriver.common.by import By

    from anomaly.deploy.review import serve_report

    (audit_out / "decisions.json").unlink(missing_ok=True)
    server = serve_report(audit_out, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # opened without the run's token (not the URL the command printed): the server refuses to save
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/report.html")
        driver.execute_script("localStorage.clear(); window.anomalyReview.noDownload = true;")
        driver.find_element(By.CSS_SELECTOR, "#rows tbody tr.row button[data-decision='defect']").click()
        driver.find_element(By.ID, "save").click()
        assert _wait(lambda: "server refused" in driver.find_element(By.ID, "save-status").text)
        assert "X-Review-Token" in driver.find_element(By.ID, "save-status").text
        assert not (audit_out / "decisions.json").exists()
        driver.execute_script("localStorage.clear();")  # the next page starts without that decision

        # the printed URL (with its token) saves
        assert server.url.startswith(f"http://127.0.0.1:{server.server_address[1]}/?token=")
        driver.get(server.url)
        driver.execute_script("localStorage.clear(); window.anomalyReview.noDownload = true;")
        top = driver.find_element(By.CSS_SELECTOR, "#rows tbody tr.row")
        top.find_element(By.CSS_SELECTOR, "button[data-decision='defect']").click()
        driver.find_element(By.ID, "save").click()
        _wait(lambda: (audit_out / "decisions.json").is_file())
        saved = json.loads((audit_out / "decisions.json").read_text())
        assert [d["decision"] for d in saved["decisions"]] == ["defect"]
        assert _wait(lambda: "saved 1 decision" in driver.find_element(By.ID, "save-status").text)
        # the viewer loads the original through the server
        assert _wait(lambda: driver.execute_script("const i = document.getElementById('v-orig'); return i.complete && i.naturalWidth"))
    finally:
        server.shutdown()
        server.server_close()


def test_rows_without_heatmap_show_the_original(driver, trained_bundle: dict, tmp_path: Path) -> None:
    """Under ``--heatmaps flagged`` a passed small PNG has neither heatmap nor thumbnail: its row and
    the viewer show the original file."""
    from selenium.webdriver.common.by import By

    out = tmp_path / "audit"
    assert main(["audit", str(trained_bundle["bundle"]), str(trained_bundle["data"] / "test"), "--out", str(out),
                 "--heatmaps", "flagged"]) == 0
    assert main(["review", str(out)]) == 0
    passed = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    passed = [r for r in passed if r["label"] == 0]
    assert passed and all(r["heatmap"] is None and r["thumbnail"] is None for r in passed)
    driver.get((out / "report.html").as_uri())
    rows = driver.find_elements(By.CSS_SELECTOR, "#rows tbody tr.row")
    assert len(rows) == 8
    _wait(lambda: driver.execute_script("return [...document.querySelectorAll('#rows img.thumb')].every(i => i.complete)"))
    widths = driver.execute_script("return [...document.querySelectorAll('#rows tbody tr.row')].map("
                                   "r => { const i = r.querySelector('img.thumb'); return i ? i.naturalWidth : 0; })")
    assert len(widths) == 8 and min(widths) > 0  # every row has a picture, passed ones their original


def test_a_page_listing_part_of_a_large_audit_counts_every_image(driver, audit_out: Path, tmp_path: Path) -> None:
    """``--max-rows 20`` on 311 images: the list holds the top 20, failures and the decided one; the
    flagged count, the filters and the slider count all of them."""
    from selenium.webdriver.common.by import By

    from conftest import grow_audit

    big = tmp_path / "big"
    records = grow_audit(audit_out, big, copies=300)
    scored = sorted((r for r in records if r["error"] is None), key=lambda r: -r["score"])
    threshold = json.loads((big / "audit.json").read_text())["calibration"]["threshold"]
    assert main(["review", str(big), "--max-rows", "20"]) == 0
    driver.get((big / "report.html").as_uri())
    assert driver.execute_script("return document.getElementById('listed-note').hidden") is False
    assert "lists 23 of the 311 images" in driver.find_element(By.ID, "listed-note").text
    count = driver.find_element(By.ID, "flagged-count")
    n_flag = sum(r["score"] > threshold for r in scored)
    assert count.text.startswith(f"{n_flag} of {len(scored)} flagged")

    def filter_counts() -> dict:
        return {b.get_attribute("data-filter"): int(b.find_element(By.TAG_NAME, "span").text)
                for b in driver.find_elements(By.CSS_SELECTOR, "#filters button")}

    counts = filter_counts()
    assert counts["all"] == 311 and counts["errors"] == 3 and counts["flagged"] == n_flag
    assert counts["passed"] == len(scored) - n_flag
    # a threshold between two scores far below the listed ones still counts exactly
    mid = (scored[150]["score"] + scored[151]["score"]) / 2
    driver.execute_script("window.anomalyReview.setThreshold(arguments[0])", mid)
    assert count.text.startswith(f"151 of {len(scored)} flagged")
    assert filter_counts()["passed"] == len(scored) - 151
    assert len(driver.find_elements(By.CSS_SELECTOR, "#rows tbody tr.row")) == 23  # 'all': every listed row

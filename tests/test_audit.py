"""`anomaly audit`: inputs (folders, globs, list files), journaled outputs, resume, bad files, exit codes."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomaly.cli import main
from anomaly.deploy.audit import expand_inputs, iter_journal, load_journal, output_id


def _audit(bundle: Path, *args: str) -> int:
    return main(["audit", str(bundle), *args])


def _journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _csv(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _test_images(data: Path) -> list[Path]:
    return sorted((data / "test").rglob("*.png"))


def test_outputs_at_original_resolution_and_summary(trained_bundle: dict, tmp_path: Path, capsys) -> None:
    src = _test_images(trained_bundle["data"])
    inputs = tmp_path / "in"
    inputs.mkdir()
    # non-square inputs of different sizes and colour modes: outputs must follow each input's (H, W)
    sizes = {"wide.png": (40, 72), "tall.png": (90, 50)}
    for (name, (h, w)), p in zip(sizes.items(), src[-2:]):
        img = cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (w, h))
        cv2.imwrite(str(inputs / name), cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if name == "wide.png" else img)
    out = tmp_path / "out"
    assert _audit(trained_bundle["bundle"], str(inputs), "--out", str(out), "--masks", "--save-maps",
                  "--reconstructions") == 0
    printed = capsys.readouterr()
    assert "2 images" in printed.out and "images/s" in printed.err  # progress with rate on stderr

    recs = {Path(r["path"]).name: r for r in _journal(out)}
    assert set(recs) == set(sizes)
    for name, (h, w) in sizes.items():
        r = recs[name]
        assert r["error"] is None and (r["width"], r["height"]) == (w, h)
        assert cv2.imread(str(out / r["heatmap"])).shape[:2] == (h, w)
        mask = cv2.imread(str(out / r["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        assert (out / r["mask"]).read_bytes()[24] == 1  # the IHDR's bit depth: a 1-bit PNG
        amap = np.load(out / r["map"])
        assert amap.shape == (32, 32) and amap.dtype == np.float32
        assert cv2.imread(str(out / r["reconstruction"])).shape[:2] == (32, 32)
        assert r["thumbnail"] is None  # a small PNG: the review page shows its heatmap and the file itself
        for reg in r["regions"]:
            assert 0 <= reg["x"] < w and 0 <= reg["y"] < h and reg["area"] > 0 and "peak" in reg

    rows = _csv(out)
    assert [r["path"] for r in rows] == [r["path"] for r in _journal(out)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 2 and summary["failed"] == 0
    assert summary["flagged"] + summary["passed"] + summary["uncalibrated"] == 2
    assert summary["score_histogram"]["counts"] and sum(summary["score_histogram"]["counts"]) == 2
    assert summary["seconds"] > 0 and summary["images_per_second"] > 0
    audit = json.loads((out / "audit.json").read_text())
    meta = json.loads((Path(trained_bundle["bundle"]) / "model.json").read_text())
    assert audit["bundle_sha256"] == meta["onnx"]["sha256"]


def test_heatmap_files_are_the_overlay_in_rgb_and_opencv_runs_single_threaded(trained_bundle: dict, tmp_path: Path,
                                                                               monkeypatch) -> None:
    import anomaly.deploy.audit as audit
    import anomaly.deploy.render as render
    from anomaly.data.io import read_image
    from anomaly.deploy.runtime import Runtime

    inputs = tmp_path / "in"
    inputs.mkdir()
    colour = np.zeros((60, 80, 3), np.uint8)
    colour[..., 2] = 220  # red in OpenCV's BGR order: a channel swap would turn the heatmap's base blue
    colour[:, 40:, 1] = 90
    cv2.imwrite(str(inputs / "colour.png"), colour)
    seen: list[int] = []
    real_write = render.write_image

    def spy(*args, **kwargs):  # OpenCV's thread count while the audit's files are made
        seen.append(cv2.getNumThreads())
        return real_write(*args, **kwargs)

    monkeypatch.setattr(render, "write_image", spy)
    before = max(2, cv2.getNumThreads())
    cv2.setNumThreads(before)
    try:
        out = tmp_path / "out"
        assert _audit(trained_bundle["bundle"], str(inputs), "--out", str(out), "--save-maps") == 0
        assert seen and set(seen) == {1}
        assert cv2.getNumThreads() == before  # restored afterwards: the process's setting is not ours to keep
    finally:
        cv2.setNumThreads(-1)
    rec = _journal(out)[0]
    written = cv2.imread(str(out / rec["heatmap"]))[..., ::-1].astype(int)  # file (BGR) -> RGB
    rt = Runtime(trained_bundle["bundle"], device="cpu")
    expected = audit.heatmap_overlay(read_image(inputs / "colour.png", raw=True), np.load(out / rec["map"]),
                                     2.0 * (rt.pixel_threshold or 1.0)).astype(int)
    assert np.abs(written - expected).mean() < 3.0  # JPEG quality 85
    assert np.abs(written - expected[..., ::-1]).mean() > 10.0  # and not channel-swapped


def test_thumbnails_only_where_they_spare_the_review_page_something(trained_bundle: dict, tmp_path: Path) -> None:
    img = cv2.imread(str(_test_images(trained_bundle["data"])[0]), cv2.IMREAD_GRAYSCALE)
    inputs = tmp_path / "in"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "small.png"), cv2.resize(img, (100, 80)))
    cv2.imwrite(str(inputs / "large.png"), cv2.resize(img, (300, 200)))  # longest side > 2 x 64
    cv2.imwrite(str(inputs / "small.tif"), cv2.resize(img, (100, 80)))  # browsers cannot show TIFF
    out = tmp_path / "out"
    assert _audit(trained_bundle["bundle"], str(inputs), "--out", str(out), "--thumbnail-size", "64") == 0
    thumbs = {Path(r["path"]).name: r["thumbnail"] for r in _journal(out)}
    assert thumbs["small.png"] is None
    for name in ("large.png", "small.tif"):
        t = cv2.imread(str(out / thumbs[name]))
        assert t.shape[:2] == ((43, 64) if name == "large.png" else (51, 64))
    # without heatmaps the thumbnail is the page's only picture: always written
    out2 = tmp_path / "out2"
    assert _audit(trained_bundle["bundle"], str(inputs / "small.png"), "--out", str(out2), "--no-heatmaps",
                  "--thumbnail-size", "64") == 0
    (rec,) = _journal(out2)
    assert rec["heatmap"] is None and cv2.imread(str(out2 / rec["thumbnail"])).shape[:2] == (51, 64)


def test_heatmaps_of_large_inputs_are_shrunk_and_regions_stay_in_original_pixels(trained_bundle: dict,
                                                                                   tmp_path: Path) -> None:
    """--heatmap-size caps the heatmap's longest side (aspect kept), 0 keeps the input's size; the
    regions and sizes in the journal are the same either way, in original pixels, and without
    --masks they are the runtime's own (ImageResult.regions)."""
    from anomaly.deploy.runtime import Runtime

    src = _test_images(trained_bundle["data"])
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in src:  # 48 px test images blown up to a camera-like 400 x 300
        cv2.imwrite(str(inputs / f"{p.parent.name}_{p.name}"),
                    cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (400, 300)))
    capped, full = tmp_path / "capped", tmp_path / "full"
    assert _audit(trained_bundle["bundle"], str(inputs), "--out", str(capped), "--heatmap-size", "160",
                  "--thumbnail-size", "64") == 0
    assert _audit(trained_bundle["bundle"], str(inputs), "--out", str(full), "--heatmap-size", "0", "--masks") == 0
    a, b = _journal(capped), _journal(full)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert json.loads((capped / "audit.json").read_text())["options"]["heatmap_size"] == 160
    expected = {r.path: [{**g.to_dict(), "peak": round(g.peak, 6), "mean": round(g.mean, 6)} for g in r.regions]
                for r in Runtime(trained_bundle["bundle"], device="cpu").score_paths([r["path"] for r in a])}
    assert any(expected.values())
    for ra, rb in zip(a, b):
        assert cv2.imread(str(capped / ra["heatmap"])).shape[:2] == (120, 160)
        assert cv2.imread(str(full / rb["heatmap"])).shape[:2] == (300, 400)
        assert cv2.imread(str(capped / ra["thumbnail"])).shape[:2] == (48, 64)
        assert (ra["width"], ra["height"]) == (rb["width"], rb["height"]) == (400, 300)
        assert ra["regions"] == rb["regions"] == expected[ra["path"]]
    assert _audit(trained_bundle["bundle"], str(inputs), "--out", str(tmp_path / "bad"), "--heatmap-size", "-1") == 2
    assert not (tmp_path / "bad" / "results.jsonl").exists()


def test_the_runtime_keeps_only_the_image_size_the_outputs_need(trained_bundle: dict, tmp_path: Path,
                                                                 monkeypatch) -> None:
    from anomaly.deploy.runtime import Runtime

    asked = []
    original = Runtime.score_paths

    def spy(self, paths, batch_size=16, keep_reconstruction=False, keep_image=False):
        asked.append(keep_image)
        return original(self, paths, batch_size, keep_reconstruction, keep_image)

    monkeypatch.setattr(Runtime, "score_paths", spy)
    one = str(_test_images(trained_bundle["data"])[0])
    for i, args in enumerate((["--thumbnail-size", "64"], ["--heatmap-size", "0"], ["--heatmap-size", "100"],
                              ["--no-heatmaps"], ["--no-heatmaps", "--thumbnail-size", "0"])):
        assert _audit(trained_bundle["bundle"], one, "--out", str(tmp_path / str(i)), *args) == 0
    assert asked == [1024, True, 256, 256, False]


def test_heatmaps_only_for_flagged_images(trained_bundle: dict, tmp_path: Path, caplog) -> None:
    """``--heatmaps flagged`` writes overlays for flagged images alone (no file for a passed one, and no
    thumbnail in its place: the review page shows a small browser image itself); with no threshold
    nothing can be flagged, so every image gets one."""
    bundle, test = trained_bundle["bundle"], trained_bundle["data"] / "test"
    out = tmp_path / "out"
    assert _audit(bundle, str(test), "--out", str(out), "--heatmaps", "flagged") == 0
    recs = _journal(out)
    flagged = {r["id"] for r in recs if r["label"] == 1}
    assert 0 < len(flagged) < len(recs)  # the blobs are flagged, the good tiles pass
    assert {r["id"] for r in recs if r["heatmap"]} == flagged
    assert {p.stem for p in (out / "heatmaps").glob("*.jpg")} == flagged
    assert all(r["thumbnail"] is None for r in recs)
    assert {r["id"]: r["heatmap"] for r in _csv(out) if r["heatmap"]} == {i: f"heatmaps/{i}.jpg" for i in flagged}
    assert json.loads((out / "audit.json").read_text())["options"]["heatmaps"] == "flagged"
    assert json.loads((out / "summary.json").read_text())["heatmaps"] == str(out / "heatmaps")
    # the page falls back to the original where an image has neither thumbnail nor heatmap
    from anomaly.deploy.review import build_report

    assert "r.thumb || r.heatmap || originalSrc(r)" in build_report(out).read_text()

    uncalibrated = tmp_path / "uncalibrated"
    shutil.copytree(bundle, uncalibrated)
    meta = json.loads((uncalibrated / "model.json").read_text())
    meta["calibration"].pop("image")
    (uncalibrated / "model.json").write_text(json.dumps(meta))
    out2 = tmp_path / "out2"
    with caplog.at_level("WARNING", logger="anomaly.deploy.audit"):
        assert _audit(uncalibrated, str(test), "--out", str(out2), "--heatmaps", "flagged") == 0
    assert "every image gets a heatmap" in caplog.text
    assert all(r["label"] == -1 and r["heatmap"] for r in _journal(out2))

    # a bare --heatmaps is the default, every image; a bad mode is refused before anything is written
    out3 = tmp_path / "out3"
    assert _audit(bundle, str(test / "good"), "--out", str(out3), "--heatmaps") == 0
    assert all(r["heatmap"] for r in _journal(out3))
    with pytest.raises(SystemExit) as exc:
        _audit(bundle, str(test), "--out", str(tmp_path / "out4"), "--heatmaps", "some")
    assert exc.value.code == 2 and not (tmp_path / "out4").exists()
    from anomaly.deploy.audit import AuditError, run_audit

    with pytest.raises(AuditError, match="heatmaps must be one of all, flagged, none, got 'some'"):
        run_audit(bundle, [str(test)], tmp_path / "out5", heatmaps="some")
    assert not (tmp_path / "out5").exists()


def test_same_file_names_get_distinct_outputs(trained_bundle: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _audit(trained_bundle["bundle"], str(trained_bundle["data"] / "test"), "--out", str(out)) == 0
    recs = _journal(out)
    assert len(recs) == 8 and len({Path(r["path"]).name for r in recs}) == 4  # good/000.png and blob/000.png ...
    assert len({r["id"] for r in recs}) == 8 and len(list((out / "heatmaps").glob("*.jpg"))) == 8
    assert all(r["id"] == output_id(r["path"]) for r in recs)  # stable: derived from the path only


def test_resume_after_a_kill_loses_and_duplicates_nothing(trained_bundle: dict, tmp_path: Path) -> None:
    bundle, test = trained_bundle["bundle"], trained_bundle["data"] / "test"
    out = tmp_path / "out"
    assert _audit(bundle, str(test), "--out", str(out), "--no-heatmaps") == 0
    full = {r["path"]: r["score"] for r in _journal(out)}
    # simulate a kill in the middle of writing the 4th line
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    assert len(load_journal(out / "results.jsonl")) == 3
    csv_text = (out / "results.csv").read_text()  # the CSV is appended to: it can be torn as well
    (out / "results.csv").write_text(csv_text[: len(csv_text) * 2 // 3])

    assert _audit(bundle, str(test), "--out", str(out), "--no-heatmaps") == 0
    recs = _journal(out)
    assert len(recs) == 8 and {r["path"] for r in recs} == set(full)
    assert all(r["score"] == pytest.approx(full[r["path"]]) for r in recs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == 3 and summary["new"] == 5 and summary["images"] == 8
    assert [r["path"] for r in _csv(out)] == [r["path"] for r in recs]  # rebuilt, in journal order

    # a garbled line in the middle (a disk error, a hand edit): dropped from the journal, that
    # image scored again, appending goes on from a clean line
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    lost = json.loads(lines[2])["path"]
    (out / "results.jsonl").write_text("".join(lines[:2]) + "{garbled\n" + "".join(lines[3:]))
    bad: list[int] = []
    assert [r["path"] for r in iter_journal(out / "results.jsonl", bad)] == [r["path"] for r in recs if r["path"] != lost]
    assert bad == [3]
    assert _audit(bundle, str(test), "--out", str(out), "--no-heatmaps") == 0
    recs = _journal(out)  # every line parses
    assert sorted(r["path"] for r in recs) == sorted(full) and recs[-1]["path"] == lost
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == 7 and summary["new"] == 1 and summary["images"] == 8
    assert [r["path"] for r in _csv(out)] == [r["path"] for r in recs]

    # a run on a subset, then on everything: only the rest is scored
    out2 = tmp_path / "out2"
    assert _audit(bundle, str(test / "good"), "--out", str(out2), "--no-heatmaps") == 0
    assert _audit(bundle, str(test), "--out", str(out2), "--no-heatmaps") == 0
    assert len(_journal(out2)) == 8 and json.loads((out2 / "summary.json").read_text())["skipped"] == 4


def test_force_no_resume_and_other_bundle(trained_bundle: dict, tmp_path: Path, capsys) -> None:
    bundle, good = trained_bundle["bundle"], trained_bundle["data"] / "test" / "good"
    out = tmp_path / "out"
    assert _audit(bundle, str(good), "--out", str(out)) == 0
    assert _audit(bundle, str(good), "--out", str(out), "--no-resume") == 2
    assert "--force" in capsys.readouterr().err

    # same model, recalibrated: labels would mix two thresholds
    other = tmp_path / "bundle2"
    shutil.copytree(bundle, other)
    meta = json.loads((other / "model.json").read_text())
    meta["calibration"]["image"]["threshold"] += 1.0
    (other / "model.json").write_text(json.dumps(meta))
    assert _audit(other, str(good), "--out", str(out)) == 2
    assert "different calibration" in capsys.readouterr().err
    # another model
    audit = json.loads((out / "audit.json").read_text())
    (out / "audit.json").write_text(json.dumps({**audit, "bundle_sha256": "0" * 64}))
    assert _audit(bundle, str(good), "--out", str(out)) == 2
    assert "another model" in capsys.readouterr().err

    assert _audit(other, str(good), "--out", str(out), "--force") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["new"] == 4 and summary["skipped"] == 0 and summary["images"] == 4
    assert json.loads((out / "audit.json").read_text())["calibration"]["threshold"] == meta["calibration"]["image"]["threshold"]


def test_a_wrong_bundle_is_reported_before_the_inputs_are_read(tmp_path: Path, capsys, monkeypatch) -> None:
    """A mistyped bundle path is the error, even when the inputs are missing too, and the inputs
    (a million-line list on a real line) are not expanded first."""
    import anomaly.deploy.audit as audit

    expanded = []
    monkeypatch.setattr(audit, "iter_inputs", lambda inputs: expanded.append(inputs) or iter(()))
    assert main(["audit", str(tmp_path / "no_bundle"), str(tmp_path / "no_images"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no_bundle" in err and "no_images" not in err
    assert expanded == []


def test_globs_and_list_files(trained_bundle: dict, tmp_path: Path) -> None:
    data = trained_bundle["data"]
    found = expand_inputs([str(data / "test" / "*" / "00[01].png")])
    assert len(found) == 4 and all(p.is_absolute() for p in found)
    lst = data / "todo.txt"
    lst.write_text("# parts to check\n\ntest/good/000.png\n  test/blob/001.png  \n/nonexistent/part.png\ntest/good/000.png\n")
    out = tmp_path / "out"
    assert _audit(trained_bundle["bundle"], str(lst), str(data / "test" / "good" / "00[23].png"), "--out", str(out)) == 0
    recs = {r["path"]: r for r in _journal(out)}
    assert len(recs) == 5  # duplicates removed
    assert recs[str(data / "test" / "blob" / "001.png")]["error"] is None
    assert "no such file" in recs["/nonexistent/part.png"]["error"]
    with pytest.raises(FileNotFoundError, match="matched nothing"):
        expand_inputs([str(data / "*.nothing")])


def test_bad_files_are_error_rows(trained_bundle: dict, tmp_path: Path, capsys) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = sorted((trained_bundle["data"] / "test" / "good").glob("*.png"))[0].read_bytes()
    (inputs / "ok.png").write_bytes(good)
    (inputs / "zero.png").write_bytes(b"")
    (inputs / "text.jpg").write_text("not an image")
    (inputs / "truncated.png").write_bytes(good[: len(good) // 3])
    out = tmp_path / "out"
    assert _audit(trained_bundle["bundle"], str(inputs), "--out", str(out)) == 0
    captured = capsys.readouterr()
    rows = {Path(r["path"]).name: r for r in _csv(out)}
    assert set(rows) == {"ok.png", "zero.png", "text.jpg", "truncated.png"}
    assert rows["ok.png"]["error"] == "" and rows["ok.png"]["score"] != ""
    for name in ("zero.png", "text.jpg", "truncated.png"):
        assert rows[name]["error"] and rows[name]["score"] == "", name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 3 and summary["images"] == 4
    assert "3 failed" in captured.out and "could not be scored" in captured.err
    assert len(list((out / "heatmaps").glob("*.jpg"))) == 1


def test_fail_on_anomaly_exit_code(trained_bundle: dict, tmp_path: Path) -> None:
    bundle, data = trained_bundle["bundle"], trained_bundle["data"]
    out = tmp_path / "out"
    assert _audit(bundle, str(data / "test"), "--out", str(out), "--no-heatmaps") == 0
    flagged = json.loads((out / "summary.json").read_text())["flagged"]
    assert flagged > 0  # the blob images are far above the threshold
    assert _audit(bundle, str(data / "test"), "--out", str(out), "--no-heatmaps", "--fail-on-anomaly") == 1
    passed = [Path(r["path"]) for r in _journal(out) if r["label"] == 0]
    lst = tmp_path / "passed.lst"
    lst.write_text("\n".join(map(str, passed)))
    assert _audit(bundle, str(lst), "--out", str(tmp_path / "o2"), "--fail-on-anomaly") == 0


def test_usage_errors_exit_2(trained_bundle: dict, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _audit(trained_bundle["bundle"], str(empty), "--out", str(tmp_path / "o")) == 2
    assert "no images found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _audit(trained_bundle["bundle"], str(empty))  # --out missing: argparse
    assert exc.value.code == 2


def test_thread_options_reach_the_runtime_and_bad_counts_exit_2(trained_bundle: dict, tmp_path: Path, capsys,
                                                                  monkeypatch) -> None:
    """``--decode-workers`` and ``--threads`` set the runtime's decoders and onnxruntime's intra-op
    threads (sequential decoding with 0 decoders gives the same results); negative or zero counts
    are usage errors."""
    import anomaly.deploy.audit
    from anomaly.deploy.runtime import Runtime

    seen: list[tuple[int, int]] = []

    class Spy(Runtime):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append((self.decode_workers, self.session_options.intra_op_num_threads))

    monkeypatch.setattr(anomaly.deploy.audit, "Runtime", Spy)
    images = str(trained_bundle["data"] / "test")
    assert _audit(trained_bundle["bundle"], images, "--out", str(tmp_path / "a"), "--decode-workers", "0",
                  "--threads", "1") == 0
    assert _audit(trained_bundle["bundle"], images, "--out", str(tmp_path / "b")) == 0
    assert seen[0] == (0, 1) and seen[1][0] >= 1
    rows = [(tmp_path / d / "results.csv").read_text().splitlines() for d in "ab"]
    assert rows[0] == rows[1]
    capsys.readouterr()
    for flag, value in (("--decode-workers", "-1"), ("--threads", "0"), ("--workers", "0")):
        assert _audit(trained_bundle["bundle"], images, "--out", str(tmp_path / "c"), flag, value) == 2
        assert "must be >=" in capsys.readouterr().err


def test_a_file_name_that_is_not_utf8_is_scored_and_named_as_on_disk(trained_bundle: dict, tmp_path: Path) -> None:
    """Linux allows any bytes in a name; results.csv keeps them, results.jsonl escapes them, and
    the audit neither crashes nor loses the row."""
    import os

    from anomaly.deploy.audit import run_audit

    src = tmp_path / "in"
    src.mkdir()
    good = next((trained_bundle["data"] / "test" / "good").iterdir())
    shutil.copy(good, src / "plain.png")
    odd = os.fsencode(src) + b"/caf\xe9.png"  # Latin-1 e-acute: not UTF-8
    shutil.copy(good, odd)
    out = tmp_path / "audit"
    run_audit(trained_bundle["bundle"], [src], out, heatmaps="none")
    rows = load_journal(out / "results.jsonl")
    assert len(rows) == 2 and all(r.get("error") is None for r in rows)
    assert os.fsdecode(odd) in {r["path"] for r in rows}
    raw = (out / "results.csv").read_bytes()
    assert b"caf\xe9.png" in raw and raw.count(b"\n") == 3  # header + 2 rows

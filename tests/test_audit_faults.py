"""The audit on a bad day: --force in a user's folder, power cuts, two audits at once, resuming with
other options, inputs that look like images and are not."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from anomaly.cli import main


def _audit(bundle: Path, *args: str) -> int:
    return main(["audit", str(bundle), *args])


def _journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _good(trained_bundle: dict) -> Path:
    return trained_bundle["data"] / "test" / "good"


class _FsyncSpy:
    """Records the path of every fd passed to ``os.fsync`` (any thread), in call order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        self._lock = threading.Lock()
        real = os.fsync

        def spy(fd: int) -> None:
            with self._lock:
                self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)

        monkeypatch.setattr(os, "fsync", spy)


def test_force_refuses_a_folder_that_is_not_an_audit(trained_bundle: dict, tmp_path: Path, capsys) -> None:
    """``--force --out .`` in a user's project must not wipe its own ``masks/``: only an audit folder
    (this tool's audit.json) or an empty / new one is cleared."""
    bundle, good = trained_bundle["bundle"], str(_good(trained_bundle))
    project = tmp_path / "project"
    (project / "masks").mkdir(parents=True)
    (project / "masks" / "mine.png").write_bytes(b"the user's own mask")
    (project / "notes.txt").write_text("keep me")
    assert _audit(bundle, good, "--out", str(project), "--force") == 2
    err = capsys.readouterr().err
    assert "not an audit folder" in err and str(project) in err and "masks" in err
    assert (project / "masks" / "mine.png").read_bytes() == b"the user's own mask"
    assert sorted(p.name for p in project.iterdir()) == ["masks", "notes.txt"]  # nothing added either
    (project / "audit.json").write_text('{"made by": "another tool"}')  # an audit.json that is not ours
    assert _audit(bundle, good, "--out", str(project), "--force") == 2
    assert (project / "masks" / "mine.png").exists()

    empty, new = tmp_path / "empty", tmp_path / "new"
    empty.mkdir()
    assert _audit(bundle, good, "--out", str(empty), "--force") == 0
    assert _audit(bundle, good, "--out", str(new), "--force") == 0
    (empty / "masks").mkdir()
    (empty / "masks" / "stale.png").write_bytes(b"from an earlier audit")
    assert _audit(bundle, good, "--out", str(empty), "--force") == 0  # an audit folder now: cleared
    assert not (empty / "masks").exists() and len(_journal(empty)) == 4


def test_atomic_writes_fsync_the_file_and_its_folder(tmp_path: Path, monkeypatch) -> None:
    from anomaly.data.io import atomic_write, atomic_write_bytes, atomic_write_text

    spy = _FsyncSpy(monkeypatch)
    atomic_write_text(tmp_path / "model.json", '{"a": 1}\n')
    assert len(spy.paths) == 2
    assert Path(spy.paths[0]).parent == tmp_path and Path(spy.paths[0]).name.startswith(".model.json.")  # the data
    assert spy.paths[1] == str(tmp_path)  # the rename
    atomic_write_bytes(tmp_path / "blob.bin", b"\x00\x01")
    assert (tmp_path / "model.json").read_text() == '{"a": 1}\n' and (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert len(spy.paths) == 4
    with pytest.raises(RuntimeError):  # a failed write leaves the old file and no temporary file
        with atomic_write(tmp_path / "model.json") as fh:
            fh.write("half")
            raise RuntimeError("disk full")
    assert (tmp_path / "model.json").read_text() == '{"a": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "model.json"]


def test_the_audit_makes_each_batch_durable_files_before_their_journal_lines(trained_bundle: dict, tmp_path: Path,
                                                                             monkeypatch) -> None:
    """Every image file is fsynced before the journal commit that names it; the journal is fsynced
    once per batch (not per line); audit.json, results.csv and summary.json are fsynced too."""
    from anomaly.deploy.audit import run_audit

    spy = _FsyncSpy(monkeypatch)
    out = tmp_path / "out"
    batch = 3
    run_audit(trained_bundle["bundle"], [str(trained_bundle["data"] / "test")], out, batch_size=batch, masks=True,
              device="cpu")
    recs = _journal(out)
    journal = str(out / "results.jsonl")
    commits = [i for i, p in enumerate(spy.paths) if p == journal]
    assert len(commits) == math.ceil(len(recs) / batch) == 3
    for k, at in enumerate(commits):
        for rec in recs[k * batch:(k + 1) * batch]:
            for key in ("heatmap", "mask"):
                assert spy.paths.index(str(out / rec[key])) < at, (rec[key], k)
    synced = {Path(p).name for p in spy.paths if Path(p).parent == out}
    for name in ("audit.json", "summary.json", "results.csv"):  # temporary files renamed over them
        assert any(s.startswith(f".{name}.") for s in synced), name
    assert str(out) in spy.paths and "results.csv" in synced  # the folder; the appended CSV at the end

    spy.paths.clear()
    run_audit(trained_bundle["bundle"], [str(trained_bundle["data"] / "test")], tmp_path / "fast", fsync=False,
              device="cpu")
    assert not [p for p in spy.paths if "/heatmaps/" in p or p.endswith("results.jsonl")]


def test_a_second_audit_on_the_same_folder_is_refused_until_the_first_ends(trained_bundle: dict, tmp_path: Path,
                                                                          capsys) -> None:
    """An exclusive lock on the folder: the second run is refused with the folder and the holder's
    pid; a holder killed with SIGKILL releases it (the OS drops flock locks with the process)."""
    bundle, good = trained_bundle["bundle"], str(_good(trained_bundle))
    out = tmp_path / "out"
    out.mkdir()
    code = ("import sys\nfrom anomaly.deploy.audit import audit_lock\n"
            "with audit_lock(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _audit(bundle, good, "--out", str(out)) == 2
        err = capsys.readouterr().err
        assert f"{out} is being audited by another run (pid {holder.pid}" in err
        assert not (out / "results.jsonl").exists()
        holder.kill()  # SIGKILL: no cleanup code runs
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)
    assert _audit(bundle, good, "--out", str(out)) == 0
    assert len(_journal(out)) == 4


def test_resuming_with_other_output_options_is_refused(trained_bundle: dict, tmp_path: Path, capsys) -> None:
    bundle, good = trained_bundle["bundle"], str(_good(trained_bundle))
    out = tmp_path / "out"
    assert _audit(bundle, good, "--out", str(out), "--masks", "--heatmap-size", "100") == 0
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:2]))  # two images left to do
    before = (out / "results.jsonl").read_bytes()
    capsys.readouterr()
    assert _audit(bundle, good, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "--masks was True, now False" in err and "--heatmap-size was 100, now 1024" in err
    assert "options (--heatmap-size 100, --masks) to resume" in err and "--force" in err  # how to go on
    assert (out / "results.jsonl").read_bytes() == before  # nothing mixed in
    assert _audit(bundle, good, "--out", str(out), "--masks", "--heatmap-size", "100") == 0
    recs = _journal(out)
    assert len(recs) == 4 and all(r["mask"] for r in recs)
    assert _audit(bundle, good, "--out", str(out), "--force") == 0  # or start over with the new options
    assert json.loads((out / "audit.json").read_text())["options"]["masks"] is False
    assert all(r["mask"] is None for r in _journal(out))


def test_entries_that_are_not_images_are_error_rows(trained_bundle: dict, tmp_path: Path, monkeypatch) -> None:
    """A dangling link and a folder named like an image (silently skipped by a plain listing), a
    file that vanishes between the listing and its reading, and one that cannot be opened each
    get a row saying why. Tests run as root, which reads a chmod 000 file anyway, so the
    permission case makes the read itself raise PermissionError."""
    import anomaly.data.io as io
    import anomaly.deploy.audit as audit

    good = sorted(_good(trained_bundle).glob("*.png"))[0].read_bytes()
    inputs = tmp_path / "in"
    (inputs / "folder.png").mkdir(parents=True)
    (inputs / "folder.png" / "inside.png").write_bytes(good)
    for name in ("ok.png", "vanishes.png", "locked.png"):
        (inputs / name).write_bytes(good)
    (inputs / "dangling.png").symlink_to(tmp_path / "moved_away.png")

    listing = audit.iter_inputs

    def listed_then_gone(items):
        paths = list(listing(items))
        (inputs / "vanishes.png").unlink()  # another process moved it after the listing
        return iter(paths)

    real_fromfile = np.fromfile

    def no_permission(file, *args, **kwargs):
        if str(file).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_fromfile(file, *args, **kwargs)

    monkeypatch.setattr(audit, "iter_inputs", listed_then_gone)
    monkeypatch.setattr(io.np, "fromfile", no_permission)
    out = tmp_path / "out"
    assert _audit(trained_bundle["bundle"], str(inputs), "--out", str(out)) == 0
    rows = {str(Path(r["path"]).relative_to(inputs)): r for r in _journal(out)}
    assert set(rows) == {"dangling.png", "folder.png", "folder.png/inside.png", "locked.png", "ok.png", "vanishes.png"}
    assert rows["ok.png"]["error"] is None and rows["folder.png/inside.png"]["error"] is None
    assert "a symbolic link to" in rows["dangling.png"]["error"] and "does not exist" in rows["dangling.png"]["error"]
    assert "is a folder, not an image file" in rows["folder.png"]["error"]
    assert "no such file" in rows["vanishes.png"]["error"]
    assert "Permission denied" in rows["locked.png"]["error"]
    assert all(rows[n]["score"] is None for n in ("dangling.png", "folder.png", "vanishes.png", "locked.png"))
    assert json.loads((out / "summary.json").read_text())["failed"] == 4

    # named directly, or matched by a glob, a dangling link is a row too, not "no such file or folder"
    monkeypatch.setattr(audit, "iter_inputs", listing)
    assert _audit(trained_bundle["bundle"], str(inputs / "dangling.png"), str(inputs / "d*.png"), "--out",
                  str(tmp_path / "direct")) == 0
    (row,) = _journal(tmp_path / "direct")
    assert "symbolic link" in row["error"]


def test_inputs_stream_and_fail_early(tmp_path: Path) -> None:
    """A missing input fails when the expansion is asked for, before any path; a list file is read
    as it is consumed (its first paths come before a bad byte further down is met)."""
    from anomaly.deploy.audit import AuditError, iter_inputs

    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        iter_inputs([str(tmp_path / "no_such_folder")])
    lst = tmp_path / "todo.txt"
    lst.write_bytes(b"a.png\nb.png\n" + b"x" * 20000 + b"\xff\xfe.png\n")
    it = iter_inputs([str(lst)])
    assert next(it) == str(tmp_path / "a.png") and next(it) == str(tmp_path / "b.png")
    with pytest.raises(AuditError, match="cannot read the list file"):
        list(it)


def test_a_journal_tail_of_nul_bytes_reads_as_a_torn_line(tmp_path: Path) -> None:
    """A power cut after the file's size reached the disk but not its data leaves zeros at the end."""
    from anomaly.deploy.journal import iter_journal, load_journal

    j = tmp_path / "results.jsonl"
    j.write_bytes(b'{"path": "/a.png", "score": 1.0}\n{"path": "/b.png", "score": 2.0}\n' + b"\0" * 64)
    bad: list[int] = []
    assert [r["path"] for r in iter_journal(j, bad)] == ["/a.png", "/b.png"] and bad == [3]
    load_journal(j, repair=True)
    assert j.read_bytes().endswith(b'2.0}\n')


def test_render_options_travel_as_a_dict(tmp_path: Path) -> None:
    """What another engine's workers get (JSON through a Ray task): the same options back, and a
    misspelt field is an error that names it."""
    from anomaly.deploy.render import RenderOptions

    opts = RenderOptions(out=tmp_path, heatmaps="flagged", heatmap_size=0, masks=True, save_maps=False,
                         reconstructions=False, thumbnail=64, pixel_threshold=0.5, vmax=1.0, min_area=4)
    assert RenderOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    assert opts.keep_image is True and RenderOptions(**{**opts.__dict__, "heatmaps": "none"}).keep_image == 64
    with pytest.raises(ValueError, match="thumbnail_size"):
        RenderOptions.from_dict({**opts.to_dict(), "thumbnail_size": 64})

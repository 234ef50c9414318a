"""Fault cases end to end: what a hostile or unlucky day does to an audit, and what it should do.

Runs against a small bundle it trains and exports (a 32 px AAE on generated textures; needs the
``[train]`` extra), or one passed with ``--bundle``, and a folder of generated images:

=========================  ====================================================================
``kill -9 mid-run``        an ``anomaly audit`` subprocess is killed (SIGKILL) once its journal
                           holds a third of the images; rerunning it resumes: as many rows as
                           inputs, no path twice, every row's files on the disk and readable.
``power cut: journal``     copies of a finished audit folder with ``results.jsonl`` (and
                           ``results.csv``) cut at random offsets, one with a tail of NUL bytes
                           (what a size update without its data leaves); each resumes to rows =
                           inputs, no duplicates, no traceback.
``power cut: sidecar``     copies of the bundle with ``model.json`` cut at random offsets (one
                           empty): ``anomaly audit`` exits 2 with a one-line error naming the
                           file, never a traceback.
``concurrent audits``      a second ``anomaly audit`` on a folder another one is auditing is
                           refused (exit 2, message naming the first run's pid); the first ends
                           with rows = inputs.
``hostile Host header``    ``anomaly review OUT --serve`` asked for ``/`` with
                           ``Host: rebind.attacker.example``: expected 4xx (a DNS-rebinding page
                           must not read results); the same request with the bound host is the
                           control (200).
=========================  ====================================================================

And the price of durability: the audit's wall time per image with ``fsync`` (every image file and
each batch of journal lines flushed to the disk) against without, on the same images, alternated.

Prints a table ``case | expected | observed | ok`` and exits 1 if a case is not ok. Bounded: every
subprocess has a timeout and the whole run stops starting cases after ``--budget`` seconds.

Usage::

    python benchmarks/faults.py                      # builds its bundle in a temporary folder
    python benchmarks/faults.py --bundle bundle/ --images 400 --seed 1
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Runs the ``anomaly`` command of this interpreter (with or without the console script installed).
_ANOMALY = [sys.executable, "-c", "import sys; from anomaly.cli import main; sys.exit(main(sys.argv[1:]))"]


def _texture(rng: Any, size: int, blob: bool) -> Any:
    """A smooth periodic texture with noise, uint8 ``(size, size)``; ``blob``: a bright disc on it."""
    import cv2
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = 0.5 + 0.2 * np.sin(2 * np.pi * xx / 16 + rng.uniform(0, 6.3)) * np.cos(2 * np.pi * yy / 16)
    img = (np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1) * 255).astype(np.uint8)
    if blob:
        cx, cy = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
        cv2.circle(img, (cx, cy), size // 8, 250, -1)
    return img


def build_bundle(work: Path) -> Path:
    """Train a tiny AAE on generated textures and export it (the tests' bundle, about 10 s)."""
    import cv2
    import numpy as np

    from anomaly.deploy.export import export_run
    from anomaly.training.config import TrainConfig
    from anomaly.training.run import train

    rng = np.random.default_rng(0)
    data = work / "tiles"
    for sub in ("train/good", "test/good"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    for i in range(24):
        cv2.imwrite(str(data / "train/good" / f"{i:03d}.png"), _texture(rng, 48, False))
    for i in range(4):
        cv2.imwrite(str(data / "test/good" / f"{i:03d}.png"), _texture(rng, 48, False))
    cfg = TrainConfig(data=str(data), out=str(work / "run"), model="aae", image_size=32, epochs=3, batch_size=8,
                      model_kwargs={"latent_dim": 16, "base_channels": 8}, seed=0)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train(cfg)
    return export_run(work / "run", work / "bundle", latent="none")


def make_images(folder: Path, n: int, size: int, seed: int) -> list[str]:
    """``n`` generated ``size`` px PNGs in ``folder`` (every fourth with a blob); their paths."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"part{i:05d}.png"
        cv2.imwrite(str(p), _texture(rng, size, blob=i % 4 == 3))
        paths.append(str(p.resolve()))
    return paths


def _journal(out: Path) -> list[dict[str, Any]]:
    from anomaly.deploy.journal import iter_journal

    return list(iter_journal(out / "results.jsonl"))


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.endswith(b"\n"))
    except FileNotFoundError:
        return 0


def _check_rows(out: Path, inputs: list[str], files: bool = True) -> tuple[bool, str]:
    """Rows = inputs, no path twice, no error rows, and (``files``) each row's files readable."""
    import cv2

    recs = _journal(out)
    paths = [r["path"] for r in recs]
    dupes = len(paths) - len(set(paths))
    errors = sum(r.get("error") is not None for r in recs)
    bad_files = 0
    if files:
        for r in recs:
            for key in ("heatmap", "mask"):
                if r.get(key) and cv2.imread(str(out / r[key]), cv2.IMREAD_UNCHANGED) is None:
                    bad_files += 1
    ok = set(paths) == set(inputs) and not dupes and not errors and not bad_files
    text = f"{len(recs)} rows of {len(inputs)}, {dupes} duplicate(s), {errors} error row(s)"
    return ok, text + (f", {bad_files} unreadable file(s)" if files else "")


def _audit_cmd(bundle: Path, inputs: Path, out: Path, *extra: str) -> list[str]:
    return [*_ANOMALY, "audit", str(bundle), str(inputs), "--out", str(out), "--batch-size", "4", "--masks",
            "--decode-workers", "1", "--threads", "1", "--workers", "1", *extra]


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float) -> int:
    """Poll ``path`` until it holds ``n`` complete lines, the process ends, or ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        got = _lines(path)
        if got >= n:
            return got
        time.sleep(0.005)
    return _lines(path)


def _short(message: str, work: str, limit: int = 90) -> str:
    """An error line without the command prefix and the working folder, cut to ``limit``."""
    text = message.split("error: ", 1)[-1].replace(work + os.sep, "")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _run_main(argv: list[str]) -> tuple[int | str, str]:
    """``anomaly ARGV`` in this process: (exit status or ``"traceback: ..."``, stderr's last line)."""
    from anomaly.cli import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code: int | str = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    except Exception as exc:  # what the case must never see
        code = f"traceback: {type(exc).__name__}: {exc}"
    lines = [ln for ln in err.getvalue().replace("\r", "\n").splitlines() if ln.strip()]
    return code, (lines[-1] if lines else "")


def case_kill(bundle: Path, inputs: Path, paths: list[str], work: Path) -> tuple[tuple[str, str, str, bool], Path]:
    out = work / "killed"
    proc = _start(_audit_cmd(bundle, inputs, out))
    at = _wait_lines(out / "results.jsonl", len(paths) // 3, proc, timeout=60)
    finished = proc.poll() is not None
    if not finished:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    if finished:
        return ("kill -9 mid-run, resume", "rows = inputs, no duplicates", "the audit finished before the kill", False), out
    torn = (out / "results.jsonl").stat().st_size > 0 and not (out / "results.jsonl").read_bytes().endswith(b"\n")
    res = subprocess.run(_audit_cmd(bundle, inputs, out), capture_output=True, text=True, timeout=120)
    ok, text = _check_rows(out, paths)
    s = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    observed = (f"killed at {at} lines{' (torn last line)' if torn else ''}; resume exit {res.returncode}, "
                f"{s.get('skipped')} skipped + {s.get('new')} new; {text}")
    return ("kill -9 mid-run, resume", "rows = inputs, no duplicates, files readable", observed,
            ok and res.returncode == 0), out


def case_journal_cuts(bundle: Path, inputs: Path, paths: list[str], src: Path, work: Path, rng: random.Random,
                      cuts: int) -> list[tuple[str, str, str, bool]]:
    rows = []
    size = (src / "results.jsonl").stat().st_size
    csv_size = (src / "results.csv").stat().st_size
    offsets = sorted(rng.randrange(1, size) for _ in range(cuts))
    for k, off in enumerate(offsets):
        out = work / f"cut{k}"
        shutil.copytree(src, out)
        with open(out / "results.jsonl", "r+b") as fh:
            fh.truncate(off)
            if k == 0:  # the size reached the disk, the data did not
                fh.seek(off)
                fh.write(b"\0" * 300)
        with open(out / "results.csv", "r+b") as fh:
            fh.truncate(rng.randrange(1, csv_size))
        code, last = _run_main(_audit_cmd(bundle, inputs, out)[len(_ANOMALY):])
        ok, text = _check_rows(out, paths, files=False)
        csv_rows = max(0, (out / "results.csv").read_text().count("\n") - 1)
        tail = " + 300 NUL bytes" if k == 0 else ""
        rows.append((f"power cut: journal cut at {off}/{size} B{tail}", "resumes: rows = inputs, no duplicates",
                     f"exit {code}; {text}; csv {csv_rows} rows", ok and code == 0 and csv_rows == len(paths)))
    return rows


def case_sidecar_cuts(bundle: Path, inputs: Path, work: Path, rng: random.Random, cuts: int) -> list[tuple[str, str, str, bool]]:
    rows = []
    size = (bundle / "model.json").stat().st_size
    offsets = [0] + sorted(rng.randrange(1, size - 2) for _ in range(cuts - 1))
    for k, off in enumerate(offsets):
        b = work / f"bundle_cut{k}"
        shutil.copytree(bundle, b)
        with open(b / "model.json", "r+b") as fh:
            fh.truncate(off)
        code, last = _run_main(["audit", str(b), str(inputs), "--out", str(work / f"sidecar_out{k}")])
        ok = code == 2 and "model.json" in last and "Traceback" not in last
        rows.append((f"power cut: sidecar cut at {off}/{size} B", "exit 2, one-line error naming model.json",
                     f"exit {code}: \"{_short(last, str(work))}\"", ok))
    return rows


def case_concurrent(bundle: Path, inputs: Path, paths: list[str], work: Path) -> tuple[str, str, str, bool]:
    out = work / "concurrent"
    first = _start(_audit_cmd(bundle, inputs, out))
    at = _wait_lines(out / "results.jsonl", 1, first, timeout=60)
    if first.poll() is not None:
        first.communicate()
        return "concurrent audits, one folder", "second refused (exit 2)", "first finished before the second started", False
    second = subprocess.run(_audit_cmd(bundle, inputs, out), capture_output=True, text=True, timeout=120)
    first_still = first.poll() is None
    first.communicate(timeout=120)
    ok_rows, text = _check_rows(out, paths)
    msg = [ln for ln in second.stderr.splitlines() if "error" in ln]
    named = bool(msg) and f"pid {first.pid}" in msg[-1]
    said = _short(msg[-1] if msg else second.stderr.strip()[-200:], str(work))
    observed = (f"second (first at {at}+ lines, running: {first_still}): exit {second.returncode}, \"{said}\"; "
                f"first: exit {first.returncode}, {text}")
    ok = second.returncode == 2 and named and first.returncode == 0 and ok_rows
    return "concurrent audits, one folder", "second refused naming the first's pid; first completes", observed, ok


def case_host(out: Path) -> list[tuple[str, str, str, bool]]:
    proc = subprocess.Popen([*_ANOMALY, "review", str(out), "--serve", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = None
    end = time.monotonic() + 60
    try:
        while time.monotonic() < end and proc.poll() is None:
            if not select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))[0]:
                break  # nothing printed in time
            line = proc.stdout.readline()
            m = re.search(r"(http://[^\s]+)", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            return [("hostile Host header (review --serve)", "4xx", f"no server URL printed (exit {proc.poll()})", False)]
        m = re.match(r"http://([^/:]+|\[[^\]]+\]):(\d+)(/[^\s]*)?", url)
        host, port, path = m.group(1), int(m.group(2)), m.group(3) or "/"

        def get(host_header: str) -> int | str:
            conn = http.client.HTTPConnection("127.0.0.1" if host in ("localhost", "0.0.0.0") else host.strip("[]"),
                                              port, timeout=10)
            try:
                conn.putrequest("GET", path, skip_host=True)
                conn.putheader("Host", host_header)
                conn.endheaders()
                return conn.getresponse().status
            except (OSError, http.client.HTTPException) as exc:
                return f"{type(exc).__name__}"
            finally:
                conn.close()

        hostile = get(f"rebind.attacker.example:{port}")
        control = get(f"{host}:{port}")
        return [("hostile Host header (review --serve)", "4xx (421 or 403)", f"HTTP {hostile}",
                 isinstance(hostile, int) and 400 <= hostile < 500),
                ("  control: the bound Host", "200", f"HTTP {control}", control == 200)]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def durability_cost(bundle: Path, inputs: Path, work: Path, repeats: int = 4) -> dict[str, list[float]]:
    """Wall ms per image of the same audit with and without fsync, alternated ``repeats`` times."""
    from anomaly.deploy.audit import run_audit

    ms: dict[str, list[float]] = {"fsync": [], "no fsync": []}
    for i in range(repeats):
        for label, sync in (("fsync", True), ("no fsync", False)) if i % 2 == 0 else (("no fsync", False), ("fsync", True)):
            out = work / f"cost_{i}_{int(sync)}"
            t = time.perf_counter()
            s = run_audit(bundle, [str(inputs)], out, batch_size=16, masks=True, device="cpu", fsync=sync)
            ms[label].append((time.perf_counter() - t) / s["images"] * 1e3)
            shutil.rmtree(out)
    return ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: train and export a tiny one)")
    p.add_argument("--images", type=int, default=240, help="generated images to audit (default 240)")
    p.add_argument("--size", type=int, default=256, help="their side in px (default 256)")
    p.add_argument("--cuts", type=int, default=4, help="random cuts of the journal and of the sidecar (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    p.add_argument("--budget", type=float, default=170.0, help="seconds after which no new case starts (default 170)")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="faults-")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    table: list[tuple[str, str, str, bool]] = []
    try:
        bundle = args.bundle if args.bundle is not None else build_bundle(work / "train")
        inputs = work / "images"
        paths = make_images(inputs, args.images, args.size, args.seed)
        print(f"bundle {bundle}; {len(paths)} images of {args.size} px in {inputs} (setup {time.monotonic() - t0:.0f} s)",
              flush=True)

        def budget_left() -> bool:
            return time.monotonic() - t0 < args.budget

        row, killed = case_kill(bundle, inputs, paths, work)
        table.append(row)
        steps: list[Callable[[], list[tuple[str, str, str, bool]]]] = [
            lambda: case_journal_cuts(bundle, inputs, paths, killed, work, rng, args.cuts),
            lambda: case_sidecar_cuts(bundle, inputs, work, rng, args.cuts),
            lambda: [case_concurrent(bundle, inputs, paths, work)],
            lambda: case_host(killed),
        ]
        for step in steps:
            if not budget_left():
                table.append(("(remaining cases)", "-", f"not run: past the {args.budget:.0f} s budget", False))
                break
            table.extend(step())
        cost = durability_cost(bundle, inputs, work) if budget_left() else None
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    widths = [max(len(str(r[i])) for r in table + [("case", "expected", "observed", "ok")]) for i in range(3)]
    print(f"\n{'case':<{widths[0]}} | {'expected':<{widths[1]}} | {'observed':<{widths[2]}} | ok")
    print(f"{'-' * widths[0]}-|-{'-' * widths[1]}-|-{'-' * widths[2]}-|---")
    for name, expected, observed, ok in table:
        print(f"{name:<{widths[0]}} | {expected:<{widths[1]}} | {observed:<{widths[2]}} | {'yes' if ok else 'NO'}")
    if cost:
        import statistics

        print(f"\ndurability cost: wall ms per image, {len(paths)} images of {args.size} px, heatmaps + masks, "
              f"batch 16, {len(cost['fsync'])} runs each, alternated")
        for stat, fn in (("best", min), ("median", statistics.median)):
            f, n = fn(cost["fsync"]), fn(cost["no fsync"])
            print(f"  {stat:<6}: {f:.2f} with fsync, {n:.2f} without: {f - n:+.2f} ms/image ({100 * (f - n) / n:+.0f} %)")
        print(f"  runs  : fsync {', '.join(f'{v:.2f}' for v in cost['fsync'])}; "
              f"no fsync {', '.join(f'{v:.2f}' for v in cost['no fsync'])}")
    print(f"\n{sum(r[3] for r in table)}/{len(table)} ok in {time.monotonic() - t0:.0f} s")
    return 0 if all(r[3] for r in table) else 1



if __name__ == "__main__":
    sys.exit(main())

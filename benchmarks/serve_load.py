"""Load benchmark of ``anomaly serve``: a bounded async httpx load generator on loopback.

Two servers of the same bundle run side by side as subprocesses (``anomaly serve``): one with
micro-batching (``--max-batch 16 --max-wait-ms 5`` by default) and one with ``--max-batch 1``.
For 1, 8 and 32 concurrent clients (closed loop: each posts a 300-px ELPV cell PNG, waits for
the verdict, posts the next) it times a window of ``--seconds`` against each server in turn (the
pairs back to back, so both see the same machine), and prints requests/s, p50/p95/p99 latency,
errors, and from each server's ``/metrics`` the mean batch size and one batch's mean inference
time. Then an open-loop run offers twice the measured capacity (the micro-batching server at 32
clients) for ``--seconds``: the excess must get 429 at once and nothing may get a 5xx.

The offline reference is ``anomaly bench``'s graph rate for the same bundle (onnxruntime fp32 at
batch 1 and at ``--max-batch``, :func:`anomaly.deploy.bench.bench_bundle`), timed in this process
between the runs' servers being idle.

The load generator shares the machine's cores with the servers: on a 2-core machine its own
CPU (about 1 ms per request for httpx) is part of every figure, so compare the ratios measured in
one run rather than absolute rates across runs.

Usage::

    python benchmarks/serve_load.py --bundle benchmarks_out/speed/bundle_128
    python benchmarks/serve_load.py                 # trains the default AAE at 128² first (speed.py)
    python benchmarks/serve_load.py --seconds 4 --clients 1 8 32
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

HEADERS = {"Content-Type": "image/png"}


@dataclass
class RunResult:
    label: str
    clients: int
    seconds: float
    requests: int
    ok: int
    rejected: int  # 429
    server_errors: int  # 5xx
    other_errors: int  # transport errors, other statuses
    latencies: np.ndarray  # seconds, successful requests
    reject_latencies: np.ndarray  # seconds, 429 answers
    batch_mean: float | None = None
    batch_inference_ms: float | None = None

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def pct(self, q: float, which: str = "ok") -> float | None:
        a = self.latencies if which == "ok" else self.reject_latencies
        return float(np.percentile(a, q) * 1000.0) if a.size else None


class Server:
    """``anomaly serve`` in a subprocess on a free loopback port."""

    def __init__(self, bundle: Path, extra: Sequence[str]) -> None:
        cmd = [sys.executable, "-m", "anomaly.cli", "serve", f"default={bundle}", "--port", "0", *extra]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.url = f"http://127.0.0.1:{m.group(1)}"

    def metrics(self) -> dict[str, float]:
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for name in ("anomaly_batch_size_sum", "anomaly_batch_size_count", "anomaly_inference_duration_seconds_sum",
                     "anomaly_inference_duration_seconds_count"):
            m = re.search(rf'^{name}{{model="default"}} ([0-9.e+-]+)$', text, re.M)
            out[name] = float(m.group(1)) if m else 0.0
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


async def closed_loop(url: str, bodies: list[bytes], clients: int, seconds: float, warmup: float,
                      max_requests: int) -> tuple[list[tuple[float, int]], float]:
    """``clients`` connections posting back to back; returns ``[(latency, status)]`` of the timed window."""
    import httpx

    records: list[tuple[float, int]] = []
    t_start = time.perf_counter() + warmup
    t_end = t_start + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
        async def client(k: int) -> None:
            i = k
            while True:
                now = time.perf_counter()
                if now >= t_end or len(records) >= max_requests:
                    return
                try:
                    r = await c.post("/v1/models/default/inspect", content=bodies[i % len(bodies)], headers=HEADERS)
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
                done = time.perf_counter()
                if now >= t_start:
                    records.append((done - now, status))
                i += clients

        await asyncio.gather(*(client(k) for k in range(clients)))
    return records, min(seconds, time.perf_counter() - t_start)


async def open_loop(url: str, bodies: list[bytes], rate: float, seconds: float, max_in_flight: int) -> tuple[list[tuple[float, int]], float]:
    """Requests started at ``rate`` per second whatever the answers (at most ``max_in_flight`` open)."""
    import httpx

    records: list[tuple[float, int]] = []
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    sem = asyncio.Semaphore(max_in_flight)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
        async def one(i: int) -> None:
            async with sem:
                t = time.perf_counter()
                try:
                    r = await c.post("/v1/models/default/inspect", content=bodies[i % len(bodies)], headers=HEADERS)
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
                records.append((time.perf_counter() - t, status))

        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        took = time.perf_counter() - start
    return records, took


def summarise(label: str, clients: int, records: list[tuple[float, int]], seconds: float,
              before: dict[str, float] | None = None, after: dict[str, float] | None = None) -> RunResult:
    lat = np.array([t for t, s in records if s == 200])
    rej = np.array([t for t, s in records if s == 429])
    res = RunResult(label, clients, seconds, len(records), int(lat.size), int(rej.size),
                    sum(1 for _, s in records if 500 <= s < 600),
                    sum(1 for _, s in records if s not in (200, 429) and not 500 <= s < 600), lat, rej)
    if before and after:
        n = after["anomaly_batch_size_count"] - before["anomaly_batch_size_count"]
        if n > 0:
            res.batch_mean = (after["anomaly_batch_size_sum"] - before["anomaly_batch_size_sum"]) / n
            res.batch_inference_ms = 1000.0 * (after["anomaly_inference_duration_seconds_sum"]
                                               - before["anomaly_inference_duration_seconds_sum"]) / n
    return res


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "" if v is None else format(v, spec)


def machine() -> list[str]:
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    import fastapi
    import uvicorn

    return [f"# serve load, {dt.date.today().isoformat()}",
            f"machine: {cpu}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}, onnxruntime "
            f"{onnxruntime.__version__}, fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}",
            f"command: python {shlex.join(sys.argv)}"]


def default_bundle(work: Path, minutes: float) -> Path:
    """The default AAE at 128² as ``benchmarks/speed.py`` trains it (reused when present)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import speed

    data, _ = speed.dataset(work, None)
    return speed.prepare(work, data, 128, minutes, data / "train" / "good", variants=())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None, help="bundle to serve (default: train/reuse the default AAE at 128²)")
    ap.add_argument("--work", default="benchmarks_out/speed", help="where speed.py's default bundle lives")
    ap.add_argument("--train-minutes", type=float, default=1.5)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=6.0, help="timed window per run (default 6)")
    ap.add_argument("--warmup", type=float, default=1.0, help="untimed seconds before each window (default 1)")
    ap.add_argument("--max-requests", type=int, default=20000, help="bound on requests per run")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--queue-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=256, help="ELPV cells to cycle through (default 256)")
    ap.add_argument("--overload", type=float, default=2.0, help="open-loop rate as a multiple of capacity (0: skip)")
    ap.add_argument("--max-in-flight", type=int, default=128,
                    help="open loop: most requests open at once (arrivals beyond wait in the client, untimed)")
    args = ap.parse_args(argv)

    from anomaly.data.elpv import load_labels
    from anomaly.deploy.bench import bench_bundle

    bundle = Path(args.bundle) if args.bundle else default_bundle(Path(args.work), args.train_minutes)
    rows = [r for r in load_labels() if r[2] == "mono"][: args.images]
    bodies = [p.read_bytes() for p, _, _ in rows]
    print("\n".join(machine()))
    print(f"bundle: {bundle.name} ({bundle}); inputs: {len(bodies)} ELPV mono cells, 300x300 PNG "
          f"({np.mean([len(b) for b in bodies]) / 1024:.0f} kB mean); windows of {args.seconds:g} s after "
          f"{args.warmup:g} s warm-up; the load generator runs on the same cores")

    offline = bench_bundle(bundle, batch_sizes=(1, args.max_batch), iterations=30, warmup=5, device="cpu",
                           torch_eager=False)
    off = {r.batch: r.images_per_s for r in offline if r.engine == "onnxruntime" and r.precision == "fp32"}
    print(f"offline (anomaly bench, onnxruntime fp32, cpu): batch 1 {off.get(1, 0):.1f} images/s, "
          f"batch {args.max_batch} {off.get(args.max_batch, 0):.1f} images/s")

    common = ["--queue-size", str(args.queue_size)]
    batched = Server(bundle, ["--max-batch", str(args.max_batch), "--max-wait-ms", f"{args.max_wait_ms:g}", *common])
    single = Server(bundle, ["--max-batch", "1", "--max-wait-ms", "0", *common])
    results: list[RunResult] = []
    try:
        for clients in args.clients:
            for label, srv in ((f"max-batch {args.max_batch}, wait {args.max_wait_ms:g} ms", batched),
                               ("max-batch 1", single)):
                before = srv.metrics()
                recs, took = asyncio.run(closed_loop(srv.url, bodies, clients, args.seconds, args.warmup, args.max_requests))
                results.append(summarise(label, clients, recs, took, before, srv.metrics()))
        print("\n| server | clients | requests/s | p50 ms | p95 ms | p99 ms | errors | mean batch | batch inference ms |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            errors = r.server_errors + r.other_errors + r.rejected
            print(f"| {r.label} | {r.clients} | {r.rps:.1f} | {fmt(r.pct(50))} | {fmt(r.pct(95))} | {fmt(r.pct(99))} | "
                  f"{errors} | {fmt(r.batch_mean, '.2f')} | {fmt(r.batch_inference_ms)} |")
        top = max(args.clients)
        b = next(r for r in results if r.clients == top and r.label.startswith(f"max-batch {args.max_batch}"))
        s = next(r for r in results if r.clients == top and r.label == "max-batch 1")
        print(f"\nat {top} clients: micro-batching {b.rps:.1f} requests/s = {b.rps / s.rps:.2f}x max-batch 1 "
              f"({s.rps:.1f}); {b.rps / off[args.max_batch]:.0%} of offline batch {args.max_batch} "
              f"({off[args.max_batch]:.1f} images/s) and {b.rps / off[1]:.0%} of offline batch 1 ({off[1]:.1f})")
        if b.batch_inference_ms is not None and b.pct(99) is not None:
            bound = args.max_wait_ms + 3 * b.batch_inference_ms
            print(f"p99 {b.pct(99):.1f} ms against max-wait + 3 x one batch's inference "
                  f"= {args.max_wait_ms:g} + 3 x {b.batch_inference_ms:.1f} = {bound:.1f} ms; errors "
                  f"{b.server_errors + b.other_errors + b.rejected}")
        if args.overload > 0:
            rate = args.overload * b.rps
            before = batched.metrics()
            recs, took = asyncio.run(open_loop(batched.url, bodies, rate, args.seconds, max_in_flight=args.max_in_flight))
            o = summarise(f"open loop at {args.overload:g}x capacity", 0, recs, took, before, batched.metrics())
            print(f"\n{o.label}: offered {rate:.0f} requests/s for {args.seconds:g} s ({o.requests} requests): "
                  f"{o.ok} answered ({o.rps:.1f}/s, p50 {fmt(o.pct(50))} ms, p99 {fmt(o.pct(99))} ms), "
                  f"{o.rejected} got 429 (p50 {fmt(o.pct(50, 'rej'))} ms, p99 {fmt(o.pct(99, 'rej'))} ms, "
                  f"max {fmt(float(o.reject_latencies.max() * 1000) if o.reject_latencies.size else None)} ms), "
                  f"{o.server_errors} 5xx, {o.other_errors} other errors")
    finally:
        codes = [batched.stop(), single.stop()]
    print(f"\nservers stopped with SIGTERM: exit codes {codes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

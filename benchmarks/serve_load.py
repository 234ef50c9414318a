"""Load benchmark of ``anomaly serve``: a bounded async load generator on loopback.

Two servers of the same bundle run side by side as subprocesses (``anomaly serve``): one with
micro-batching (``--max-batch 16 --max-wait-ms 5`` by default) and one with ``--max-batch 1``.
For 1, 8 and 32 concurrent clients (closed loop: each posts a 300-px ELPV cell PNG, waits for
the verdict, posts the next) it times a window of ``--seconds`` against each server in turn (the
pairs back to back, ``--repeat`` times, so both see the same machine), and prints requests/s,
p50/p95/p99 latency, errors, from each server's ``/metrics`` the mean batch size and one batch's
mean inference time, and the CPU each answer cost: the server's event-loop thread, its other
threads (decoding, batching, the graph) and the load generator. Then an open-loop run offers
twice the measured capacity (the micro-batching server at 32 clients) for ``--seconds``: the
excess must get 429 at once and nothing may get a 5xx. For the 429s it prints the client's
latency, the server's own part of it (``anomaly_refusal_seconds``: the request reaching the
app to the answer's start) and how late the load generator's event loop woke meanwhile.

The offline reference is ``anomaly bench``'s graph rate for the same bundle (onnxruntime fp32 at
batch 1 and at ``--max-batch``, :func:`anomaly.deploy.bench.bench_bundle`), timed in this process
before the servers start.

The load generator shares the machine's cores with the servers. By default it is a small
keep-alive HTTP/1.1 client (:class:`RawPool`, about 0.4 ms of CPU per request); ``--client
httpx`` uses httpx, which spends 2-10 ms per request here and, with many connections open, reads
its answers hundreds of ms late, so its latencies are largely its own. On a machine shared with
other jobs compare the ratios measured in one run rather than absolute rates across runs.

Usage::

    python benchmarks/serve_load.py --bundle benchmarks_out/speed/bundle_128
    python benchmarks/serve_load.py                 # trains the default AAE at 128² first (speed.py)
    python benchmarks/serve_load.py --seconds 4 --clients 1 8 32 --repeat 3
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
from typing import Any, Sequence

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
    cpu_ms: dict[str, float] | None = None  # CPU per answered request: server loop, server rest, client
    refusal_ms: tuple[float, float, float] | None = None  # server side 429s: mean, p50, p99 (from buckets)
    client_lag_ms: tuple[float, float] | None = None  # the load generator's own event loop: p50, p99 late

    @property
    def cpu_text(self) -> str:
        c = self.cpu_ms
        return "" if not c else f"{c['loop']:.2f} / {c['rest']:.2f} / {c['client']:.2f}"

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
        """Counters of ``/metrics`` (batches, inference, refusals: sums, counts, buckets) and the
        server's CPU seconds so far: its event loop's thread (the main one) and all the others."""
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for name in ("anomaly_batch_size_sum", "anomaly_batch_size_count", "anomaly_inference_duration_seconds_sum",
                     "anomaly_inference_duration_seconds_count", "anomaly_refusal_seconds_sum",
                     "anomaly_refusal_seconds_count"):
            m = re.search(rf'^{name}{{model="default"}} ([0-9.e+-]+)$', text, re.M)
            out[name] = float(m.group(1)) if m else 0.0
        for le, v in re.findall(r'^anomaly_refusal_seconds_bucket{le="([^"]+)",model="default"} ([0-9.e+-]+)$', text, re.M):
            out[f"refusal_le_{le}"] = float(v)
        out.update(self.cpu())
        return out

    def cpu(self) -> dict[str, float]:
        """CPU seconds of the server process: ``loop`` (the main thread, which runs uvicorn's event
        loop) and ``rest`` (decoders, batcher, inference threads), from ``/proc`` (Linux)."""
        tick = os.sysconf("SC_CLK_TCK")
        loop = rest = 0.0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # a thread that ended meanwhile
                continue
            used = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            if task.name == str(self.proc.pid):
                loop += used
            else:
                rest += used
        return {"cpu_loop": loop, "cpu_rest": rest}

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class LagProbe:
    """How late the load generator's own event loop wakes up (a 10 ms sleep, over and over): a busy
    client reads its answers late, and every latency it measures grows by as much."""

    def __init__(self) -> None:
        self.late: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            self.late.append(time.perf_counter() - t - 0.01)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> tuple[float, float] | None:
        if self._task is not None:
            self._task.cancel()
        if not self.late:
            return None
        a = np.asarray(self.late) * 1000.0
        return float(np.percentile(a, 50)), float(np.percentile(a, 99))


@dataclass
class Load:
    """What one load run saw: ``[(latency s, status)]`` of its timed window, the window's length,
    the client's event-loop lateness (p50, p99 ms), and every answer counted with the warm-up's
    (the denominator of the CPU per request, whose counters span the warm-up too)."""

    records: list[tuple[float, int]]
    seconds: float
    lag: tuple[float, float] | None
    total: int


PATH = "/v1/models/default/inspect"


class RawPool:
    """Keep-alive HTTP/1.1 connections speaking just what this benchmark needs: ``POST`` a PNG,
    read the status line, the headers and a ``Content-Length`` (or chunked) body.

    The line's stations post from their own machines; here the load generator shares the
    server's cores, so what it spends per request is taken from the server. httpx spends
    2-9 ms of CPU per request on this machine (more with many connections open, measured with
    ``--client httpx``), and its event loop then reads answers hundreds of ms late; this client
    spends a fraction of a millisecond, so the figures are the server's. The requests are
    pre-built bytes: the same on the wire as httpx's, less its headers' variety.
    """

    def __init__(self, url: str, bodies: list[bytes], size: int) -> None:
        m = re.fullmatch(r"http://([^:/]+):(\d+)", url)
        if not m:
            raise ValueError(f"expected http://HOST:PORT, got {url!r}")
        self.host, self.port = m.group(1), int(m.group(2))
        self.size = size
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(size)
        head = f"POST {PATH} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: image/png\r\n"
        self._requests = [(head + f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]

    async def post(self, i: int) -> int:
        """Post body ``i`` (modulo their number); the status, or -1 for a transport error."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            try:
                if conn is None:
                    conn = await asyncio.open_connection(self.host, self.port)
                reader, writer = conn
                writer.write(self._requests[i % len(self._requests)])
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                lower = head.lower()
                k = lower.find(b"\r\ncontent-length:")
                if k >= 0:
                    n = int(lower[k + 17:lower.index(b"\r\n", k + 2)])
                    await reader.readexactly(n)
                elif b"\r\ntransfer-encoding: chunked" in lower:
                    while (n := int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)):
                        await reader.readexactly(n + 2)
                    await reader.readuntil(b"\r\n")
                if b"\r\nconnection: close" in lower:
                    writer.close()
                else:
                    self._idle.append(conn)
                return status
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                if conn is not None:
                    conn[1].close()
                return -1

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class HttpxPool:
    """The same requests through ``httpx.AsyncClient`` (``--client httpx``)."""

    def __init__(self, url: str, bodies: list[bytes], size: int) -> None:
        import httpx

        self.bodies = bodies
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        self.client = httpx.AsyncClient(base_url=url, timeout=30, limits=limits)
        self._error = httpx.HTTPError

    async def post(self, i: int) -> int:
        try:
            r = await self.client.post(PATH, content=self.bodies[i % len(self.bodies)], headers=HEADERS)
            return r.status_code
        except self._error:
            return -1

    async def close(self) -> None:
        await self.client.aclose()


def make_pool(kind: str, url: str, bodies: list[bytes], size: int) -> RawPool | HttpxPool:
    return RawPool(url, bodies, size) if kind == "raw" else HttpxPool(url, bodies, size)


async def closed_loop(url: str, bodies: list[bytes], clients: int, seconds: float, warmup: float,
                      max_requests: int, kind: str = "raw") -> Load:
    """``clients`` connections posting back to back (closed loop)."""
    records: list[tuple[float, int]] = []
    total = [0]
    probe = LagProbe()
    t_start = time.perf_counter() + warmup
    t_end = t_start + seconds
    pool = make_pool(kind, url, bodies, clients)

    async def client(k: int) -> None:
        i = k
        while True:
            now = time.perf_counter()
            if now >= t_end or len(records) >= max_requests:
                return
            status = await pool.post(i)
            done = time.perf_counter()
            total[0] += 1
            if now >= t_start:
                records.append((done - now, status))
            i += clients

    probe.start()
    try:
        await asyncio.gather(*(client(k) for k in range(clients)))
    finally:
        await pool.close()
    return Load(records, min(seconds, time.perf_counter() - t_start), probe.stop(), total[0])


async def open_loop(url: str, bodies: list[bytes], rate: float, seconds: float, max_in_flight: int,
                    kind: str = "raw") -> Load:
    """Requests started at ``rate`` per second whatever the answers (at most ``max_in_flight`` open;
    an arrival beyond waits in the client, and its wait is not timed)."""
    records: list[tuple[float, int]] = []
    probe = LagProbe()
    pool = make_pool(kind, url, bodies, max_in_flight)
    sem = asyncio.Semaphore(max_in_flight)

    async def one(i: int) -> None:
        async with sem:
            t = time.perf_counter()
            status = await pool.post(i)
            records.append((time.perf_counter() - t, status))

    tasks = []
    probe.start()
    start = time.perf_counter()
    try:
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    finally:
        await pool.close()
    return Load(records, time.perf_counter() - start, probe.stop(), len(records))


def bucket_quantile(le: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile of a Prometheus histogram's cumulative buckets ``{upper bound: count}``,
    interpolated linearly inside its bucket (as ``histogram_quantile`` does)."""
    bounds = sorted(le)
    total = le[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for b in bounds:
        if le[b] >= rank:
            if b == float("inf"):
                return lower
            return lower + (b - lower) * (rank - below) / max(le[b] - below, 1e-12)
        lower, below = b, le[b]
    return lower


def summarise(label: str, clients: int, load: Load, before: dict[str, float] | None = None,
              after: dict[str, float] | None = None, client_cpu: float | None = None) -> RunResult:
    records, seconds = load.records, load.seconds
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
        answered = max(1, load.total)
        res.cpu_ms = {"loop": 1000.0 * (after["cpu_loop"] - before["cpu_loop"]) / answered,
                      "rest": 1000.0 * (after["cpu_rest"] - before["cpu_rest"]) / answered,
                      "client": 1000.0 * (client_cpu or 0.0) / answered}
        refused = after["anomaly_refusal_seconds_count"] - before["anomaly_refusal_seconds_count"]
        if refused > 0:
            le = {float(k[len("refusal_le_"):]): v - before.get(k, 0.0) for k, v in after.items()
                  if k.startswith("refusal_le_")}
            mean = 1000.0 * (after["anomaly_refusal_seconds_sum"] - before["anomaly_refusal_seconds_sum"]) / refused
            res.refusal_ms = (mean, 1000.0 * (bucket_quantile(le, 0.5) or 0.0), 1000.0 * (bucket_quantile(le, 0.99) or 0.0))
    res.client_lag_ms = load.lag
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
    ap.add_argument("--overload-rate", type=float, default=None,
                    help="open-loop rate in requests/s instead (trials compared at one rate)")
    ap.add_argument("--max-in-flight", type=int, default=128,
                    help="open loop: most requests open at once (arrivals beyond wait in the client, untimed)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="timed pairs per client count (a busy machine: the ratio is the median's)")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="load generator: raw keep-alive HTTP/1.1 (default, light) or httpx (see RawPool)")
    ap.add_argument("--server-args", default="", help="more `anomaly serve` options for both servers (trials)")
    args = ap.parse_args(argv)

    from anomaly.data.elpv import load_labels
    from anomaly.deploy.bench import bench_bundle

    bundle = Path(args.bundle) if args.bundle else default_bundle(Path(args.work), args.train_minutes)
    rows = [r for r in load_labels() if r[2] == "mono"][: args.images]
    bodies = [p.read_bytes() for p, _, _ in rows]
    print("\n".join(machine()))
    print(f"load average (1, 5, 15 min) at the start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"bundle: {bundle.name} ({bundle}); inputs: {len(bodies)} ELPV mono cells, 300x300 PNG "
          f"({np.mean([len(b) for b in bodies]) / 1024:.0f} kB mean); windows of {args.seconds:g} s after "
          f"{args.warmup:g} s warm-up; the load generator runs on the same cores")

    offline = bench_bundle(bundle, batch_sizes=(1, args.max_batch), iterations=30, warmup=5, device="cpu",
                           torch_eager=False)
    off = {r.batch: r.images_per_s for r in offline if r.engine == "onnxruntime" and r.precision == "fp32"}
    print(f"offline (anomaly bench, onnxruntime fp32, cpu): batch 1 {off.get(1, 0):.1f} images/s, "
          f"batch {args.max_batch} {off.get(args.max_batch, 0):.1f} images/s")

    common = ["--queue-size", str(args.queue_size), *shlex.split(args.server_args)]
    batched = Server(bundle, ["--max-batch", str(args.max_batch), "--max-wait-ms", f"{args.max_wait_ms:g}", *common])
    single = Server(bundle, ["--max-batch", "1", "--max-wait-ms", "0", *common])
    blabel = f"max-batch {args.max_batch}, wait {args.max_wait_ms:g} ms"
    results: list[RunResult] = []

    def timed(label: str, clients: int, srv: Server, run: Any) -> RunResult:
        before, cpu0 = srv.metrics(), time.process_time()
        load = asyncio.run(run)
        cpu = time.process_time() - cpu0
        return summarise(label, clients, load, before, srv.metrics(), cpu)

    try:
        for clients in args.clients:
            for _ in range(args.repeat):  # the pairs back to back, so that both see the same machine
                for label, srv in ((blabel, batched), ("max-batch 1", single)):
                    results.append(timed(label, clients, srv, closed_loop(srv.url, bodies, clients, args.seconds,
                                                                          args.warmup, args.max_requests, args.client)))
        print("\n| server | clients | requests/s | p50 ms | p95 ms | p99 ms | errors | mean batch | batch inference ms "
              "| CPU ms per request: server loop / rest / client |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            errors = r.server_errors + r.other_errors + r.rejected
            print(f"| {r.label} | {r.clients} | {r.rps:.1f} | {fmt(r.pct(50))} | {fmt(r.pct(95))} | {fmt(r.pct(99))} | "
                  f"{errors} | {fmt(r.batch_mean, '.2f')} | {fmt(r.batch_inference_ms)} | {r.cpu_text} |")
        top = max(args.clients)
        bs = [r for r in results if r.clients == top and r.label == blabel]
        ss = [r for r in results if r.clients == top and r.label == "max-batch 1"]
        b_rps, s_rps = float(np.median([r.rps for r in bs])), float(np.median([r.rps for r in ss]))
        ratios = ", ".join(f"{x.rps / y.rps:.2f}" for x, y in zip(bs, ss))
        print(f"\nat {top} clients: micro-batching {b_rps:.1f} requests/s = {b_rps / s_rps:.2f}x max-batch 1 "
              f"({s_rps:.1f}){' (medians of ' + str(len(bs)) + ' pairs; pair ratios ' + ratios + ')' if len(bs) > 1 else ''}; "
              f"{b_rps / off[args.max_batch]:.0%} of offline batch {args.max_batch} "
              f"({off[args.max_batch]:.1f} images/s) and {b_rps / off[1]:.0%} of offline batch 1 ({off[1]:.1f})")
        alone = 1000.0 * args.max_batch / off[args.max_batch]  # one full batch's graph, offline
        for b in bs:
            if b.batch_inference_ms is not None and b.pct(99) is not None:
                # the served batch time includes its regions and, with two lanes, waiting for the other
                # lane's graph; the offline batch time is the stricter bound
                bound = args.max_wait_ms + 3 * b.batch_inference_ms
                print(f"p99 {b.pct(99):.1f} ms against max-wait + 3 x one batch's inference "
                      f"= {args.max_wait_ms:g} + 3 x {b.batch_inference_ms:.1f} (served) = {bound:.1f} ms, or "
                      f"{args.max_wait_ms + 3 * alone:.1f} ms with the offline batch ({alone:.1f} ms); errors "
                      f"{b.server_errors + b.other_errors + b.rejected}")
        if args.overload > 0 or args.overload_rate:
            rate = args.overload_rate or args.overload * b_rps
            what = f"{args.overload:g}x capacity" if not args.overload_rate else f"{rate / b_rps:.1f}x capacity"
            o = timed(f"open loop at {what}", 0, batched,
                      open_loop(batched.url, bodies, rate, args.seconds, args.max_in_flight, args.client))
            print(f"\n{o.label}: offered {rate:.0f} requests/s for {args.seconds:g} s ({o.requests} requests): "
                  f"{o.ok} answered ({o.rps:.1f}/s, p50 {fmt(o.pct(50))} ms, p99 {fmt(o.pct(99))} ms), "
                  f"{o.rejected} got 429 (p50 {fmt(o.pct(50, 'rej'))} ms, p99 {fmt(o.pct(99, 'rej'))} ms, "
                  f"max {fmt(float(o.reject_latencies.max() * 1000) if o.reject_latencies.size else None)} ms), "
                  f"{o.server_errors} 5xx, {o.other_errors} other errors")
            if o.refusal_ms is not None:
                print(f"  429s in the server (anomaly_refusal_seconds: request reaching the app to the answer's "
                      f"start): mean {o.refusal_ms[0]:.2f} ms, p50 {o.refusal_ms[1]:.2f} ms, p99 {o.refusal_ms[2]:.2f} ms")
            if o.client_lag_ms is not None:
                print(f"  the load generator's event loop woke late by p50 {o.client_lag_ms[0]:.1f} ms, "
                      f"p99 {o.client_lag_ms[1]:.1f} ms; CPU ms per answer: {o.cpu_text} (server loop / rest / client)")
    finally:
        codes = [batched.stop(), single.stop()]
        print(f"\nload average (1, 5, 15 min) at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"\nservers stopped with SIGTERM: exit codes {codes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The inspection service's Prometheus metrics (prometheus-client), one registry per service.

Histograms (seconds unless named otherwise), each labelled by ``model``:

* ``anomaly_request_duration_seconds`` (also ``endpoint``): arrival to response, per request;
* ``anomaly_queue_duration_seconds``: queued to its batch starting, per image;
* ``anomaly_inference_duration_seconds``: one batch through the graph, calibration and regions
  (with both lanes busy, also its graph's wait for the other batch's);
* ``anomaly_batch_size``: images per batch (buckets at the powers of two up to ``--max-batch``);
* ``anomaly_score``: the image scores, in buckets of each model's own scale (the deciles of its
  calibration scores and its threshold; a bucket set per series, which Prometheus allows);
* ``anomaly_refusal_seconds``: a 429's time in the server, from the request reaching the app (its
  headers parsed) to the answer's start. Against the client's figure it tells whether an overload's
  refusals wait in the server (its event loop) or before it (the socket, the client itself).

Counters and gauges: ``anomaly_requests_total`` (``model``, ``endpoint``, ``code``),
``anomaly_queue_depth`` and ``anomaly_queue_admitted`` (queued; queued plus decoding),
``anomaly_threshold``, ``anomaly_ready``, and the drift gauges ``anomaly_drift_ks_statistic``,
``anomaly_drift_ks_pvalue``, ``anomaly_drift_psi``, ``anomaly_drift_alarm`` (0/1) and
``anomaly_drift_window_scores`` — the drift gauges only for models whose sidecar has reference
scores, and the three measures only once the window holds enough scores for a verdict.

Only names of served models become label values (an unknown name in a URL counts as
``model="-"``), so clients cannot grow the label sets.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

__all__ = ["ServiceMetrics", "ScoreHistogram", "score_buckets", "UNKNOWN_MODEL"]

#: the ``model`` label of requests for a name the service does not serve
UNKNOWN_MODEL = "-"
#: finer at the low end: a refusal should take well under a millisecond of the server's time
_REFUSAL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def score_buckets(reference: Sequence[float] | None, threshold: float | None) -> list[float]:
    """Upper bounds of a model's score buckets: the deciles of its calibration scores, its
    threshold and twice it; a log grid from 1e-4 to 1e4 when it has neither."""
    edges: list[float] = []
    if reference is not None and len(reference):
        edges += [float(v) for v in np.quantile(np.asarray(reference, dtype=np.float64), np.linspace(0.1, 0.9, 9))]
        edges += [float(np.max(reference))]
    if threshold is not None:
        edges += [float(threshold), 2.0 * float(threshold) if threshold > 0 else float(threshold) / 2.0]
    if not edges:
        edges = [float(v) for v in np.logspace(-4, 4, 17)]
    return sorted(set(round(e, 9) for e in edges))


class ScoreHistogram:
    """Cumulative counts of scores in fixed buckets (thread-safe), exposed by :class:`ServiceMetrics`."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = np.asarray(sorted(bounds), dtype=np.float64)
        self._counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, scores: Iterable[float]) -> None:
        s = np.asarray([v for v in scores if np.isfinite(v)], dtype=np.float64)
        if not s.size:
            return
        idx = np.searchsorted(self.bounds, s, side="left")  # le: a score equal to a bound counts in it
        with self._lock:
            self._counts += np.bincount(idx, minlength=len(self._counts))
            self._sum += float(s.sum())

    def buckets(self) -> tuple[list[tuple[str, float]], float]:
        with self._lock:
            cum = np.cumsum(self._counts)
            total = self._sum
        out = [(repr(float(b)), float(c)) for b, c in zip(self.bounds, cum[:-1])]
        out.append(("+Inf", float(cum[-1])))
        return out, total


class _ModelCollector(Collector):
    """Scrape-time gauges and score histograms of the served models."""

    def __init__(self, models: Callable[[], Sequence[Any]], ready: Callable[[], bool]) -> None:
        self._models = models
        self._ready = ready

    def describe(self) -> list:  # no up-front description: the families depend on the models
        return []

    def collect(self) -> Iterable[Any]:
        models = list(self._models())
        depth = GaugeMetricFamily("anomaly_queue_depth", "Images queued for a batch", labels=["model"])
        admitted = GaugeMetricFamily("anomaly_queue_admitted", "Queue places taken (decoding + queued)", labels=["model"])
        threshold = GaugeMetricFamily("anomaly_threshold", "The image threshold in force", labels=["model"])
        scores = HistogramMetricFamily("anomaly_score", "Image scores (each model in buckets of its own scale)",
                                       labels=["model"])
        ks = GaugeMetricFamily("anomaly_drift_ks_statistic", "KS statistic of the recent scores against the calibration's",
                               labels=["model"])
        pv = GaugeMetricFamily("anomaly_drift_ks_pvalue", "KS p-value of the recent scores against the calibration's",
                               labels=["model"])
        psi = GaugeMetricFamily("anomaly_drift_psi", "Population stability index of the recent scores", labels=["model"])
        alarm = GaugeMetricFamily("anomaly_drift_alarm", "1 when the recent scores drifted from the calibration's",
                                  labels=["model"])
        window = GaugeMetricFamily("anomaly_drift_window_scores", "Recent scores held for the drift comparison",
                                   labels=["model"])
        for m in models:
            depth.add_metric([m.name], m.batcher.depth)
            admitted.add_metric([m.name], m.batcher.admitted)
            t = m.runtime.threshold
            if t is not None:
                threshold.add_metric([m.name], t)
            buckets, total = m.score_histogram.buckets()
            scores.add_metric([m.name], buckets, total)
            if m.drift.has_reference:
                st = m.drift.status()
                window.add_metric([m.name], st.scores)
                alarm.add_metric([m.name], float(st.alarm))
                if st.ks_statistic is not None:
                    ks.add_metric([m.name], st.ks_statistic)
                    pv.add_metric([m.name], st.ks_pvalue)
                    psi.add_metric([m.name], st.psi)
        ready = GaugeMetricFamily("anomaly_ready", "1 when the service takes requests (loaded, not draining)")
        ready.add_metric([], float(self._ready()))
        yield from (depth, admitted, threshold, scores, ks, pv, psi, alarm, window, ready)


class ServiceMetrics:
    """The metrics of one service (its own registry, so several services in a process do not clash).

    Args:
        models: returns the served models (objects with ``name``, ``batcher``, ``runtime``,
            ``drift`` and ``score_histogram``).
        ready: returns whether the service is ready.
        max_batch: the largest batch (the batch-size histogram's last bucket).
    """

    def __init__(self, models: Callable[[], Sequence[Any]], ready: Callable[[], bool], max_batch: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.request_duration = Histogram("anomaly_request_duration_seconds", "Request duration, arrival to response",
                                          ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_duration = Histogram("anomaly_queue_duration_seconds", "Queued to batch start, per image",
                                        ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inference_duration = Histogram("anomaly_inference_duration_seconds", "One batch: graph, calibration, regions",
                                            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        sizes = [float(1 << k) for k in range(max(0, int(max_batch).bit_length()))]
        self.batch_size = Histogram("anomaly_batch_size", "Images per batch", ["model"], buckets=sizes,
                                    registry=self.registry)
        self.refusal_duration = Histogram("anomaly_refusal_seconds",
                                          "429 answers: the request reaching the app to the answer's start",
                                          ["model"], buckets=_REFUSAL_BUCKETS, registry=self.registry)
        self.requests = Counter("anomaly_requests", "Requests by model, endpoint and status code",
                                ["model", "endpoint", "code"], registry=self.registry)
        self.registry.register(_ModelCollector(models, ready))

    def batch(self, model: str, size: int, inference_s: float, queue_s: Sequence[float]) -> None:
        """Record one batch (called from the batcher's thread)."""
        self.batch_size.labels(model).observe(size)
        self.inference_duration.labels(model).observe(inference_s)
        q = self.queue_duration.labels(model)
        for s in queue_s:
            q.observe(s)

    def request(self, model: str, endpoint: str, code: int, seconds: float) -> None:
        """Record one answered request."""
        self.requests.labels(model, endpoint, str(code)).inc()
        self.request_duration.labels(model, endpoint).observe(seconds)

    def refusal(self, model: str, seconds: float) -> None:
        """Record one 429's time in the server (see ``anomaly_refusal_seconds``)."""
        self.refusal_duration.labels(model).observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format of everything."""
        return generate_latest(self.registry)

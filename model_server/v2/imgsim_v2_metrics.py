"""The v1 server's metrics for the Open Inference Protocol runtime (imgsim_v2.py), on MLServer's metrics endpoint.

A module of their own because MLServer imports a model's runtime module again when it loads the model
(``importlib.reload`` in mlserver.settings, 1.7.1): metrics defined there would be registered twice, which
prometheus_client refuses. This module is imported once per process like any other.

They go in prometheus_client's default registry: the one MLServer's endpoint serves with ``parallel_workers`` 0
(``mlserver.log``'s own registry is not served then, in MLServer 1.7.1)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from imgsim.serve.query import INDEX_SIZE, QUERIES, REJECTED, STAGES, TIMER, Answer, metrics_of, stage_metric

queries = Counter(QUERIES, "queries answered (one per image or id)", labelnames=["model_name"])
rejected = Counter(REJECTED, "requests refused as bad input (400)", labelnames=["model_name"])
index_size = Gauge(INDEX_SIZE, "gallery images the serving version holds")
stages = {stage: Histogram(stage_metric(stage), f"time to {stage} a request's images",
                           labelnames=["model_name"]) for stage in STAGES}
_by_name = {QUERIES: queries, **{stage_metric(stage): histogram for stage, histogram in stages.items()}}


def record(model_name: str, answer: Answer) -> None:
    """An answered request's metrics (imgsim.serve.query.metrics_of); timers observed in seconds, Prometheus' unit."""
    for metric in metrics_of(answer):
        instrument = _by_name[metric.name].labels(model_name)
        if metric.kind == TIMER:
            instrument.observe(metric.value / 1000)
        else:
            instrument.inc(metric.value)

"""The v1 server's metrics for the Open Inference Protocol runtime (imgsim_v2.py), on MLServer's metrics endpoint.

A module of their own because MLServer imports a model's runtime module again when it loads the model
(``importlib.reload`` in mlserver.settings, 1.7.1): metrics defined there would be registered twice, which
prometheus_client refuses. This module is imported once per process like any other.

They go in prometheus_client's default registry: the one MLServer's endpoint serves with ``parallel_workers`` 0
(``mlserver.log``'s own registry is not served then, in MLServer 1.7.1)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STAGES = ("decode", "embed", "search")

queries = Counter("imgsim_queries", "queries answered (one per image or id)", labelnames=["model_name"])
rejected = Counter("imgsim_rejected_requests", "requests refused as bad input (400)", labelnames=["model_name"])
index_size = Gauge("imgsim_index_size", "gallery images the serving version holds")
stages = {stage: Histogram(f"imgsim_{stage}_seconds", f"time to {stage} a request's images",
                           labelnames=["model_name"]) for stage in STAGES}

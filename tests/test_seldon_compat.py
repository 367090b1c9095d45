"""The seldon-core fixes (imgsim.serve.seldon), checked in the Seldon wrapper's own environment (seldon-core 1.19
on Python 3.12): the cheaper histogram update must count exactly like Seldon's numpy one."""

from __future__ import annotations

import pytest

from support.servers import in_serve_env

COUNTS = """
import json
import numpy as np
from seldon_core.metrics import BINS
from imgsim.serve import seldon as seldon_compat

def seldon_reference(x, vals, sumv):  # seldon_core.metrics.SeldonMetrics._update_hist as shipped
    return list(np.array(vals) + np.histogram([x], BINS)[0]), sumv + x

edges = [b for b in BINS if np.isfinite(b)]
values = [-1.0, 0.0, 1e-4, *edges, *(np.nextafter(b, -1) for b in edges[1:]), 29.99, 1e6,
          *np.random.default_rng(0).exponential(0.01, 200)]
start = list(np.random.default_rng(1).integers(0, 5, len(BINS) - 1).astype(float))
rows = []
for x in values:
    vals, total = seldon_compat.update_histogram(x, start, 2.5)
    want_vals, want_total = seldon_reference(x, start, 2.5)
    rows.append({"x": float(x), "vals": vals, "want_vals": [float(v) for v in want_vals], "total": total,
                 "want_total": float(want_total), "floats": all(type(v) is float for v in vals)})
print(json.dumps(rows))
"""

SAMPLES = """
import json
from seldon_core.metrics import SeldonMetrics
from imgsim.serve import seldon as seldon_compat

seldon_compat.install()
metrics = SeldonMetrics()
for ms in (0.5, 3.0, 3.0, 250.0):
    metrics.update([{"type": "TIMER", "key": "imgsim_embed_seconds", "value": ms}], "predict")
(family,) = [f for f in metrics.collect() if f.name == "imgsim_embed_seconds"]
print(json.dumps([[s.name, s.labels.get("le"), s.value] for s in family.samples]))
"""


def test_histogram_update_counts_like_seldons():
    rows = in_serve_env(COUNTS)
    assert len(rows) > 200
    for row in rows:
        assert row["vals"] == row["want_vals"] and row["total"] == pytest.approx(row["want_total"]), row["x"]
        assert row["floats"]  # plain floats: what makes the IPC pickles small


def test_installed_patch_feeds_the_prometheus_histogram():
    samples = {(name, le): value for name, le, value in in_serve_env(SAMPLES)}
    assert samples[("imgsim_embed_seconds_count", None)] == 4
    assert samples[("imgsim_embed_seconds_sum", None)] == pytest.approx(0.2565)
    assert samples[("imgsim_embed_seconds_bucket", "0.001")] == 1  # cumulative buckets, seconds
    assert samples[("imgsim_embed_seconds_bucket", "+Inf")] == 4

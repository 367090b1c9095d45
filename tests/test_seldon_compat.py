"""The seldon-core 1.18 fixes: the cheaper histogram update must count exactly like Seldon's numpy one."""

from __future__ import annotations

import numpy as np
import pytest
from seldon_core.metrics import BINS, SeldonMetrics

from imgsim.serve import seldon as seldon_compat


def seldon_reference(x: float, vals: list, sumv: float):
    """seldon_core.metrics.SeldonMetrics._update_hist as shipped in 1.18.2."""
    hist = np.histogram([x], BINS)[0]
    return list(np.array(vals) + hist), sumv + x


EDGES = [b for b in BINS if np.isfinite(b)]
VALUES = [-1.0, 0.0, 1e-4, *EDGES, *(np.nextafter(b, -1) for b in EDGES[1:]), 29.99, 1e6,
          *np.random.default_rng(0).exponential(0.01, 200)]


def test_histogram_update_counts_like_seldons():
    start = list(np.random.default_rng(1).integers(0, 5, len(BINS) - 1).astype(float))
    for x in VALUES:
        vals, total = seldon_compat.update_histogram(x, start, 2.5)
        expected_vals, expected_total = seldon_reference(x, start, 2.5)
        assert vals == [float(v) for v in expected_vals] and total == pytest.approx(expected_total), x
        assert all(type(v) is float for v in vals)  # plain floats: what makes the IPC pickles small


def test_installed_patch_feeds_the_prometheus_histogram():
    seldon_compat.install()
    metrics = SeldonMetrics()
    for ms in (0.5, 3.0, 3.0, 250.0):
        metrics.update([{"type": "TIMER", "key": "imgsim_embed_seconds", "value": ms}], "predict")
    (family,) = [f for f in metrics.collect() if f.name == "imgsim_embed_seconds"]
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[("imgsim_embed_seconds_count", None)] == 4
    assert samples[("imgsim_embed_seconds_sum", None)] == pytest.approx(0.2565)
    assert samples[("imgsim_embed_seconds_bucket", "0.001")] == 1  # cumulative buckets, seconds
    assert samples[("imgsim_embed_seconds_bucket", "+Inf")] == 4

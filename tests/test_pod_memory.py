"""A colour bundle fits its pod (issue 40): the chart's memory limit for the server container, rendered with the real
Helm engine, against what bench/pod_memory.py measured on the real servers at the chart's default worker settings
(bench/results/pod_memory.json), and docs/capacity.md quoting the same figures."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml

from tests.test_deploy import REPO, sdep

RESULTS = REPO / "bench" / "results" / "pod_memory.json"
CAPACITY = REPO / "docs" / "capacity.md"
ITEMS = 100_000  # the gallery
HEADROOM = 0.6  # PSS after queries at most 60 % of the limit
PROTOCOLS = ("seldon", "v2")
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def mib(quantity: str | int) -> float:
    """A Kubernetes memory quantity in MiB."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity)).groups()
    return float(number) * UNITS.get(unit, 1) / 2**20


def server_memory(values: dict) -> dict:
    """The server container's memory requests and limits in MiB, from the rendered SeldonDeployment."""
    (component,) = sdep(values)["spec"]["predictors"][0]["componentSpecs"]
    (container,) = component["spec"]["containers"]
    return {kind: mib(container["resources"][kind]["memory"]) for kind in ("requests", "limits")}


def measured(protocol: str) -> dict:
    """The recorded row of ``protocol``'s server at 10^5 items with the most PSS after queries."""
    rows = [r for r in json.loads(RESULTS.read_text())["rows"] if r["protocol"] == protocol and r["items"] == ITEMS]
    assert rows, f"{RESULTS.name} has no {protocol} row at {ITEMS:,} items: run python -m bench.pod_memory"
    return max(rows, key=lambda r: r["after_pss_mb"])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_colour_bundle_of_1e5_images_leaves_headroom_under_the_chart_s_memory_limit(protocol):
    row, memory = measured(protocol), server_memory({"server": {"protocol": protocol}})
    assert row["after_pss_mb"] <= HEADROOM * memory["limits"], (
        f"{row['server']} measured {row['after_pss_mb']:.0f} MiB PSS after queries at {ITEMS:,} items: over "
        f"{HEADROOM:.0%} of the chart's {memory['limits']:.0f} MiB limit (resources.limits.memory)")
    # The scheduler places the pod by its request: it holds what the server keeps after queries, within the limit.
    assert row["after_pss_mb"] <= memory["requests"] <= memory["limits"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_headroom_check_fails_for_a_limit_without_it(protocol):
    row = measured(protocol)
    tight = f"{math.floor(row['after_pss_mb'] / HEADROOM) - 1}Mi"  # one MiB short of the headroom
    memory = server_memory({"server": {"protocol": protocol},
                            "resources": {"requests": {"memory": "256Mi"}, "limits": {"memory": tight}}})
    assert memory["limits"] == mib(tight) and row["after_pss_mb"] > HEADROOM * memory["limits"]


def test_capacity_doc_quotes_the_measured_figures():
    text = CAPACITY.read_text()
    section = text[text.index("## A colour bundle in its pod"):]
    end = section.find("\n## ")
    section = section if end < 0 else section[:end]
    limit = server_memory({})["limits"]
    assert f"{limit:,.0f} MiB" in section
    for protocol in PROTOCOLS:
        row = measured(protocol)
        start = f"| {row['server']} | {row['bundle']} | {row['items']:,} |"
        (line,) = [line for line in section.splitlines() if line.startswith(start)]
        for figure in (f"{row['idle_pss_mb']:,.0f} MiB", f"{row['after_pss_mb']:,.0f} MiB",
                       f"{row['after_pss_mb'] / limit:.0%}"):
            assert figure in line, f"docs/capacity.md's {row['server']} row does not quote {figure}: {line}"


def test_the_figures_were_measured_with_the_chart_s_current_worker_settings():
    # More workers or threads would hold more: figures measured with other settings say nothing of this chart.
    server = yaml.safe_load((REPO / "charts" / "imgsim" / "values.yaml").read_text())["server"]
    recorded = json.loads(RESULTS.read_text())["chart"]["server"]
    assert recorded and {key: server[key] for key in recorded} == recorded, (
        "the chart's server settings changed since bench/pod_memory.py measured: run it again")

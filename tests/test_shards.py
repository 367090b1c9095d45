"""Sharded extraction: shard processes plus a merge give the bundle one process gives; bad groups are refused."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import mlflow
import numpy as np
import pytest

from imgsim.bundle import ServingBundle
from imgsim.errors import ImgsimError
from imgsim.nn.model import TrainedModel
from imgsim.runs.export import fetched_bundle
from imgsim.runs.extract import run_extract
from imgsim.stages.extract import shard_range
from imgsim.stages.settings import ExtractConfig
from support.store import mlflow_store
from tests.bundles import other_model_bundle

pytestmark = pytest.mark.slow


def _shards(model_uri: str, group: str, shards, num_shards: int = 3, index_env: bool = False, manifest_uri: str = ""):
    """Run shard processes in parallel, the way an Indexed Job's pods would (one of them by JOB_COMPLETION_INDEX)."""
    procs = []
    for shard in shards:
        cmd = [sys.executable, "-m", "imgsim.cli", "extract", "--model-uri", model_uri, "--num-shards", str(num_shards),
               "--shard-group", group, "--gallery-name", "", "--threads", "1"]
        cmd += ["--manifest-uri", manifest_uri] if manifest_uri else []
        env = dict(os.environ)
        if index_env and shard == 0:
            env["JOB_COMPLETION_INDEX"] = "0"
        else:
            cmd += ["--shard", str(shard)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]


def _bundle(run_id: str) -> tuple[ServingBundle, str]:
    """The bundle an extract run wrote, and its model's fingerprint (the values of its weights)."""
    with fetched_bundle(f"runs:/{run_id}") as folder:
        return ServingBundle.load(folder), TrainedModel.load(folder).fingerprint()


def _extract_runs() -> int:
    return len(mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string="tags.`imgsim.stage` = 'extract'"))


def test_three_shards_and_a_merge_equal_one_process(pipeline_run):
    group = f"g-{uuid.uuid4().hex[:6]}"
    with mlflow_store(pipeline_run["work"]):
        model = pipeline_run["result"]["model_uri"]
        _shards(model, group, range(3), index_env=True)
        merged, merged_model = _bundle(run_extract(ExtractConfig(merge=group, gallery_name="")))
        single_id = run_extract(ExtractConfig(model_uri=model, gallery_name=""))
        single, single_model = _bundle(single_id)
        merge_run = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1,
                                       filter_string=f"tags.`imgsim.shard_group` = '{group}' and "
                                                     "tags.`imgsim.stage` = 'extract'")[0]
        single_metrics = mlflow.get_run(single_id).data.metrics
    assert merged.index.items == single.index.items  # same ids, paths, labels, hashes, in the same order
    np.testing.assert_allclose(np.asarray(merged.index.embeddings), np.asarray(single.index.embeddings), atol=1e-5)
    assert merged_model == single_model  # the same model's values
    assert len(merge_run.data.tags["imgsim.shard_runs"].split(",")) == 3
    for key in ("map_at_r", "precision_at_10", "accuracy"):
        assert merge_run.data.metrics[key] == pytest.approx(single_metrics[key], abs=1e-6)


def test_shard_ranges_cover_every_item_once():
    for n in (0, 1, 2, 7, 100):
        for shards in (1, 2, 3, 8):
            covered = [i for s in range(shards) for i in range(*shard_range(n, s, shards))]
            assert covered == list(range(n))


@pytest.mark.parametrize("case", ["missing", "repeated", "foreign model", "no shards"])
def test_a_bad_group_is_refused_and_logs_no_extract(pipeline_run, tmp_path, case):
    group = f"bad-{uuid.uuid4().hex[:6]}"
    with mlflow_store(pipeline_run["work"]):
        model = pipeline_run["result"]["model_uri"]
        manifest = f"runs:/{pipeline_run['result']['split']}/split"
        if case == "missing":
            _shards(model, group, [0, 2])
        elif case == "repeated":
            _shards(model, group, [0, 1, 1, 2])
        elif case == "foreign model":
            with fetched_bundle(pipeline_run["result"]["bundle_uri"]) as folder:
                other = other_model_bundle(folder, tmp_path / "other")
            _shards(model, group, [0, 1])
            _shards(str(other), group, [2], manifest_uri=manifest)
        before = _extract_runs()
        with pytest.raises(ImgsimError) as err:
            run_extract(ExtractConfig(merge=group, gallery_name=""))
        assert _extract_runs() == before
    expected = {"missing": "missing [1]", "repeated": "more than once [1]", "foreign model": "different model_fingerprint",
                "no shards": "no finished shard runs"}[case]
    assert expected in str(err.value)


def test_a_shard_outside_the_range_is_a_clear_error(pipeline_run):
    with mlflow_store(pipeline_run["work"]):
        with pytest.raises(ImgsimError, match="shard must be in 0..2"):
            run_extract(ExtractConfig(model_uri=pipeline_run["result"]["model_uri"], num_shards=3, shard=3,
                                      shard_group="x"))
        with pytest.raises(ImgsimError, match="needs --shard-group"):
            run_extract(ExtractConfig(model_uri=pipeline_run["result"]["model_uri"], num_shards=3, shard=0))

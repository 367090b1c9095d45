"""imgsim rollout: the patched SeldonDeployment validates against the operator's CRD; the API calls it makes."""

from __future__ import annotations

import copy
import json

import pytest
from mlflow.tracking import MlflowClient

from imgsim.errors import ImgsimError
from imgsim.runs import rollout, tracking
from support.store import mlflow_store
from tests.test_deploy import SELDON_SCHEMA, VARIANTS, crd_check, sdep


def crd_errors(docs: list[dict], tmp_path) -> str:
    result = crd_check(docs, SELDON_SCHEMA, tmp_path)
    return result.stdout + result.stderr if result.returncode else ""


class FakeCustomObjects:
    """The two CustomObjectsApi calls rollout makes, against one stored object (no cluster here)."""

    def __init__(self, obj: dict | None, status: int | None = None, changed_meanwhile: bool = False) -> None:
        self.obj, self.status, self.patches, self.changed_meanwhile = obj, status, [], changed_meanwhile
        if obj is not None:
            obj.setdefault("metadata", {})["resourceVersion"] = "41"

    def _fail(self, status):
        if status:
            error = RuntimeError(f"({status}) Reason: fake")
            error.status = status
            raise error

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self._fail(self.status)
        assert (group, version, plural) == ("machinelearning.seldon.io", "v1", "seldondeployments")
        answer = copy.deepcopy(self.obj)
        if self.changed_meanwhile:  # someone else's helm upgrade lands between our read and our patch
            self.obj["metadata"]["resourceVersion"] = "42"
        return answer

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body, **kwargs):
        # The API server's optimistic concurrency: a resourceVersion in the patch must still be current.
        self._fail(409 if body["metadata"].get("resourceVersion") not in (None, self.obj["metadata"]["resourceVersion"])
                   else None)
        self.patches.append((namespace, name, body, kwargs))
        return body


@pytest.mark.parametrize("variant", ["defaults", "pvc-with-secret", "no-autoscaling"])
def test_the_patched_seldondeployment_validates_and_changes_only_the_model_uri(variant, tmp_path):
    before = sdep(VARIANTS[variant])
    after = rollout.patched(before, "s3://bucket/galleries/v7", requested="models:/imgsim-gallery/7")
    assert crd_errors([after], tmp_path) == ""
    assert after["spec"]["predictors"][0]["graph"]["modelUri"] == "s3://bucket/galleries/v7"
    assert after["metadata"]["annotations"][rollout.ANNOTATION] == "models:/imgsim-gallery/7"
    undo = copy.deepcopy(after)
    undo["spec"]["predictors"][0]["graph"]["modelUri"] = before["spec"]["predictors"][0]["graph"]["modelUri"]
    del undo["metadata"]["annotations"]
    assert undo == before  # nothing else moved: replicas, probes, resources all as the chart rendered them


@pytest.mark.parametrize("protocol", ["seldon", "v2"])
def test_a_registered_version_s_digest_reaches_the_server_setting(protocol, tmp_path):
    before = sdep({"server": {"protocol": protocol}})
    after = rollout.patched(before, "s3://bucket/galleries/v7", requested="models:/imgsim-gallery/7", digest="ab" * 32)
    assert crd_errors([after], tmp_path) == ""
    predictor = after["spec"]["predictors"][0]
    if protocol == "seldon":
        params = {p["name"]: p["value"] for p in predictor["graph"]["parameters"]}
        assert params[rollout.DIGEST_PARAMETER] == "ab" * 32
    else:
        (container,) = predictor["componentSpecs"][0]["spec"]["containers"]
        assert {"name": rollout.DIGEST_ENV, "value": "ab" * 32} in container["env"]
    # A later rollout of an unregistered bundle clears it: no stale digest refuses the new files.
    again = rollout.patched(after, "s3://bucket/galleries/v8")
    assert rollout.DIGEST_PARAMETER not in json.dumps(again) and rollout.DIGEST_ENV not in json.dumps(again)


def test_the_schema_check_would_catch_a_bad_patch(tmp_path):
    broken = rollout.patched(sdep({}), "s3://bucket/x")
    broken["spec"]["predictors"][0]["graph"]["modelURI"] = "s3://typo"
    assert "modelURI: unknown field" in crd_errors([broken], tmp_path)


def test_rollout_sends_a_merge_patch_of_the_predictors():
    api = FakeCustomObjects(sdep({}))
    result = rollout.rollout("sim-imgsim", "s3://bucket/galleries/v8", namespace="imgsim", api=api)
    ((namespace, name, body, kwargs),) = api.patches
    assert (namespace, name, kwargs) == ("imgsim", "sim-imgsim", {})
    assert body["spec"]["predictors"][0]["graph"]["modelUri"] == "s3://bucket/galleries/v8"
    assert set(body) == {"metadata", "spec"} and set(body["spec"]) == {"predictors"}
    assert body["metadata"]["resourceVersion"] == "41"  # the patch is conditional on what was read
    assert result["previous"] == ["s3://my-imgsim-bucket/bundles/v1"] and not result["dry_run"]
    rollout.rollout("sim-imgsim", "s3://bucket/galleries/v8", namespace="imgsim", api=api, dry_run=True)
    assert api.patches[-1][3] == {"dry_run": "All"}


@pytest.mark.parametrize("status, message", [(404, "not found"), (403, "forbidden"), (422, "validation")])
def test_api_failures_say_what_failed(status, message):
    with pytest.raises(ImgsimError, match=f"cannot read SeldonDeployment nope.*{message}"):
        rollout.rollout("nope", "s3://bucket/x", namespace="imgsim", api=FakeCustomObjects(None, status))


def test_a_change_between_read_and_patch_is_refused_not_overwritten():
    api = FakeCustomObjects(sdep({}), changed_meanwhile=True)
    with pytest.raises(ImgsimError, match="cannot patch SeldonDeployment sim-imgsim.*changed since it was read"):
        rollout.rollout("sim-imgsim", "s3://bucket/galleries/v8", namespace="imgsim", api=api)
    assert not api.patches


@pytest.mark.parametrize("url", ["https://example.com/bundle.tar.gz", "http://10.0.0.1/bundle"])
def test_a_web_address_is_not_a_bundle_source(url):
    with pytest.raises(ImgsimError, match="web address: rollout takes bundles from the cluster's storage only"):
        rollout.rollout("sim-imgsim", url, namespace="imgsim", api=FakeCustomObjects(sdep({})))


def test_an_unknown_predictor_and_a_local_bundle_are_refused():
    with pytest.raises(ImgsimError, match="no predictor blue"):
        rollout.patched(sdep({}), "s3://bucket/x", predictor="blue")
    with pytest.raises(ImgsimError, match="local path, which the cluster cannot read"):
        rollout.storage("bundles/demo")


def _nodes(graph: dict) -> list[dict]:
    return [graph, *(node for child in graph.get("children") or [] for node in _nodes(child))]


def test_a_sharded_release_gets_each_part_s_folder_and_nothing_else_moves(tmp_path):
    before = sdep(VARIANTS["sharded-serving"])
    graph = before["spec"]["predictors"][0]["graph"]
    shards = int(next(p["value"] for p in graph["parameters"] if p["name"] == "shards"))
    # A stale digest on one part (a hand edit): each part has its own bundle.json, so rollout clears it.
    _nodes(graph)[-1]["parameters"].append({"name": rollout.DIGEST_PARAMETER, "type": "STRING", "value": "ab" * 32})
    after = rollout.patched(before, "s3://bucket/galleries/v8-sharded/", requested="s3://bucket/galleries/v8-sharded/")
    assert crd_errors([after], tmp_path) == ""
    uris = {node["name"]: node.get("modelUri") for node in _nodes(after["spec"]["predictors"][0]["graph"])}
    assert uris == {"embedder": "s3://bucket/galleries/v8-sharded/embedder", "merger": None,
                    **{f"shard-{i}": f"s3://bucket/galleries/v8-sharded/shard-{i}" for i in range(shards)}}
    assert rollout.DIGEST_PARAMETER not in json.dumps(after)
    undo = copy.deepcopy(after)
    for new, old in zip(_nodes(undo["spec"]["predictors"][0]["graph"]), _nodes(graph)):
        if "modelUri" in old:
            new["modelUri"] = old["modelUri"]
    _nodes(graph)[-1]["parameters"].pop()
    del undo["metadata"]["annotations"]
    assert undo == before  # only the parts' folders moved


def test_rollout_of_a_sharded_release_patches_every_part():
    api = FakeCustomObjects(sdep(VARIANTS["sharded-serving"]))
    result = rollout.rollout("sim-imgsim", "s3://bucket/galleries/v8", namespace="imgsim", api=api)
    ((_, _, body, _),) = api.patches
    loads = sorted(node["modelUri"] for node in _nodes(body["spec"]["predictors"][0]["graph"]) if "modelUri" in node)
    assert loads == ["s3://bucket/galleries/v8/embedder", "s3://bucket/galleries/v8/shard-0",
                     "s3://bucket/galleries/v8/shard-1", "s3://bucket/galleries/v8/shard-2"]
    assert result["previous"] == ["s3://my-imgsim-bucket/bundles/v1"]  # the folder the chart's parts came from


def test_a_sharded_release_refuses_what_is_not_a_sharded_gallery():
    sharded = sdep(VARIANTS["sharded-serving"])
    with pytest.raises(ImgsimError, match=r"serves a sharded gallery \(3 shards\) and models:/imgsim-gallery/7 is "
                                          r"one whole bundle: write its parts \(imgsim export --uri "
                                          r"models:/imgsim-gallery/7 --out DIR; imgsim shard-bundle DIR --shards 3 "
                                          r"--out OUT\)"):
        rollout.patched(sharded, "s3://bucket/mlflow/1/abc/artifacts/bundle", requested="models:/imgsim-gallery/7",
                        digest="ab" * 32)
    for part in ("embedder", "shard-2/"):
        with pytest.raises(ImgsimError, match="is one part of a sharded gallery: roll out the folder that holds its "
                                              "embedder/ and shard-0/ ... shard-2/"):
            rollout.patched(sharded, f"s3://bucket/galleries/v8/{part}")
    incomplete = copy.deepcopy(sharded)
    merger = incomplete["spec"]["predictors"][0]["graph"]["children"][0]
    merger["children"] = merger["children"][:-1]
    with pytest.raises(ImgsimError, match=r"looks like a sharded gallery's graph but its nodes load \['embedder', "
                                          r"'shard-0', 'shard-1'\], not embedder and shard-0 ... shard-2"):
        rollout.patched(incomplete, "s3://bucket/galleries/v8")


def test_registry_uris_resolve_to_where_the_bundle_is_stored(pipeline_run):
    with mlflow_store(pipeline_run["work"]):
        tracking.setup()
        client = MlflowClient()
        name = "rollout-gallery"
        client.create_registered_model(name)
        version = client.create_model_version(name, "s3://bucket/mlflow/1/abc/artifacts/bundle", None,
                                              tags={tracking.KIND_TAG: "bundle",
                                                    tracking.BUNDLE_SHA_TAG: "cd" * 32}).version
        client.set_registered_model_alias(name, "serving", version)
        assert rollout.storage(f"models:/{name}@serving") == ("s3://bucket/mlflow/1/abc/artifacts/bundle", "cd" * 32)
        unvouched = client.create_model_version(name, "s3://bucket/mlflow/1/def/artifacts/bundle", None,
                                                tags={tracking.KIND_TAG: "bundle"}).version
        with pytest.raises(ImgsimError, match=f"no {tracking.BUNDLE_SHA_TAG} tag"):
            rollout.storage(f"models:/{name}/{unvouched}")
        with pytest.raises(ImgsimError, match="which the cluster cannot read"):  # this store keeps files locally
            rollout.storage(pipeline_run["result"]["bundle_uri"])

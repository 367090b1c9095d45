"""Point a running SeldonDeployment at another bundle through the Kubernetes API: the predictor rolls."""

from __future__ import annotations

import copy
import re
from typing import Any

from imgsim.errors import ImgsimError
from imgsim.bundle_format import EMBEDDER, SHARD
from imgsim.sharded import part_name

GROUP, VERSION, PLURAL = "machinelearning.seldon.io", "v1", "seldondeployments"
ANNOTATION = "imgsim.io/bundle"  # what the user asked for (a models:/ URI, say), beside the storage URI it became
# The cluster's storage that Seldon's storage initializer copies into /mnt/models. Not http(s):// (the
# initializer fetches those too): a serving bundle comes from storage the deployment's role can read, not
# from whatever web address a person or a compromised registry entry names.
CLUSTER_SCHEMES = ("s3://", "gs://", "pvc://", "azure://", "wasbs://")


DIGEST_PARAMETER = "bundle_sha256"  # the server setting each node checks /mnt/models/bundle.json against
DIGEST_ENV = "IMGSIM_BUNDLE_SHA256"  # the same under protocol v2 (MLServer reads no graph parameters)


def storage(bundle: str) -> tuple[str, str]:
    """The URI the cluster fetches ``bundle`` from: itself when it is already a storage URI, else where MLflow
    keeps the bundle artifact of a ``runs:/`` or ``models:/`` URI (an alias resolved to its version now); and the
    sha256 the registry recorded for a registered version's bundle.json ("" for anything else)."""
    if bundle.startswith(CLUSTER_SCHEMES):
        return bundle, ""
    if bundle.startswith(("http://", "https://")):
        raise ImgsimError(f"{bundle!r} is a web address: rollout takes bundles from the cluster's storage only "
                          f"({', '.join(CLUSTER_SCHEMES)}) or a runs:/ / models:/ URI stored there; upload it first")
    if not bundle.startswith(("runs:/", "models:/")):
        raise ImgsimError(f"{bundle!r} is a local path, which the cluster cannot read: upload the bundle "
                          "(imgsim export, then aws s3 sync) and pass its s3:// URI, or pass the runs:/ or "
                          "models:/ URI of a bundle in an MLflow store whose artifacts live in S3")
    from mlflow.tracking import MlflowClient

    from imgsim.runs.export import locate_bundle, vouched_digest
    from imgsim.runs.tracking import BASE_TAG

    pinned, version = locate_bundle(bundle)
    client = MlflowClient()
    digest = ""
    if pinned.startswith("models:/"):
        name = pinned.removeprefix("models:/").split("/")[0]
        location = client.get_model_version_download_uri(name, version)
        tags = client.get_model_version(name, version).tags or {}
        base, digest = tags.get(BASE_TAG), vouched_digest(pinned, tags)
    else:
        run_id, _, path = pinned.removeprefix("runs:/").partition("/")
        run = client.get_run(run_id)
        location, base = f"{run.info.artifact_uri.rstrip('/')}/{path}", run.data.tags.get(BASE_TAG)
    if base:
        # The storage initializer copies one folder; a version of changes needs its base beside it.
        raise ImgsimError(f"{bundle} is stored as its changes over the gallery version {base}, and the cluster's "
                          "storage initializer copies one folder: export it (imgsim export --uri "
                          f"{bundle} --out DIR writes it with its base), upload DIR and roll out its s3:// URI; or "
                          "write the next change with --full")
    if not location.startswith(CLUSTER_SCHEMES):
        raise ImgsimError(f"{bundle} is stored at {location}, which the cluster cannot read: run the MLflow "
                          "server with an S3 artifact store (--artifacts-destination s3://...), or export the "
                          "bundle and upload it")
    return location, digest


def patched(sdep: dict, model_uri: str, predictor: str = "", requested: str = "", digest: str = "") -> dict:
    """A copy of the SeldonDeployment ``sdep`` whose graph node(s) load ``model_uri`` and check its bundle.json against
    ``digest`` (the registry's record; "" clears a previous one). In a sharded release (the chart's serving.shards)
    ``model_uri`` is the folder `imgsim shard-bundle` wrote: each node loads its own part, ``<model_uri>/embedder`` or
    ``<model_uri>/shard-<i>``, and checks no digest (each part has its own bundle.json). Only those change: the
    operator then rolls each predictor's Deployment, new pods ready before old ones go."""
    new = copy.deepcopy(sdep)
    predictors = [p for p in new.get("spec", {}).get("predictors", []) if not predictor or p.get("name") == predictor]
    if not predictors:
        names = [p.get("name") for p in new.get("spec", {}).get("predictors", [])]
        raise ImgsimError(f"SeldonDeployment {sdep.get('metadata', {}).get('name')} has no predictor "
                          f"{predictor or '(none at all)'}; it has {names}")
    changed = 0
    for p in predictors:
        nodes = _bundle_nodes(p)
        if any(part for _, part in nodes):
            _check_sharded(requested or model_uri, len(nodes) - 1, digest)
        for node, part in nodes:
            node["modelUri"] = f"{model_uri.rstrip('/')}/{part}" if part else model_uri
            _set_digest(p, node, "" if part else digest, new.get("spec", {}).get("protocol") == "v2")
            changed += 1
    if not changed:
        raise ImgsimError("the SeldonDeployment's graph has no MODEL node with a modelUri: a release that serves "
                          "from the registry (model.uri models:/...) follows its alias, so move the alias instead "
                          "(the pipeline identity); otherwise, is it an imgsim release?")
    new.setdefault("metadata", {}).setdefault("annotations", {})[ANNOTATION] = requested or model_uri
    return new


def _set_digest(predictor: dict, node: dict, digest: str, v2: bool) -> None:
    """The node's ``bundle_sha256`` setting: a graph parameter for Seldon's wrapper, its container's environment
    under protocol v2."""
    def upsert(owner: dict, key: str, entry: dict) -> None:
        if key in owner or digest:
            kept = [e for e in owner.get(key) or [] if e.get("name") != entry["name"]]
            owner[key] = kept + ([entry] if digest else [])

    if not v2:
        upsert(node, "parameters", {"name": DIGEST_PARAMETER, "type": "STRING", "value": digest})
        return
    for spec in predictor.get("componentSpecs") or []:
        for container in (spec.get("spec") or {}).get("containers") or []:
            if container.get("name") == node.get("name"):
                upsert(container, "env", {"name": DIGEST_ENV, "value": digest})


def _bundle_nodes(predictor: dict) -> list[tuple[dict, str]]:
    """The graph's nodes that load a bundle, each with the part of a sharded gallery it loads ("" for a whole
    bundle); a sharded graph must have the parts `imgsim shard-bundle` writes, each in one node."""
    nodes = list(_with_model_uri(predictor.get("graph", {})))
    counts = {_parameter(node, "shards") for node in nodes}
    if counts <= {None, 0}:
        return [(node, "") for node in nodes]
    parts = [(node, _part(node)) for node in nodes]
    shards = max(count for count in counts if count)
    want = [part_name(EMBEDDER)] + [part_name(SHARD, i) for i in range(shards)]
    if len(counts) != 1 or sorted(str(part) for _, part in parts) != sorted(want):
        raise ImgsimError(f"predictor {predictor.get('name')} looks like a sharded gallery's graph but its nodes "
                          f"load {sorted(str(part) for _, part in parts)[:6]}, not embedder and shard-0 ... "
                          f"shard-{shards - 1}: is it an imgsim release? If so, helm upgrade --set model.uri=... it")
    return parts


def _part(node: dict) -> str | None:
    if node.get("type") == "TRANSFORMER":
        return part_name(EMBEDDER)
    shard = _parameter(node, "shard")
    return None if shard is None else part_name(SHARD, shard)


def _parameter(node: dict, name: str) -> int | None:
    """An INT graph parameter's value (the chart writes them as strings), None when it has none."""
    for parameter in node.get("parameters") or []:
        if parameter.get("name") == name:
            try:
                return int(parameter.get("value"))
            except (TypeError, ValueError):
                return None
    return None


def _check_sharded(bundle: str, shards: int, digest: str) -> None:
    """Refuse what cannot be a sharded gallery's folder: a registry's bundle (one whole bundle) or one part."""
    if bundle.startswith(("runs:/", "models:/")) or digest:
        raise ImgsimError(f"the release serves a sharded gallery ({shards} shards) and {bundle} is one whole bundle: "
                          f"write its parts (imgsim export --uri {bundle} --out DIR; imgsim shard-bundle DIR --shards "
                          f"{shards} --out OUT), upload OUT and roll out its s3:// URI")
    last = bundle.rstrip("/").rsplit("/", 1)[-1]
    if last == EMBEDDER or re.fullmatch(rf"{SHARD}-\d+", last):
        raise ImgsimError(f"{bundle} is one part of a sharded gallery: roll out the folder that holds its embedder/ "
                          f"and shard-0/ ... shard-{shards - 1}/")


def _with_model_uri(node: dict):
    if "modelUri" in node:
        yield node
    for child in node.get("children") or []:
        yield from _with_model_uri(child)


def rollout(release: str, bundle: str, *, namespace: str = "", predictor: str = "", dry_run: bool = False,
            api: Any = None) -> dict:
    """Patch SeldonDeployment ``release`` to serve ``bundle``; with ``dry_run`` the API server validates the
    patch (against the installed CRD) without applying it. ``api``: a CustomObjectsApi (default: from the
    in-cluster service account or the kube config)."""
    uri, digest = storage(bundle)
    if api is None:
        api, namespace = _api(namespace)
    namespace = namespace or "default"
    current = _call(lambda: api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, release),
                    f"read SeldonDeployment {release} in namespace {namespace}")
    new = patched(current, uri, predictor, bundle, digest)
    # A merge patch replaces the predictors list whole, so it carries the resourceVersion it was built from:
    # the API server refuses it (409) if anyone changed the SeldonDeployment since it was read.
    body = {"metadata": {"annotations": {ANNOTATION: new["metadata"]["annotations"][ANNOTATION]},
                         "resourceVersion": current.get("metadata", {}).get("resourceVersion")},
            "spec": {"predictors": new["spec"]["predictors"]}}
    if body["metadata"]["resourceVersion"] is None:
        raise ImgsimError(f"SeldonDeployment {release} came back without a resourceVersion; cannot patch it safely")
    kwargs = {"dry_run": "All"} if dry_run else {}
    _call(lambda: api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, release, body, **kwargs),
          f"patch SeldonDeployment {release} in namespace {namespace}")
    # A sharded release's previous gallery is the folder its parts came from, as rollout takes it.
    before = sorted({node["modelUri"].removesuffix(f"/{part}") if part else node["modelUri"]
                     for p in current["spec"]["predictors"] for node, part in _bundle_nodes(p)})
    return {"release": release, "namespace": namespace, "model_uri": uri, "bundle_sha256": digest, "previous": before,
            "dry_run": dry_run}


def _api(namespace: str):
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError:
        raise ImgsimError("rollout needs the kubernetes package: pip install kubernetes") from None
    try:
        config.load_incluster_config()
        in_cluster = True
    except ConfigException:
        try:
            config.load_kube_config()
        except (ConfigException, OSError) as exc:
            raise ImgsimError(f"no Kubernetes credentials: {exc}. Run inside the cluster or set up a kube config "
                              "(aws eks update-kubeconfig --name CLUSTER)") from None
        in_cluster = False
    if not namespace:
        namespace = _current_namespace(in_cluster, config)
    return client.CustomObjectsApi(), namespace


def _current_namespace(in_cluster: bool, config) -> str:
    if in_cluster:
        try:
            with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                return f.read().strip()
        except OSError:
            return "default"
    try:
        return config.list_kube_config_contexts()[1]["context"].get("namespace", "default")
    except (KeyError, IndexError, TypeError):
        return "default"


def _call(fn, what: str):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - kubernetes.client.ApiException, urllib3 errors: say what failed
        status = getattr(exc, "status", None)
        reason = {404: "not found (check --release, the chart's full name, and --namespace)",
                  403: "forbidden (the service account or user needs get/patch on seldondeployments)",
                  409: "it changed since it was read (another rollout or a helm upgrade); run it again",
                  422: "refused by the API server's validation"}.get(status, str(exc).splitlines()[0][:300])
        raise ImgsimError(f"cannot {what}: {reason}") from None

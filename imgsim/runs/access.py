"""The tracking server's identities, one per role, on MLflow's basic-auth app: what `imgsim tracking-users` sets
up, idempotently, as the server's admin."""

from __future__ import annotations

import dataclasses
import os
import warnings

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

with warnings.catch_warnings():  # mlflow.server imports starlette's deprecated WSGI middleware: noise on a CLI
    warnings.simplefilter("ignore")
    from mlflow.server.auth.client import AuthServiceClient

from imgsim.errors import ImgsimError, redact
from imgsim.runs import tracking

# What each role may do to the experiment and the two registered models; nothing else is granted, and the server's
# default_permission (NO_PERMISSIONS on the cluster) covers everything else. The search page has no identity.
PIPELINE, SERVING = "EDIT", "READ"
PASSWORD_ENV = {"pipeline": "IMGSIM_PIPELINE_PASSWORD", "serving": "IMGSIM_SERVING_PASSWORD"}


@dataclasses.dataclass(frozen=True)
class Identities:
    pipeline_user: str = "imgsim-pipeline"
    serving_user: str = "imgsim-serving"
    experiment: str = tracking.EXPERIMENT
    model: str = "imgsim"
    gallery: str = "imgsim-gallery"


def set_up(ids: Identities) -> list[str]:
    """Create (or re-password) both users, the experiment and the registered models where missing, and grant each
    role its permissions; returns what it did, a line each. Runs as the admin named by MLFLOW_TRACKING_USERNAME."""
    uri = tracking.tracking_uri()
    if not uri.startswith(("http://", "https://")):
        raise ImgsimError(f"MLFLOW_TRACKING_URI must name the tracking server (http[s]://...), not {redact(uri)}")
    passwords = {role: os.environ.get(env, "") for role, env in PASSWORD_ENV.items()}
    missing = [PASSWORD_ENV[role] for role, password in passwords.items() if len(password) < 12]
    if missing:
        raise ImgsimError(f"set {' and '.join(missing)} to the new identities' passwords (12 characters or more); "
                          "nothing was changed")
    mlflow.set_tracking_uri(uri)
    auth, client, done = AuthServiceClient(uri), MlflowClient(), []
    try:
        for user, password in ((ids.pipeline_user, passwords["pipeline"]), (ids.serving_user, passwords["serving"])):
            done.append(_user(auth, user, password))
        experiment = client.get_experiment_by_name(ids.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(ids.experiment)
        done += [] if experiment else [f"created experiment {ids.experiment}"]
        for name in (ids.model, ids.gallery):
            done += _registered_model(client, name)
        for user, permission in ((ids.pipeline_user, PIPELINE), (ids.serving_user, SERVING)):
            done.append(_grant(auth, user, "experiment", experiment_id, permission, ids.experiment))
            done += [_grant(auth, user, "registered_model", name, permission, name) for name in (ids.model, ids.gallery)]
    except MlflowException as exc:
        raise tracking.access_error(exc) or ImgsimError(redact(f"the tracking server refused: {exc}")) from None
    return done


def _user(auth: AuthServiceClient, user: str, password: str) -> str:
    try:
        auth.create_user(user, password)
        return f"created user {user}"
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    auth.update_user_password(user, password)
    return f"user {user} exists: password set"


def _registered_model(client: MlflowClient, name: str) -> list[str]:
    try:
        client.create_registered_model(name)
        return [f"created registered model {name}"]
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return []


def _grant(auth: AuthServiceClient, user: str, kind: str, resource: str, permission: str, name: str) -> str:
    """Grant ``permission`` on a resource, replacing whatever the user held there (a grant is not an upsert)."""
    try:
        auth.grant_user_permission(user, kind, resource, permission)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(user, kind, resource)
        auth.grant_user_permission(user, kind, resource, permission)
    return f"{user}: {permission} on {kind.replace('_', ' ')} {name}"

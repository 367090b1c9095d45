"""What every tracked run does: start (nested under `main` when there is one) and log its settings."""

from __future__ import annotations

import mlflow


def start(name: str):
    return mlflow.start_run(run_name=name, nested=mlflow.active_run() is not None)


def log_params(params: dict[str, str]) -> None:
    """Log the resolved config, except keys `mlflow run` already logged as typed (e.g. "7.0" for 7):
    MLflow refuses to change a logged param, and the resolved values live in the artifacts too."""
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})

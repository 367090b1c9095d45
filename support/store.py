"""A real MLflow sqlite store in a folder, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def mlflow_store(folder: Path):
    """A real MLflow sqlite store with local artifacts inside ``folder``, used from that folder."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")}
    cwd = os.getcwd()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # in-process clients ignore the env once set
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

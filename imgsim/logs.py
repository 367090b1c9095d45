"""One logging set-up for every ``imgsim`` command: a quiet terminal by default, the detail on request."""

from __future__ import annotations

import logging
import os

LEVEL_ENV = "IMGSIM_LOG_LEVEL"


def configure(verbose: bool = False, default: str = "WARNING") -> int:
    """Show log records from ``$IMGSIM_LOG_LEVEL`` (else ``default``) up; ``verbose`` shows everything.

    Quiet means below WARNING is dropped process-wide (``logging.disable``), not by logger levels: every
    process that opens MLflow 3.2's sqlite store re-runs alembic's ``fileConfig``, which resets handlers and
    levels and prints its migration steps; a disable threshold survives that. Progress bars (tqdm) and each
    stage's summary are printed, not logged, so they stay. MLflow's own level is passed on to the processes
    this one starts (``mlflow run``'s entry point)."""
    name = "DEBUG" if verbose else (os.environ.get(LEVEL_ENV) or default).upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.disable(level - 1 if level > logging.NOTSET else logging.NOTSET)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(level))
    if level > logging.INFO:  # MLflow's bar for every small artifact download (a manifest: 3 files)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return level

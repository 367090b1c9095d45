"""One logging set-up for every ``imgsim`` command: a quiet terminal by default, the detail on request."""

from __future__ import annotations

import logging
import os

from imgsim.errors import redact

LEVEL_ENV = "IMGSIM_LOG_LEVEL"


def redact_records() -> None:
    """Strip ``user:password@`` from every log record of this process, message and trace alike, whichever library
    logs it (MLflow's errors quote the tracking URI). Idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "_imgsim", False):
        return

    def make(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        message = record.getMessage()
        if "@" in message:
            record.msg, record.args = redact(message), ()
        if record.exc_info and record.exc_info[0] is not None:  # formatters print exc_text when it is set; the
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))  # exception stays for filters
        return record

    make._imgsim = True
    logging.setLogRecordFactory(make)


def configure(verbose: bool = False, default: str = "WARNING") -> int:
    """Show log records from ``$IMGSIM_LOG_LEVEL`` (else ``default``) up; ``verbose`` shows everything.

    Quiet means below WARNING is dropped process-wide (``logging.disable``), not by logger levels: every
    process that opens MLflow 3.2's sqlite store re-runs alembic's ``fileConfig``, which resets handlers and
    levels and prints its migration steps; a disable threshold survives that. Progress bars (tqdm) and each
    stage's summary are printed, not logged, so they stay. MLflow's own level is passed on to the processes
    this one starts (``mlflow run``'s entry point)."""
    redact_records()
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

"""The ``imgsim`` command: a thin map from subcommand to core function."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from imgsim import config, logs
from imgsim.cli import operations, tools
from imgsim.errors import ImgsimError, redact
from imgsim.split import SplitConfig
from imgsim.stages.settings import ExtractConfig, TrainConfig

STAGES = (("split", SplitConfig), ("train", TrainConfig), ("extract", ExtractConfig))
# main sets these itself: each step reads the previous step's artifact URI.
CHAINED = frozenset({"manifest_uri", "model_uri"})
# Names several stages declare with one meaning; any other shared name needs a stage-specific name instead
# (extract's inference batch is embed_batch_size, not train's batch_size).
SAME_MEANING = frozenset({"data_dir", "seed", "threads", "workers", "feature_store", "backbone_runtime"})


def _split(ns):
    from imgsim.runs.split import run_split
    print(f"split run: {run_split(config.from_namespace(SplitConfig, ns))}")


def _train(ns):
    from imgsim.runs.train import run_train
    run_id, model_uri = run_train(config.from_namespace(TrainConfig, ns))
    if run_id:
        print(f"train run: {run_id}\nmodel: {model_uri}")


def _extract(ns):
    from imgsim.runs.extract import run_extract
    print(f"extract run: {run_extract(config.from_namespace(ExtractConfig, ns))}")


def _main(ns):
    from imgsim.result import MainResult
    from imgsim.runs.main import run_main
    result = MainResult(**run_main(*main_configs(ns).values()))
    if ns.result_file:  # the table comes with `imgsim report`, after what the caller does next
        print(f"main: {result.summary()}; `imgsim report {result.save(ns.result_file)}` shows runs and metrics")
    else:
        print(result.report())


def main_configs(ns) -> dict:
    """Each stage's config for ``main``: default < the file's section (or its flat keys) < flags the user gave.

    A flag applies to every stage that has a setting of that name (``seed`` to all three)."""
    sections = config.read_yaml(ns.config) if ns.config else {}
    unknown = set(sections) - {name for name, _ in STAGES}
    flat = {k: sections.pop(k) for k in unknown}
    names = {f.name for _, cls in STAGES for f in dataclasses.fields(cls)}
    if set(flat) - names:
        raise ImgsimError(f"config file {ns.config}: unknown key(s) {sorted(set(flat) - names)}; use the sections "
                          "split:, train:, extract: or settings of those stages")
    cfgs = {}
    for name, cls in STAGES:
        fields = {f.name for f in dataclasses.fields(cls)}
        from_file = {k: v for k, v in flat.items() if k in fields} | (sections.get(name) or {})
        from_flags = {k: getattr(ns, k, None) for k in fields - CHAINED}
        cfgs[name] = config.resolve(cls, None, from_file | config.given(from_flags))
    return cfgs


def shared_settings() -> dict[str, list[str]]:
    """Settings more than one stage declares, with those stages: ``main`` sets each of them in all, so they
    must mean the same in each (a test holds them to :data:`SAME_MEANING`): no flag silently means two things."""
    stages: dict[str, list[str]] = {}
    for name, cls in STAGES:
        for field in dataclasses.fields(cls):
            if field.name not in CHAINED:
                stages.setdefault(field.name, []).append(name)
    return {k: v for k, v in stages.items() if len(v) > 1}






def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgsim", description="Image similarity search: split, train, extract, serve.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help=f"show every log line (MLflow's store set-up too); or set ${logs.LEVEL_ENV}=DEBUG/INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls, fn, help_ in (("split", SplitConfig, _split, "validate images and write a stratified manifest"),
                                 ("train", TrainConfig, _train, "train the embedding model"),
                                 ("extract", ExtractConfig, _extract, "embed the gallery, build and evaluate the index")):
        p = sub.add_parser(name, help=help_)
        config.add_arguments(p, cls)
        p.set_defaults(fn=fn)
    p = sub.add_parser("main", help="split -> train -> extract in one tracked run; any stage's setting as a flag",
                       description="split -> train -> extract in one tracked run. Every stage's setting is a flag; "
                                   "a name several stages share means the same in each and sets it in each.")
    p.add_argument("--config", help="YAML file with optional split:, train:, extract: sections (or flat keys)")
    shared = shared_settings()
    seen: set[str] = set(CHAINED)
    for name, cls in STAGES:
        config.add_arguments(p, cls, skip=frozenset(seen), config_flag=False, title=name, shared=shared)
        seen |= {f.name for f in dataclasses.fields(cls)}
    p.add_argument("--result-file", "--result_file", dest="result_file",
                   help="also write the run ids, URIs and metrics as JSON here (for export, pick-image, report)")
    p.set_defaults(fn=_main)
    tools.add_parsers(sub)
    operations.add_parsers(sub)
    _verbose_everywhere(parser)
    return parser


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--verbose`` after the command too (``imgsim main --verbose``), for every command and sub-command; and
    no abbreviated flags anywhere: ``--epoch`` silently meant ``--epochs``, and a script or a document using a
    prefix breaks the day a second flag shares it."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                   help="show every log line; or set $IMGSIM_LOG_LEVEL")
                _verbose_everywhere(child)




def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logs.configure(ns.verbose, default=getattr(ns, "log_level", "WARNING"))
    command = " ".join(filter(None, (ns.command, getattr(ns, "action", None))))
    try:
        ns.fn(ns)
    except ImgsimError as exc:
        print(f"imgsim {command}: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:
        refused = _refused(exc)
        if refused is None:
            raise
        print(f"imgsim {command}: error: {redact(str(refused))}", file=sys.stderr)
        return 2
    return 0


def _refused(exc: Exception) -> ImgsimError | None:
    """A tracking server's 401 or 403, wherever in a stage MLflow met it, as one line naming what to set."""
    if "mlflow" not in sys.modules:
        return None
    from imgsim.runs.tracking import access_error
    return access_error(exc)


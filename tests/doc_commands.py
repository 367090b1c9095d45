"""The shell commands the README and docs/ show, checked against today's CLI, MLproject, Makefile and chart.

Each command in a ```bash / ```sh block that runs ``imgsim``, ``mlflow run``, ``make`` or ``helm`` is parsed
by the real parser it would meet (argparse, MLflow's click command, the Makefile's targets, the Helm engine
with the values the command sets); a problem names the file and line."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHELL_FENCES = {"bash", "sh", "shell", "console"}
OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}
REDIRECTS = re.compile(r"(?<=\s)(\d*>>?&?|&>|<)\s*[^\s;&|()]+")  # > log, 2>&1, < in
PLACEHOLDER = re.compile(r"<([A-Za-z][^<>]*)>")  # <extract run id>: one made-up word, "1"


@dataclass(frozen=True)
class Command:
    """One command line as documented: where it stands and its words."""

    file: str
    line: int
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {' '.join(self.words)}"


def documents(repo: Path = REPO) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def commands(text: str, file: str) -> list[Command]:
    """Every simple command in the shell blocks of one Markdown text."""
    found, fence, pending, start = [], None, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else (stripped[3:].strip() or "text")
            continue
        if fence not in SHELL_FENCES:
            continue
        if not pending:
            start = number
        pending += line.removeprefix("$ ").rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        found += [Command(file, start, words) for words in _simple_commands(pending)]
        pending = ""
    return found


def _simple_commands(line: str) -> list[tuple[str, ...]]:
    lexer = shlex.shlex(REDIRECTS.sub(" ", PLACEHOLDER.sub("1", line)), posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        words = list(lexer)
    except ValueError:  # an unbalanced quote: not a command we can read, so not one we check
        return []
    out, current = [], []
    for word in words + [";"]:
        if word in OPERATORS:
            out.append(_strip(current))
            current = []
        else:
            current.append(word)
    return [tuple(c) for c in out if c]


def _strip(words: list[str]) -> list[str]:
    """The command itself: no leading VAR=value or `exec`/`time`, the program's base name."""
    while words and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] in ("exec", "time", "sudo")):
        words = words[1:]
    kept = list(words)
    if kept:
        kept[0] = kept[0].rsplit("/", 1)[-1] if kept[0].endswith(("/imgsim", "/mlflow")) else kept[0]
    return kept


def check(command: Command) -> str | None:
    """What is wrong with a documented command, or None; programs this does not know are not checked."""
    program, args = command.words[0], list(command.words[1:])
    checker = {"imgsim": _check_imgsim, "mlflow": _check_mlflow, "make": _check_make, "helm": _check_helm}.get(program)
    problem = checker(args) if checker else None
    return f"{command}\n    {problem}" if problem else None


def _check_imgsim(args: list[str]) -> str | None:
    from imgsim.cli import build_parser
    return _argparse(build_parser(), args)


def _argparse(parser, args: list[str]) -> str | None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exc:
        if exc.code:
            return err.getvalue().strip().splitlines()[-1]
    return None


def entry_point_commands(repo: Path = REPO) -> dict[str, list[str]]:
    """Each MLproject entry point and the ``imgsim`` command its pipeline script runs."""
    project = yaml.safe_load((repo / "MLproject").read_text())
    out = {}
    for name, spec in project["entry_points"].items():
        script = re.search(r"python (pipelines/\S+\.py)", spec["command"]).group(1)
        argv = re.search(r"main\(\[(.*?), \*sys\.argv", (repo / script).read_text()).group(1)
        out[name] = [word.strip().strip("\"'") for word in argv.split(",")]
    return out


def _check_mlflow(args: list[str]) -> str | None:
    if not args or args[0] != "run":
        return None  # mlflow ui, mlflow models ...: MLflow's own, not ours
    import click
    from mlflow.cli import run

    try:
        ctx = run.make_context("run", args[1:])
    except click.ClickException as exc:
        return f"mlflow run: {exc.format_message()}"
    entry, params = ctx.params["entry_point"], ctx.params["param_list"]
    project = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    if entry not in project:
        return f"mlflow run: unknown entry point {entry!r}; MLproject has {', '.join(project)}"
    stage = entry_point_commands()[entry]
    for param in params:
        name, _, value = param.partition("=")
        if name in project[entry].get("parameters", {}):
            continue
        from imgsim.cli import build_parser
        problem = _argparse(build_parser(), [*stage, f"--{name}", value or "1"])
        if problem:
            return f"-P {name}: entry point {entry} neither declares it nor accepts it as a setting ({problem})"
    return None


def _check_make(args: list[str]) -> str | None:
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    unknown = [a for a in args if not a.startswith("-") and "=" not in a and a not in targets]
    return f"make: no target {', '.join(unknown)} in the Makefile ({', '.join(sorted(targets))})" if unknown else None


def _check_helm(args: list[str]) -> str | None:
    """Installs, upgrades and templates of this repo's chart render with the values they set."""
    if not args or args[0] not in ("install", "upgrade", "template"):
        return None
    positional, values, i = [], {}, 1
    while i < len(args):
        word = args[i]
        if word in ("--set", "--set-string"):
            key, _, value = args[i + 1].partition("=")
            _put(values, key, value if word == "--set-string" else yaml.safe_load(value or '""'))
            i += 2
        elif word in ("-n", "--namespace", "-f", "--values", "--version", "--timeout"):
            i += 2
        elif word.startswith("-"):
            i += 1
        else:
            positional.append(word)
            i += 1
    chart = next((p for p in positional if (REPO / p / "Chart.yaml").exists()), None)
    if chart is None:
        return None  # a third-party chart (nvdp/..., seldonio/...)
    import helm_python as helm
    try:
        helm.Chart.load(REPO / chart).render(values, name=positional[0], namespace="imgsim", is_install=True)
    except Exception as exc:  # the Helm engine's own error: schema, template
        return f"helm: the chart does not render with {values}: {str(exc).strip().splitlines()[0]}"
    return None


def _put(values: dict, dotted: str, value) -> None:
    *parents, last = re.split(r"(?<!\\)\.", dotted)
    for key in parents:
        values = values.setdefault(key.replace("\\.", "."), {})
    values[last.replace("\\.", ".")] = value


def runnable_blocks(repo: Path = REPO) -> dict[str, str]:
    """The code blocks marked ``<!-- tested: NAME ... -->`` in the README and docs/, by name: the suite runs
    each as written (against fixtures), so a block a user pastes cannot rot."""
    blocks = {}
    for path in documents(repo):
        for match in re.finditer(r"<!-- tested: ([\w-]+).*?-->\n```\w*\n(.*?)\n```", path.read_text(), re.S):
            blocks[match.group(1)] = match.group(2) + "\n"
    return blocks

"""The settings tables of docs/settings.md, generated from each stage's ``setting(...)`` declarations (their
default, group and help), so the page cannot drift from the code. A test checks that the page is current.

    python -m imgsim.cli.settings_doc            print the tables
    python -m imgsim.cli.settings_doc --write    replace them in docs/settings.md
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from imgsim import config
from imgsim.split import SplitConfig
from imgsim.stages.settings import ExtractConfig, TrainConfig

PAGE = Path(__file__).resolve().parents[2] / "docs" / "settings.md"
TABLES = {"split": SplitConfig, "train": TrainConfig, "extract": ExtractConfig}


def marks(name: str) -> tuple[str, str]:
    return f"<!-- settings:{name}:start -->", f"<!-- settings:{name}:end -->"


def table(cls: type) -> str:
    """One row per setting, in --help's group order: name, default (``auto``: chosen from the data), group, help."""
    fields = sorted(dataclasses.fields(cls), key=lambda f: config.GROUPS.index(config.group_of(f)))
    rows = ["| setting | default | group | meaning |", "|---|---|---|---|"]
    for field in fields:
        default = config.show(field.default)  # the spelling flags, YAML and -P take
        rows.append(f"| `{field.name}` | {f'`{default}`' if default else 'empty'} | {config.group_of(field)} | "
                    f"{config.help_of(field).replace('|', '/')} |")
    return "\n".join(rows)


def render(page: str) -> str:
    """``page`` with every marked table replaced by the one generated now."""
    for name, cls in TABLES.items():
        start, end = marks(name)
        if start not in page or end not in page:
            raise SystemExit(f"{PAGE} has no {start} ... {end} block")
        head, rest = page.split(start, 1)
        _, tail = rest.split(end, 1)
        page = f"{head}{start}\n{table(cls)}\n{end}{tail}"
    return page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="replace the tables in docs/settings.md")
    args = parser.parse_args()
    current = PAGE.read_text()
    if args.write:
        PAGE.write_text(render(current))
        print(f"wrote {PAGE}")
    else:
        print("\n\n".join(f"{name}:\n{table(cls)}" for name, cls in TABLES.items()))


if __name__ == "__main__":
    main()

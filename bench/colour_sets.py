"""Colour dev sets from Debian packages: Tux Paint stamps (a few hundred), Oxygen icons (a few thousand) and
Wesnoth map tiles (a couple of thousand).

python -m bench.colour_sets [--out data/colour]   -> data/colour/<set>/<class>/<file>.png

- ``tuxpaint``: ``tuxpaint-stamps-default``; the class is the stamp's top-level category (animals, food, ...).
- ``oxygen``: ``oxygen-icon-theme``; the class is the icon's context (actions, apps, devices, places, ...). One
  icon exists at up to eight sizes: near-duplicates that must not sit on both sides of a split, so only one size
  of each icon (the largest up to 128 px) is kept.
- ``wesnoth``: ``wesnoth-1.16-data``; 72 px hexagonal map tiles, the class is the terrain (castle, forest, hills,
  water, ...), at most 150 tiles per terrain. Folders that are not a kind of ground (masks, fog, symbols, ...) are
  left out. Unit sprites were not used: each unit has dozens of near-identical animation frames.
"""

from __future__ import annotations

import argparse
import collections
import random
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"tuxpaint": ("tuxpaint-stamps-default", Path("/usr/share/tuxpaint/stamps")),
           "oxygen": ("oxygen-icon-theme", Path("/usr/share/icons/oxygen/base")),
           "wesnoth": ("wesnoth-1.16-data", Path("/usr/share/games/wesnoth/1.16/data/core/images/terrain"))}
MIN_PER_CLASS, OXYGEN_PER_CLASS, WESNOTH_PER_CLASS = 8, 300, 150
WESNOTH_TERRAINS = ("bridge", "castle", "cave", "chasm", "desert_mountains", "flat", "forest", "frozen", "grass",
                    "hills", "interior", "mountains", "sand", "swamp", "unwalkable", "village", "walls", "water")
OXYGEN_SIZES = ("128x128", "64x64", "48x48", "32x32")


def ensure_package(name: str) -> Path:
    """The package's folder, installing it with apt-get where it is missing."""
    package, folder = SOURCES[name]
    if not folder.is_dir() and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=False, capture_output=True)
    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing: install the Debian package {package} (apt-get install {package})")
    return folder


def tuxpaint_files(folder: Path) -> dict[str, list[Path]]:
    by_class = collections.defaultdict(list)
    for path in sorted(folder.rglob("*.png")):
        rel = path.relative_to(folder)
        if len(rel.parts) > 1 and not path.name.endswith(("_mirror.png", "_back.png")):
            by_class[rel.parts[0]].append(path)
    return by_class


def oxygen_files(folder: Path, seed: int = 0) -> dict[str, list[Path]]:
    chosen: dict[tuple[str, str], Path] = {}
    for size in reversed(OXYGEN_SIZES):  # larger sizes overwrite smaller ones: one file per icon
        for path in sorted((folder / size).glob("*/*.png")):
            chosen[(path.parent.name, path.stem)] = path
    by_class = collections.defaultdict(list)
    for (context, _), path in sorted(chosen.items()):
        by_class[context].append(path)
    rng = random.Random(seed)
    return {c: sorted(rng.sample(paths, min(len(paths), OXYGEN_PER_CLASS))) for c, paths in by_class.items()}


def wesnoth_files(folder: Path, seed: int = 0) -> dict[str, list[Path]]:
    rng = random.Random(seed)
    by_class = {}
    for terrain in WESNOTH_TERRAINS:
        paths = sorted((folder / terrain).rglob("*.png"))
        by_class[terrain] = sorted(rng.sample(paths, min(len(paths), WESNOTH_PER_CLASS)))
    return by_class


FILES = {"tuxpaint": tuxpaint_files, "oxygen": oxygen_files, "wesnoth": wesnoth_files}


def build(name: str, out: Path) -> Path:
    """Write the dev set once (copies, so split's symlink rule does not reject them); returns its root."""
    root = out / name
    if (root / ".complete").exists():
        return root
    folder = ensure_package(name)
    files = FILES[name](folder)
    shutil.rmtree(root, ignore_errors=True)
    for label, paths in files.items():
        if len(paths) < MIN_PER_CLASS:
            continue
        (root / label).mkdir(parents=True, exist_ok=True)
        for path in paths:
            flat = "_".join(path.relative_to(folder).parts[1:]) if name != "oxygen" else \
                f"{path.parent.name}_{path.name}"
            shutil.copyfile(path, root / label / flat)
    (root / ".complete").write_text("")
    return root


def manifest(name: str):
    """A colour dev set split 65/25/10; the test images are the queries, train + eval the gallery."""
    from imgsim.split import SplitConfig, split_dataset

    root = build(name, REPO / "data" / "colour")
    return split_dataset(SplitConfig(data_dir=str(root), test_ratio=0.25, eval_ratio=0.1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "data" / "colour")
    args = parser.parse_args()
    for name in SOURCES:
        root = build(name, args.out)
        counts = {p.name: sum(1 for _ in p.iterdir()) for p in sorted(root.iterdir()) if p.is_dir()}
        print(f"{name}: {sum(counts.values())} images in {len(counts)} classes at {root}: {counts}")


if __name__ == "__main__":
    main()

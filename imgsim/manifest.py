"""The Manifest artifact: which file is in which class and split, plus what was rejected and why."""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
from pathlib import Path

from imgsim import atomic
from imgsim.errors import ImgsimError

SPLITS = ("train", "test", "eval")
ITEM_FIELDS = ("path", "label", "split", "sha256", "width", "height")


@dataclasses.dataclass(frozen=True)
class Item:
    """One validated image: path relative to the root, class label, split and content hash."""

    path: str
    label: str
    split: str
    sha256: str
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class Rejected:
    """A file that split skipped, with the reason."""

    path: str
    reason: str


@dataclasses.dataclass
class Manifest:
    """A stratified train/test/eval split of an image folder; paths stay relative to ``root``."""

    root: str
    classes: list[str]
    items: list[Item]
    rejected: list[Rejected]
    params: dict

    def split(self, name: str) -> list[Item]:
        """The items of one split, in manifest order."""
        if name not in SPLITS:
            raise ImgsimError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return [item for item in self.items if item.split == name]

    def image_path(self, split: str, index: int = 0) -> Path:
        """The file of the ``index``-th image of ``split`` (in manifest order), for a quick query."""
        items = self.split(split)
        if not items:
            raise ImgsimError(f"the manifest's {split} split is empty; pick another split")
        if not -len(items) <= index < len(items):
            raise ImgsimError(f"the {split} split has {len(items)} images; pick an index below {len(items)}")
        return Path(self.root) / items[index].path

    def summary(self) -> dict:
        """Counts per class and split, and the number rejected."""
        counts = collections.Counter((item.label, item.split) for item in self.items)
        per_class = {c: {s: counts[(c, s)] for s in SPLITS} for c in self.classes}
        totals = {s: sum(item.split == s for item in self.items) for s in SPLITS}
        return {"classes": len(self.classes), "per_class": per_class, "totals": totals,
                "rejected": len(self.rejected)}

    def save(self, out_dir: str | Path) -> Path:
        """Write ``manifest.csv``, ``rejected.csv`` and ``manifest.json`` atomically into ``out_dir``."""
        out = Path(out_dir)
        with atomic.atomic_dir(out) as tmp:
            (tmp / "manifest.csv").write_text(_to_csv(ITEM_FIELDS, (dataclasses.astuple(i) for i in self.items)))
            (tmp / "rejected.csv").write_text(_to_csv(("path", "reason"), (dataclasses.astuple(r) for r in self.rejected)))
            meta = {"root": self.root, "classes": self.classes, "params": self.params, "summary": self.summary()}
            (tmp / "manifest.json").write_text(json.dumps(meta, indent=2))
        return out

    @classmethod
    def load(cls, in_dir: str | Path) -> "Manifest":
        """Read a manifest written by :meth:`save`; a clear error if it is missing or malformed."""
        folder = Path(in_dir)
        try:
            meta = json.loads((folder / "manifest.json").read_text())
            with open(folder / "manifest.csv", newline="") as f:
                items = [Item(r["path"], r["label"], r["split"], r["sha256"], int(r["width"]), int(r["height"]))
                         for r in csv.DictReader(f)]
            with open(folder / "rejected.csv", newline="") as f:
                rejected = [Rejected(r["path"], r["reason"]) for r in csv.DictReader(f)]
            manifest = cls(meta["root"], list(meta["classes"]), items, rejected, dict(meta["params"]))
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise ImgsimError(
                f"cannot read the manifest in {folder}: {exc!r}. Point at the 'split' artifact folder "
                "of a split run (manifest.json, manifest.csv, rejected.csv), or run split again."
            ) from None
        unknown = {i.label for i in items} - set(manifest.classes or [""]) or {i.split for i in items} - set(SPLITS)
        if unknown:
            raise ImgsimError(f"manifest in {folder} names unknown classes or splits {sorted(unknown)}; run split again")
        return manifest


def _to_csv(header: tuple[str, ...], rows) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()

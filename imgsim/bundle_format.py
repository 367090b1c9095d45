"""What a serving bundle's folder holds: its file names, its format, bundle.json's typed records (the model's source,
a gallery's lineage, a sharded gallery's part, a version of changes' base), the probe set, and bundle.json read."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from imgsim import atomic
from imgsim.changes import CHANGE_FILES
from imgsim.errors import ImgsimError
from imgsim.index import ANNOY, EMBEDDINGS_FILE, INDEX_FILE, ITEMS_FILE
from imgsim.modelspec import MODEL_JSON, ONNX_FILE, WEIGHTS

BUNDLE_JSON = "bundle.json"
PROBES_FILE = "probes.npz"
FORMAT_VERSION = 3
MODEL_FILES = (MODEL_JSON, WEIGHTS, ONNX_FILE)
FILES = (*MODEL_FILES, INDEX_FILE, ITEMS_FILE, EMBEDDINGS_FILE, PROBES_FILE)
# A version stored as changes over a base version (imgsim.changes) holds only these; the rest is its base's.
CHANGES_VERSION_FILES = (*CHANGE_FILES, PROBES_FILE)
# Where a fetched or exported version of changes keeps its base version, inside its own folder.
BASE_DIR = "base"
# A living gallery: each version is registered under this name, and this alias names the one to serve.
GALLERY_NAME, GALLERY_ALIAS = "imgsim-gallery", "serving"
# The roles of a sharded gallery's parts (imgsim.sharded).
EMBEDDER, SHARD = "embedder", "shard"


class BundleError(ImgsimError):
    """The bundle itself is wrong (format, checksums, parts that disagree): loading it again will not help."""


def _present(record) -> dict:
    """A record's fields in declaration order, those never set (None) left out, as bundle.json has always held them,
    then the keys this imgsim does not know, as it read them."""
    fields = [f.name for f in dataclasses.fields(record) if f.name != "extra"]
    return {**{name: getattr(record, name) for name in fields if getattr(record, name) is not None}, **record.extra}


def _known(cls, data: dict) -> dict:
    """The fields ``cls`` declares, and every other key under ``extra``: a newer imgsim's keys survive a rewrite."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return {**{k: v for k, v in data.items() if k in names}, "extra": {k: v for k, v in data.items() if k not in names}}


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """The model a bundle was built from (bundle.json's "model", less its shape): its URI, and the registered
    name, version, source run and kind when it was registered."""

    uri: str = ""
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    kind: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # keys a newer imgsim wrote

    def to_json(self) -> dict:
        return _present(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelSource":
        return cls(**_known(cls, data))


@dataclasses.dataclass(frozen=True)
class Lineage:
    """Where a gallery version comes from (bundle.json's "gallery"): the image root its paths are relative to, the
    run that wrote it, the version it was changed from and what the change added, removed and skipped."""

    root: str | None = None
    run_id: str | None = None
    parent: dict | None = None  # uri, version, run_id and index_sha256 of the version changed
    change: dict[str, int] | None = None  # added, removed, skipped
    extra: dict = dataclasses.field(default_factory=dict)  # keys a newer imgsim wrote

    def to_json(self) -> dict:
        return _present(self)

    @classmethod
    def from_json(cls, data: dict | None) -> "Lineage":
        return cls(**_known(cls, data or {}))


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One part of a sharded gallery (bundle.json's "shard"): its role and shard index (none for the embedder),
    the shard count, the whole gallery's identity, size, items per shard, next id and labels."""

    role: str
    count: int
    gallery: str
    items: int
    shard_items: tuple[int, ...]
    next_id: int
    labels: tuple[str, ...]
    index: int | None = None

    def to_json(self) -> dict:
        # bundle.json's order: role, index, then the gallery's facts.
        return {"role": self.role, **({"index": self.index} if self.index is not None else {}), "count": self.count,
                "gallery": self.gallery, "items": self.items, "shard_items": list(self.shard_items),
                "next_id": self.next_id, "labels": list(self.labels)}

    @classmethod
    def from_json(cls, data: dict) -> "ShardInfo":
        return cls(str(data["role"]), int(data["count"]), str(data["gallery"]), int(data["items"]),
                   tuple(int(n) for n in data["shard_items"]), int(data["next_id"]),
                   tuple(str(label) for label in data["labels"]),
                   int(data["index"]) if data.get("index") is not None else None)


@dataclasses.dataclass(frozen=True)
class BaseRef:
    """The base version a version of changes is stored over (bundle.json's "base"): where it is stored, its files'
    checksums (the base must be exactly that version) and its size."""

    uri: str
    files: dict[str, str]
    count: int

    def to_json(self) -> dict:
        return {"uri": self.uri, "files": dict(self.files), "count": self.count}

    @classmethod
    def from_json(cls, data: dict) -> "BaseRef":
        return cls(str(data.get("uri", "")), dict(data["files"]), int(data.get("count", 0)))


@dataclasses.dataclass
class Probes:
    """A few gallery items as the model saw them at extract: preprocessed input, and the embedding it gave."""

    ids: NDArray[np.int64]
    sha256: list[str]
    inputs: NDArray[np.uint8]  # (P, C, H, W), exactly what the serving path feeds the model
    embeddings: NDArray[np.float32]  # (P, D), L2-normalised

    def __add__(self, other: "Probes") -> "Probes":
        return Probes(np.concatenate([self.ids, other.ids]), self.sha256 + other.sha256,
                      np.concatenate([self.inputs, other.inputs]), np.concatenate([self.embeddings, other.embeddings]))

    def __len__(self) -> int:
        return len(self.ids)

    def save(self, path: Path) -> None:
        with atomic.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, ids=self.ids, sha256=np.asarray(self.sha256), inputs=self.inputs, embeddings=self.embeddings)

    @classmethod
    def load(cls, path: Path) -> "Probes":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["ids"].astype(np.int64), [str(s) for s in data["sha256"]], data["inputs"],
                       data["embeddings"].astype(np.float32))


def read_meta(folder: str | Path, name: str | Path | None = None) -> dict:
    """The bundle's metadata, or a clear error if the folder is not a bundle of this format."""
    name = name or folder
    try:
        meta = json.loads((Path(folder) / BUNDLE_JSON).read_text())
    except FileNotFoundError:
        raise BundleError(f"{name} is not an imgsim bundle (no {BUNDLE_JSON}); create one with "
                          "'imgsim export --run <extract run id> --out DIR'") from None
    except ValueError as exc:
        raise BundleError(f"{name}/{BUNDLE_JSON} is not valid JSON ({exc}); re-export the bundle") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise BundleError(f"bundle {name} has format {found}, this imgsim reads format {FORMAT_VERSION} (with a "
                          "probe set and an ONNX export): run extract again with this version and export its bundle")
    return meta


def index_backend(meta: dict) -> str:
    """The index backend bundle.json names (bundles written before there was a choice hold an Annoy index)."""
    return str(meta.get("index", {}).get("backend", ANNOY))

"""The ServingBundle artifact: model (torch and ONNX) + index + a probe set that proves they belong together."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from numpy.typing import NDArray

from imgsim import atomic
from imgsim.changes import CHANGE_FILES, Changes
from imgsim.effort import RECALL_TARGET
from imgsim.errors import ImgsimError
from imgsim.index import ANNOY, DEFAULT_SEARCH_K, EMBEDDINGS_FILE, INDEX_FILE, ITEMS_FILE, IndexBundle
from imgsim.modelspec import INT8, MODEL_JSON, ONNX_FILE, WEIGHTS, ModelSpec, cpu_int8, file_sha256

if TYPE_CHECKING:  # torch is only needed to write a bundle or to serve with runtime="torch"
    from imgsim.nn.model import ModelBundle

BUNDLE_JSON = "bundle.json"
PROBES_FILE = "probes.npz"
FORMAT_VERSION = 3
MODEL_FILES = (MODEL_JSON, WEIGHTS, ONNX_FILE)
FILES = (*MODEL_FILES, INDEX_FILE, ITEMS_FILE, EMBEDDINGS_FILE, PROBES_FILE)
# A version stored as changes over a base version (imgsim.changes) holds only these; the rest is its base's.
CHANGES_VERSION_FILES = (*CHANGE_FILES, PROBES_FILE)
# Where a fetched or exported version of changes keeps its base version, inside its own folder.
BASE_DIR = "base"
RUNTIMES = ("onnx", "torch")
PROBE_COUNT = 32
# A living gallery: each version is registered under this name, and this alias names the one to serve.
GALLERY_NAME, GALLERY_ALIAS = "imgsim-gallery", "serving"
# The loaded model must reproduce the probe embeddings recorded at extract (both float32 on the CPU: torch
# and ONNX Runtime agree to ~1e-6) to this largest absolute difference...
PROBE_PARITY = 1e-4
# An int8 model.onnx: integer kernels differ by instruction set, so some room (against float32: 0.01-0.2).
PROBE_PARITY_INT8 = 2e-3
# ...and those must match the index's own vectors to this cosine distance (1 - cos): the gallery may have been
# embedded in larger batches or on a GPU (TF32); another model of the same shape differs by 0.05 or more.
PROBE_TOLERANCE = 1e-3

# uint8 images (N, C, H, W) -> (normalised embeddings, logits): the PyTorch model or an ONNX Runtime session.
Engine = Callable[[NDArray[np.uint8]], tuple[NDArray[np.float32], NDArray[np.float32]]]


class BundleError(ImgsimError):
    """The bundle itself is wrong (format, checksums, parts that disagree): loading it again will not help."""


@dataclasses.dataclass
class Probes:
    """A few gallery items as the model saw them at extract: preprocessed input, and the embedding it gave."""

    ids: NDArray[np.int64]
    sha256: list[str]
    inputs: NDArray[np.uint8]  # (P, C, H, W), exactly what the serving path feeds the model
    embeddings: NDArray[np.float32]  # (P, D), L2-normalised

    @classmethod
    def take(cls, embed: Callable[[NDArray[np.uint8]], NDArray[np.float32]], read: Callable[[int], NDArray[np.uint8]],
             index: IndexBundle, *, count: int = PROBE_COUNT, seed: int = 42) -> "Probes":
        """Pick ``count`` gallery items spread over the index (``read`` takes a row), read their inputs and
        embed them."""
        n = len(index.items)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(count, n), replace=False))
        inputs = np.stack([read(int(r)) for r in rows])
        return cls(np.asarray([index.items[r].id for r in rows], dtype=np.int64), [index.items[r].sha256 for r in rows],
                   inputs, np.asarray(embed(inputs), dtype=np.float32))

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


def cosine_distances(a: NDArray[np.float32], b: NDArray[np.float32]) -> NDArray[np.float64]:
    """Row-wise 1 - cos(a_i, b_i)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return 1.0 - (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


@dataclasses.dataclass
class ServingBundle:
    """Everything the server loads, written together (atomically) and verified together on load."""

    spec: ModelSpec
    index: IndexBundle
    probes: Probes
    source: dict  # the model it was built from: uri, and name/version/run_id when registered
    search_k: int = DEFAULT_SEARCH_K  # what extract measured the index's recall with; the server's default
    index_recall: float | None = None  # recall@10 against exact search at that search_k
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # sha256 of each file, once saved or loaded
    torch_model: "ModelBundle | None" = None  # the torch model: given to save, loaded only for runtime="torch"
    engine: Engine | None = dataclasses.field(default=None, repr=False)  # set by load
    onnx_parity: float | None = None  # ONNX Runtime vs torch at export, largest absolute difference
    # An int8 model.onnx: how it was made (bundle.json's onnx.quantization; empty: float32) and its bytes to save.
    quantization: dict = dataclasses.field(default_factory=dict)
    onnx_model: bytes | None = dataclasses.field(default=None, repr=False)
    # Lineage of a living gallery (imgsim.stages.gallery): the image root its paths are relative to, the parent
    # bundle (None for extract's), and what the change added, removed and skipped.
    lineage: dict = dataclasses.field(default_factory=dict)  # stored as bundle.json's "gallery"
    version: str = ""  # the registry version it was fetched as, when it was (not stored in the bundle)
    # One part of a sharded gallery (imgsim.sharded): its role (embedder or shard), index, the shard count and
    # the whole gallery's identity; empty for a whole bundle. Stored as bundle.json's "shard".
    shard: dict = dataclasses.field(default_factory=dict)
    # A version stored as changes (index.changes) names its base version: where it is stored ("uri"), its
    # files' checksums ("files": the base must be exactly that version) and its size. Stored as "base".
    base: dict = dataclasses.field(default_factory=dict)
    model_folder: Path | None = None  # where the model files were read from (the base's folder for changes)
    recall_target: float = RECALL_TARGET  # what the effort was tuned to (0: as given); a rebuilt index is too

    def save(self, out_dir: str | Path, *, model_from: str | Path | None = None) -> Path:
        """Write the whole bundle into ``out_dir`` (the torch weights, their ONNX export checked against them,
        index, probes, checksums), replacing any previous one in a single step. ``model_from``: a bundle
        folder whose model files are copied byte for byte instead (a new gallery version of the same model)."""
        out = Path(out_dir)
        if self.index.changes is not None:
            return self._save_changes(out)
        if self.torch_model is None and model_from is None:
            raise ImgsimError("a ServingBundle is saved from the torch model: pass torch_model=ModelBundle")
        with atomic.atomic_dir(out) as tmp:
            if model_from is not None:
                for name in MODEL_FILES:
                    shutil.copyfile(Path(model_from) / name, tmp / name)
            else:
                from imgsim.nn.onnx_export import export_onnx

                self.torch_model.save(tmp)
                if self.onnx_model is not None:
                    (tmp / ONNX_FILE).write_bytes(self.onnx_model)  # inside the atomic folder
                else:
                    self.onnx_parity = export_onnx(self.torch_model, tmp / ONNX_FILE, self.probes.inputs)
            self.index.save(tmp)
            self.probes.save(tmp / PROBES_FILE)
            self.files = {name: file_sha256(tmp / name) for name in FILES}
            atomic.write_text(tmp / BUNDLE_JSON, json.dumps(self._meta(), indent=2))
        return out

    def _save_changes(self, out: Path) -> Path:
        """Only what changed since the base version: the change files and the probes; the model files and the
        base's index stay the base's (bundle.json names them by checksum)."""
        if not self.base.get("files"):
            raise ImgsimError("a gallery version of changes is saved with its base version (ServingBundle.base)")
        with atomic.atomic_dir(out) as tmp:
            self.index.changes.save(tmp)
            self.probes.save(tmp / PROBES_FILE)
            self.files = {**self.base["files"], **{name: file_sha256(tmp / name) for name in CHANGES_VERSION_FILES}}
            atomic.write_text(tmp / BUNDLE_JSON, json.dumps(self._meta(), indent=2))
        return out

    @property
    def gallery_sha256(self) -> str:
        """The gallery's content identity: its index file's checksum, or for a version of changes one over its
        base's index and its change files (what the registry's compare-and-set compares)."""
        if self.index.changes is None:
            return self.files.get(INDEX_FILE, "")
        parts = [self.base["files"][INDEX_FILE], *(self.files[name] for name in CHANGE_FILES)]
        return hashlib.sha256(" ".join(parts).encode()).hexdigest()

    def _meta(self) -> dict:
        from imgsim.nn.onnx_export import OPSET, PARITY

        return {
            "format_version": FORMAT_VERSION,
            "model": {**self.source, "embedding_dim": self.spec.args.dim, "classes": self.spec.classes},
            "index": {"backend": self.index.backend, "dim": self.index.dim, "metric": self.index.metric,
                      "n_trees": self.index.n_trees,
                      "count": len(self.index.items), "next_id": self.index.next_id, "search_k": self.search_k,
                      "recall_at_10": self.index_recall, "recall_target": self.recall_target},
            "gallery": self.lineage,
            **({"shard": self.shard} if self.shard else {}),
            **({"base": self.base, "changes": {"added": len(self.index.changes.added_items),
                                               "removed": len(self.index.changes.removed)}}
               if self.index.changes is not None else {}),
            "probes": {"count": len(self.probes.ids), "tolerance": PROBE_TOLERANCE, "parity": self.probe_parity},
            "onnx": {"opset": OPSET, "parity_max_abs": self.onnx_parity, "tolerance": PARITY,
                     **({"quantization": self.quantization} if self.quantization else {})},
            "files": {name: self.files[name] for name in
                      (CHANGES_VERSION_FILES if self.index.changes is not None else FILES)},
        }

    @classmethod
    def load(cls, folder: str | Path, *, runtime: str = "onnx", threads: int = 1,
             base: str | Path | None = None) -> "ServingBundle":
        """Check the files, open the model with ``runtime`` (onnx: ONNX Runtime, no torch needed; torch: the
        PyTorch weights) and the memory-mapped index, and :meth:`verify` them. A version stored as changes is
        read with its base version: ``base``, else the folder's own ``base/`` (where imgsim puts it when it
        fetches or exports one), else the local folder its bundle.json names.

        The folder is read as one version even if an export replaces it meanwhile (``FolderReplaced`` then:
        load again)."""
        if runtime not in RUNTIMES:
            raise ImgsimError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        with atomic.pinned_dir(folder) as pinned:
            meta = read_meta(pinned, folder)
            if not meta.get("base"):
                bundle = cls._read(pinned, folder, meta, None, runtime, threads)
            else:
                base_path = _base_folder(pinned, folder, meta, base)
                named = Path(folder) / BASE_DIR if base_path == pinned / BASE_DIR else base_path
                with atomic.pinned_dir(base_path) as base_pinned:
                    bundle = cls._read(pinned, folder, meta, (base_pinned, named), runtime, threads)
        bundle.verify()
        return bundle

    @classmethod
    def _read(cls, pinned: Path, folder: str | Path, meta: dict, base: tuple[Path, Path] | None, runtime: str,
              threads: int) -> "ServingBundle":
        _check_files(pinned, meta, folder, CHANGES_VERSION_FILES if base else FILES)
        files = dict(meta["files"])
        model_dir = pinned
        if base:
            model_dir, base_path = base
            base_meta = _base_meta(model_dir, base_path, meta, folder)
            _check_files(model_dir, base_meta, base_path, FILES)
            files = {**base_meta["files"], **files}
        try:
            spec, probes = ModelSpec.load(model_dir), Probes.load(pinned / PROBES_FILE)
            index = IndexBundle.load(model_dir, n_trees=int(meta["index"]["n_trees"]),
                                     next_id=int(meta["index"].get("next_id", -1)), backend=index_backend(meta))
            if base:
                try:
                    index = Changes.load(index, pinned).index(next_id=int(meta["index"]["next_id"]))
                except ImgsimError as exc:  # changes that do not fit their base: loading again cannot help
                    raise BundleError(f"bundle {folder}: {exc}") from None
            source = {k: v for k, v in meta["model"].items() if k not in ("embedding_dim", "classes")}
            bundle = cls(spec, index, probes, source, int(meta["index"].get("search_k", DEFAULT_SEARCH_K)),
                         meta["index"].get("recall_at_10"), files,
                         onnx_parity=meta.get("onnx", {}).get("parity_max_abs"),
                         quantization=_quantization(meta, folder),
                         recall_target=float(meta["index"].get("recall_target", RECALL_TARGET)),
                         lineage=dict(meta.get("gallery") or {}), shard=dict(meta.get("shard") or {}),
                         base=dict(meta.get("base") or {}), model_folder=Path(base[1] if base else folder))
        except (KeyError, ValueError, TypeError) as exc:
            raise BundleError(f"bundle {folder} cannot be read ({exc!r}); re-export it") from None
        if bundle.quantization and runtime == "torch":
            raise BundleError(f"bundle {folder} serves an int8 model.onnx; its torch weights are float32 and embed "
                              "differently from its index: use runtime 'onnx'")
        try:
            bundle.engine = _open_engine(bundle, model_dir, runtime, threads)
        except ImgsimError as exc:
            raise BundleError(f"bundle {folder}: {exc}") from None
        return bundle

    def verify(self) -> None:
        """Re-embed the probes with the loaded engine and compare with what extract recorded and with the
        index's own vectors. Raises ``BundleError`` naming the part that disagrees."""
        problems = []
        if self.spec.args.dim != self.index.dim:
            problems.append(f"the model embeds in {self.spec.args.dim} dimensions, the index holds {self.index.dim}")
        elif self.probes.embeddings.shape[1:] != (self.index.dim,) or not len(self.probes):
            problems.append(f"{PROBES_FILE} does not fit this index (no probes, or another dimension)")
        else:
            problems += self._disagreements()
        if problems:
            raise BundleError("bundle is inconsistent: " + "; ".join(problems) + ". Re-export the bundle from one "
                              "extract run, so that model and index come from the same model.")

    @property
    def probe_parity(self) -> float:
        """How far the loaded model may embed the probes from what extract recorded (largest absolute difference)."""
        return PROBE_PARITY_INT8 if self.quantization else PROBE_PARITY

    def _int8_note(self) -> str:
        made_on, here = self.quantization.get("cpu_int8", "unknown"), cpu_int8()
        return (f"; it is an int8 model, made on a CPU with {made_on}" + (f" and run here on one with {here}, whose "
                "int8 kernels may compute differently: serve a float32 bundle on these machines" if made_on != here
                else ""))

    def _disagreements(self) -> list[str]:
        recorded = self.probes.embeddings
        problems = []
        model_file = ONNX_FILE if self.torch_model is None else WEIGHTS
        recomputed = self.engine(self.probes.inputs)[0]
        diff = float(np.abs(recomputed - recorded).max(initial=0.0)) if np.all(np.isfinite(recomputed)) else np.inf
        if diff > self.probe_parity:
            problems.append(f"{model_file} is not the model that built this index: it embeds the {len(recorded)} probe "
                            f"images differently from extract (largest difference {diff:.3g}, tolerance "
                            f"{self.probe_parity:g})" + (self._int8_note() if self.quantization else ""))
        # Probes whose image a later gallery version removed still check the model, not the index.
        rows = [self.index.row(int(i)) for i in self.probes.ids]
        present = np.asarray([r is not None for r in rows], dtype=bool)
        rows_in = np.asarray([r for r in rows if r is not None], dtype=np.int64)
        recorded = recorded[present]
        stored = _worst(cosine_distances(np.asarray(self.index.embeddings[rows_in]), recorded))
        if stored > PROBE_TOLERANCE:
            problems.append(f"{EMBEDDINGS_FILE} holds other vectors for the probe items (cosine distance up to "
                            f"{stored:.3g}): the embeddings come from another model")
        # The index file must hold the probes' recorded vectors, and the stored embeddings on a spread of rows.
        indexed_vectors = self.index.ann.vectors
        spread = np.linspace(0, len(self.index.items) - 1, 16).astype(np.int64)
        # (A shard of a sharded gallery may hold none of the probe items: its spread rows still check it.)
        indexed = max(_worst(cosine_distances(indexed_vectors(rows_in), recorded)) if len(rows_in) else 0.0,
                      _worst(cosine_distances(indexed_vectors(spread), np.asarray(self.index.embeddings[spread]))))
        if indexed > PROBE_TOLERANCE:
            problems.append(f"{INDEX_FILE} holds other vectors for the probe items (cosine distance up to "
                            f"{indexed:.3g}): the {self.index.backend} index was built from another model's "
                            "embeddings")
        sha = [s for s, keep in zip(self.probes.sha256, present) if keep]
        if [self.index.items[r].sha256 for r in rows_in] != sha:
            problems.append(f"{ITEMS_FILE} names other images for the probe ids: the item table belongs to "
                            "another gallery")
        return problems

    def identity(self) -> dict[str, str]:
        """Model and index identity for response tags, health and metadata."""
        # A sharded gallery's embedder part indexes only its probe items: it reports the whole gallery.
        size = self.shard["items"] if self.shard.get("role") == "embedder" else len(self.index.items)
        return {"model_name": str(self.source.get("name", "")), "model_version": str(self.source.get("version", "")),
                "model_sha256": self.files.get(WEIGHTS, "")[:12], "index_sha256": self.gallery_sha256[:12],
                "index_size": str(size), "bundle_version": self.version}


def _open_engine(bundle: ServingBundle, folder: Path, runtime: str, threads: int) -> Engine:
    if runtime == "onnx":
        from imgsim.serve.runtime import OnnxModel

        return OnnxModel(folder / ONNX_FILE, bundle.spec.preprocess, threads)
    try:
        import torch

        from imgsim.nn.embed import embed_array
        from imgsim.nn.model import ModelBundle
    except ImportError:
        raise ImgsimError("runtime 'torch' needs torch, which this installation (the serving image) does not "
                          "have: use runtime 'onnx'") from None
    torch.set_num_threads(max(1, threads))
    bundle.torch_model = ModelBundle.load(folder)
    net = bundle.torch_model.build()
    return lambda inputs: embed_array(net, inputs)


def _quantization(meta: dict, folder: str | Path) -> dict:
    """bundle.json's record of an int8 model.onnx; an arithmetic this imgsim does not know is refused."""
    quantization = dict(meta.get("onnx", {}).get("quantization") or {})
    if quantization and quantization.get("precision") != INT8:
        raise BundleError(f"bundle {folder} serves a model in {str(quantization.get('precision'))[:20]!r}, which this "
                          "imgsim does not know: it was made by a newer one")
    return quantization


def _worst(distances: NDArray[np.float64]) -> float:
    # NaN (a model that outputs NaN) must count as a disagreement, which max() alone would not guarantee.
    return float("inf") if not np.all(np.isfinite(distances)) else float(distances.max(initial=0.0))


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


def load_index(folder: str | Path) -> tuple[IndexBundle, Path]:
    """A bundle's index without its model (exploring and finding duplicates need only vectors; no checksum is
    computed), a version of changes put together with its base; and the folder that holds the model files."""
    meta = read_meta(folder)
    n_trees, next_id = int(meta["index"]["n_trees"]), int(meta["index"].get("next_id", -1))
    if not meta.get("base"):
        return IndexBundle.load(folder, n_trees=n_trees, next_id=next_id, backend=index_backend(meta)), Path(folder)
    base = _base_folder(Path(folder), folder, meta, None)
    _base_meta(base, base, meta, folder)
    index = IndexBundle.load(base, n_trees=n_trees, next_id=next_id, backend=index_backend(meta))
    return Changes.load(index, Path(folder)).index(next_id), base


def _base_meta(base: Path, name: str | Path, meta: dict, folder: str | Path) -> dict:
    """The bundle.json of the base of the changes in ``folder``, refused unless it is exactly the base they name."""
    base_meta = read_meta(base, name)
    if base_meta.get("base"):
        raise BundleError(f"{name}, the base of {folder}, is itself a version of changes; a base must hold a whole "
                          "gallery. Export the version again.")
    if base_meta.get("files") != meta["base"].get("files"):
        raise BundleError(f"{name} is not the gallery version the changes in {folder} were made on (its files' "
                          f"checksums differ from those bundle.json names for {meta['base'].get('uri') or 'its base'})"
                          ": fetch that version as its base")
    return base_meta


def _base_folder(pinned: Path, folder: str | Path, meta: dict, given: str | Path | None) -> Path:
    """Where the base version of a version of changes is: given, inside it, or the local folder it names."""
    if given is not None:
        return Path(given)
    if (pinned / BASE_DIR / BUNDLE_JSON).is_file():
        return pinned / BASE_DIR
    uri = str(meta["base"].get("uri", "")) if isinstance(meta["base"], dict) else ""
    local = Path(uri.removeprefix("file://")) if uri and (uri.startswith("file://") or ":/" not in uri) else None
    if local is not None and (local / BUNDLE_JSON).is_file():
        return local
    raise BundleError(f"{folder} holds the changes of a gallery version over its base version {uri or '(unnamed)'}, "
                      "which is not here: load it by its runs:/ or models:/ URI (imgsim fetches the base with it), "
                      "or export it (imgsim export --uri URI --out DIR writes one folder with its base)")


def _check_files(folder: Path, meta: dict, name: str | Path, names: tuple[str, ...] = FILES) -> None:
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    problems = []
    for file in names:
        path = folder / file
        if not path.is_file():
            problems.append(f"{file} is missing")
        elif file_sha256(path) != files.get(file):
            problems.append(f"{file} does not match its recorded sha256")
    if problems:
        raise BundleError(f"bundle {name} is damaged: {'; '.join(problems)}. Export it again.")


def build_probes(model, index: IndexBundle, read: Callable[[int], NDArray[np.uint8]],
                 gallery: NDArray[np.float32] | None = None, seed: int = 42, engine: Engine | None = None) -> Probes:
    """Probes for a fresh index, embedded by ``engine`` (the model served), else the torch ``model``; with
    ``gallery`` (the batched extract embeddings) also check that the serving path (one small batch, no
    DataLoader) embeds exactly as extract did."""
    from imgsim.nn.embed import embed_array

    embed = engine or (lambda x: embed_array(model, x))
    probes = Probes.take(lambda x: embed(x)[0], read, index, seed=seed)
    if gallery is not None:
        worst = _worst(cosine_distances(gallery[probes.ids], probes.embeddings))
        if worst > PROBE_TOLERANCE:
            raise ImgsimError(f"the serving path embeds gallery images differently from extract (cosine distance "
                              f"up to {worst:.3g}); this is a bug in imgsim, please report it")
    return probes


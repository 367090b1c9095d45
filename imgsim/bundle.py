"""The ServingBundle artifact, read and verified: its files checked against their checksums, its model opened (ONNX
Runtime, or torch where asked) and proven, on a probe set, to be the model that built its index."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from numpy.typing import NDArray

from imgsim import atomic
from imgsim.bundle_base import base_folder, base_meta
from imgsim.bundle_format import (BASE_DIR, CHANGES_VERSION_FILES, EMBEDDER, FILES, PROBES_FILE, BaseRef, BundleError,
                                  Lineage, ModelSource, Probes, ShardInfo, index_backend, read_meta)
from imgsim.changes import CHANGE_FILES, Changes
from imgsim.effort import RECALL_TARGET
from imgsim.errors import ImgsimError
from imgsim.index import DEFAULT_SEARCH_K, EMBEDDINGS_FILE, INDEX_FILE, ITEMS_FILE, GalleryIndex
from imgsim.modelspec import INT8, ONNX_FILE, WEIGHTS, ModelSpec, cpu_int8, file_sha256

if TYPE_CHECKING:  # torch only to write a bundle or to serve with runtime="torch"
    from imgsim.nn.model import TrainedModel

RUNTIMES = ("onnx", "torch")
# The loaded model must reproduce the probe embeddings recorded at extract to this largest absolute difference
# (both float32 on the CPU: torch and ONNX Runtime agree far closer)...
PROBE_PARITY = 1e-4
# ...or this, for an int8 model.onnx: integer kernels differ by instruction set.
PROBE_PARITY_INT8 = 2e-3
# ...and those must match the index's own vectors to this cosine distance (1 - cos): the gallery may have been
# embedded in larger batches or on a GPU (TF32), while another model of the same shape differs by far more.
PROBE_TOLERANCE = 1e-3

# uint8 images (N, C, H, W) -> (normalised embeddings, logits): the PyTorch model or an ONNX Runtime session.
Engine = Callable[[NDArray[np.uint8]], tuple[NDArray[np.float32], NDArray[np.float32]]]


def cosine_distances(a: NDArray[np.float32], b: NDArray[np.float32]) -> NDArray[np.float64]:
    """Row-wise 1 - cos(a_i, b_i)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return 1.0 - (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def worst(distances: NDArray[np.float64]) -> float:
    """The largest distance; NaN (a model that outputs NaN) counts as a disagreement, which max() alone would not."""
    return float("inf") if not np.all(np.isfinite(distances)) else float(distances.max(initial=0.0))


@dataclasses.dataclass
class ServingBundle:
    """Everything the server loads, written together (atomically: imgsim.stages.bundle_writer) and verified together
    on load."""

    spec: ModelSpec
    index: GalleryIndex
    probes: Probes
    source: ModelSource  # the model it was built from
    search_k: int = DEFAULT_SEARCH_K  # what extract measured the index's recall with; the server's default
    index_recall: float | None = None  # recall@10 against exact search at that search_k
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # sha256 of each file, once saved or loaded
    torch_model: "TrainedModel | None" = None  # the torch model: given to write, loaded only for runtime="torch"
    engine: Engine | None = dataclasses.field(default=None, repr=False)  # set by load
    onnx_parity: float | None = None  # ONNX Runtime vs torch at export, largest absolute difference
    # An int8 model.onnx: how it was made (bundle.json's onnx.quantization; empty: float32) and its bytes to write.
    quantization: dict = dataclasses.field(default_factory=dict)
    onnx_model: bytes | None = dataclasses.field(default=None, repr=False)
    lineage: Lineage = dataclasses.field(default_factory=Lineage)  # a living gallery's (imgsim.stages.gallery)
    version: str = ""  # the registry version it was fetched as, when it was (not stored in the bundle)
    shard: ShardInfo | None = None  # one part of a sharded gallery (imgsim.sharded); None for a whole bundle
    base: BaseRef | None = None  # the base version of a version stored as changes; None for a whole gallery
    model_folder: Path | None = None  # where the model files were read from (the base's folder for changes)
    recall_target: float = RECALL_TARGET  # what the effort was tuned to (0: as given); a rebuilt index is too
    # A version stored as changes over its base (imgsim.changes): what ``index`` puts together; None when whole.
    changes: Changes | None = None

    @property
    def gallery_sha256(self) -> str:
        """The gallery's content identity: its index file's checksum, or for a version of changes one over its
        base's index and its change files (what the registry's compare-and-set compares)."""
        if self.changes is None:
            return self.files.get(INDEX_FILE, "")
        parts = [self.base.files[INDEX_FILE], *(self.files[name] for name in CHANGE_FILES)]
        return hashlib.sha256(" ".join(parts).encode()).hexdigest()

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
                base_path = base_folder(pinned, folder, meta, base)
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
            found = base_meta(model_dir, base_path, meta, folder)
            _check_files(model_dir, found, base_path, FILES)
            files = {**found["files"], **files}
        try:
            spec, probes = ModelSpec.load(model_dir), Probes.load(pinned / PROBES_FILE)
            index = GalleryIndex.load(model_dir, n_trees=int(meta["index"]["n_trees"]),
                                      next_id=int(meta["index"].get("next_id", -1)), backend=index_backend(meta))
            changes = None
            if base:
                try:
                    changes = Changes.load(index, pinned)
                    index = changes.index(next_id=int(meta["index"]["next_id"]))
                except ImgsimError as exc:  # changes that do not fit their base: loading again cannot help
                    raise BundleError(f"bundle {folder}: {exc}") from None
            source = {k: v for k, v in meta["model"].items() if k not in ("embedding_dim", "classes")}
            bundle = cls(spec, index, probes, ModelSource.from_json(source),
                         int(meta["index"].get("search_k", DEFAULT_SEARCH_K)), meta["index"].get("recall_at_10"), files,
                         onnx_parity=meta.get("onnx", {}).get("parity_max_abs"),
                         quantization=_quantization(meta, folder),
                         recall_target=float(meta["index"].get("recall_target", RECALL_TARGET)),
                         lineage=Lineage.from_json(meta.get("gallery")),
                         shard=ShardInfo.from_json(meta["shard"]) if meta.get("shard") else None,
                         base=BaseRef.from_json(meta["base"]) if meta.get("base") else None,
                         model_folder=Path(base[1] if base else folder), changes=changes)
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
        stored = worst(cosine_distances(np.asarray(self.index.embeddings[rows_in]), recorded))
        if stored > PROBE_TOLERANCE:
            problems.append(f"{EMBEDDINGS_FILE} holds other vectors for the probe items (cosine distance up to "
                            f"{stored:.3g}): the embeddings come from another model")
        # The index file must hold the probes' recorded vectors, and the stored embeddings on a spread of rows.
        indexed_vectors = self.index.ann.vectors
        spread = np.linspace(0, len(self.index.items) - 1, 16).astype(np.int64)
        # (A shard of a sharded gallery may hold none of the probe items: its spread rows still check it.)
        indexed = max(worst(cosine_distances(indexed_vectors(rows_in), recorded)) if len(rows_in) else 0.0,
                      worst(cosine_distances(indexed_vectors(spread), np.asarray(self.index.embeddings[spread]))))
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
        size = self.shard.items if self.shard is not None and self.shard.role == EMBEDDER else len(self.index.items)
        return {"model_name": self.source.name or "", "model_version": self.source.version or "",
                "model_sha256": self.files.get(WEIGHTS, "")[:12], "index_sha256": self.gallery_sha256[:12],
                "index_size": str(size), "bundle_version": self.version}


def _open_engine(bundle: ServingBundle, folder: Path, runtime: str, threads: int) -> Engine:
    if runtime == "onnx":
        from imgsim.serve.runtime import OnnxModel

        return OnnxModel(folder / ONNX_FILE, bundle.spec.preprocess, threads)
    try:
        import torch

        from imgsim.nn.embed import embed_array
        from imgsim.nn.model import TrainedModel
    except ImportError:
        raise ImgsimError("runtime 'torch' needs torch, which this installation (the serving image) does not "
                          "have: use runtime 'onnx'") from None
    torch.set_num_threads(max(1, threads))
    bundle.torch_model = TrainedModel.load(folder)
    net = bundle.torch_model.build()
    return lambda inputs: embed_array(net, inputs)


def _quantization(meta: dict, folder: str | Path) -> dict:
    """bundle.json's record of an int8 model.onnx; an arithmetic this imgsim does not know is refused."""
    quantization = dict(meta.get("onnx", {}).get("quantization") or {})
    if quantization and quantization.get("precision") != INT8:
        raise BundleError(f"bundle {folder} serves a model in {str(quantization.get('precision'))[:20]!r}, which this "
                          "imgsim does not know: it was made by a newer one")
    return quantization


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

"""The ServingBundle artifact: model + index + a probe set that proves they belong together, with checksums."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.typing import NDArray

from imgsim import atomic
from imgsim.errors import ImgsimError
from imgsim.index import DEFAULT_SEARCH_K, EMBEDDINGS_FILE, INDEX_FILE, ITEMS_FILE, IndexBundle
from imgsim.model import MODEL_JSON, WEIGHTS, ModelBundle, file_sha256

BUNDLE_JSON = "bundle.json"
PROBES_FILE = "probes.npz"
FORMAT_VERSION = 2
FILES = (MODEL_JSON, WEIGHTS, INDEX_FILE, ITEMS_FILE, EMBEDDINGS_FILE, PROBES_FILE)
PROBE_COUNT = 32
# Largest cosine distance (1 - cos) between an embedding recorded at extract and the same one recomputed at
# load. CPU vs GPU (TF32) or ONNX Runtime differ by ~1e-6; another model of the same shape by 0.05 or more.
PROBE_TOLERANCE = 1e-3

Embedder = Callable[[NDArray[np.uint8]], NDArray[np.float32]]


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
    def take(cls, embed: Embedder, read: Callable[[int], NDArray[np.uint8]], index: IndexBundle, *,
             count: int = PROBE_COUNT, seed: int = 42) -> "Probes":
        """Pick ``count`` gallery items spread over the index, read their inputs and embed them."""
        n = len(index.items)
        ids = np.sort(np.random.default_rng(seed).choice(n, size=min(count, n), replace=False)).astype(np.int64)
        inputs = np.stack([read(int(i)) for i in ids])
        return cls(ids, [index.items[i].sha256 for i in ids], inputs, np.asarray(embed(inputs), dtype=np.float32))

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

    model: ModelBundle
    index: IndexBundle
    probes: Probes
    source: dict  # the model it was built from: uri, and name/version/run_id when registered
    search_k: int = DEFAULT_SEARCH_K  # what extract measured the index's recall with; the server's default
    index_recall: float | None = None  # recall@10 against exact search at that search_k
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # sha256 of each file, once saved or loaded

    def save(self, out_dir: str | Path) -> Path:
        """Write the whole bundle into ``out_dir``, replacing any previous one in a single step."""
        out = Path(out_dir)
        with atomic.atomic_dir(out) as tmp:
            self.model.save(tmp)
            self.index.save(tmp)
            self.probes.save(tmp / PROBES_FILE)
            self.files = {name: file_sha256(tmp / name) for name in FILES}
            atomic.write_text(tmp / BUNDLE_JSON, json.dumps(self._meta(), indent=2))
        return out

    def _meta(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "model": {**self.source, "embedding_dim": self.model.args.dim, "classes": self.model.classes},
            "index": {"dim": self.index.dim, "metric": self.index.metric, "n_trees": self.index.n_trees,
                      "count": len(self.index.items), "search_k": self.search_k,
                      "recall_at_10": self.index_recall},
            "probes": {"count": len(self.probes.ids), "tolerance": PROBE_TOLERANCE},
            "files": self.files,
        }

    @classmethod
    def load(cls, folder: str | Path, *, verify: bool = True) -> "ServingBundle":
        """Check the files, load model and (memory-mapped) index, and :meth:`verify` them (a caller that
        embeds its own way passes ``verify=False`` and calls ``verify`` with its embedder).

        The folder is read as one version even if an export replaces it meanwhile (``FolderReplaced`` then:
        load again)."""
        with atomic.pinned_dir(folder) as pinned:
            meta = read_meta(pinned, folder)
            _check_files(pinned, meta, folder)
            try:
                model, probes = ModelBundle.load(pinned), Probes.load(pinned / PROBES_FILE)
                index = IndexBundle.load(pinned, n_trees=int(meta["index"]["n_trees"]))
                source = {k: v for k, v in meta["model"].items() if k not in ("embedding_dim", "classes")}
                bundle = cls(model, index, probes, source, int(meta["index"].get("search_k", DEFAULT_SEARCH_K)),
                             meta["index"].get("recall_at_10"), dict(meta["files"]))
            except (KeyError, ValueError, TypeError) as exc:
                raise BundleError(f"bundle {folder} cannot be read ({exc!r}); re-export it") from None
        if verify:
            bundle.verify()
        return bundle

    def verify(self, embed: Embedder | None = None) -> None:
        """Re-embed the probes and compare with what extract recorded and with the index's own vectors.

        Raises ``BundleError`` naming the part that disagrees."""
        problems = []
        if self.model.args.dim != self.index.dim:
            problems.append(f"the model embeds in {self.model.args.dim} dimensions, the index holds {self.index.dim}")
        elif self.probes.embeddings.shape[1:] != (self.index.dim,) or \
                self.probes.ids.max(initial=-1) >= len(self.index.items):
            problems.append(f"{PROBES_FILE} does not fit this index (dimension or ids out of range)")
        else:
            problems += self._disagreements(embed or _torch_embedder(self.model))
        if problems:
            raise BundleError("bundle is inconsistent: " + "; ".join(problems) + ". Re-export the bundle from one "
                              "extract run, so that model and index come from the same model.")

    def _disagreements(self, embed: Embedder) -> list[str]:
        ids, recorded = self.probes.ids, self.probes.embeddings
        problems = []
        recomputed = _worst(cosine_distances(embed(self.probes.inputs), recorded))
        if recomputed > PROBE_TOLERANCE:
            problems.append(f"{WEIGHTS} is not the model that built this index: it embeds the {len(ids)} probe "
                            f"images differently from extract (cosine distance up to {recomputed:.3g}, "
                            f"tolerance {PROBE_TOLERANCE:g})")
        stored = _worst(cosine_distances(np.asarray(self.index.embeddings[ids]), recorded))
        if stored > PROBE_TOLERANCE:
            problems.append(f"{EMBEDDINGS_FILE} holds other vectors for the probe items (cosine distance up to "
                            f"{stored:.3g}): the embeddings come from another model")
        annoy = np.asarray([self.index.annoy.get_item_vector(int(i)) for i in ids], dtype=np.float32)
        indexed = _worst(cosine_distances(annoy, recorded))
        if indexed > PROBE_TOLERANCE:
            problems.append(f"{INDEX_FILE} holds other vectors for the probe items (cosine distance up to "
                            f"{indexed:.3g}): the Annoy index was built from another model's embeddings")
        if [self.index.items[i].sha256 for i in ids] != self.probes.sha256:
            problems.append(f"{ITEMS_FILE} names other images for the probe ids: the item table belongs to "
                            "another gallery")
        return problems

    def identity(self) -> dict[str, str]:
        """Model and index identity for response tags, health and metadata."""
        return {"model_name": str(self.source.get("name", "")), "model_version": str(self.source.get("version", "")),
                "model_sha256": self.files.get(WEIGHTS, "")[:12], "index_sha256": self.files.get(INDEX_FILE, "")[:12],
                "index_size": str(len(self.index.items))}


def _worst(distances: NDArray[np.float64]) -> float:
    # NaN (a model that outputs NaN) must count as a disagreement, which max() alone would not guarantee.
    return float("inf") if not np.all(np.isfinite(distances)) else float(distances.max(initial=0.0))


def _torch_embedder(model: ModelBundle) -> Embedder:
    from imgsim.embed import embed_array

    net = model.build()
    return lambda inputs: embed_array(net, inputs)[0]


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
                          "probe set): run extract again with this version and export its bundle")
    return meta


def _check_files(folder: Path, meta: dict, name: str | Path) -> None:
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    problems = []
    for file in FILES:
        path = folder / file
        if not path.is_file():
            problems.append(f"{file} is missing")
        elif file_sha256(path) != files.get(file):
            problems.append(f"{file} does not match its recorded sha256")
    if problems:
        raise BundleError(f"bundle {name} is damaged: {'; '.join(problems)}. Export it again.")


def build_probes(model, index: IndexBundle, read: Callable[[int], NDArray[np.uint8]],
                 gallery: NDArray[np.float32] | None = None, seed: int = 42) -> Probes:
    """Probes for a fresh index; with ``gallery`` (the batched extract embeddings) also check that the serving
    path (one small batch, no DataLoader) embeds exactly as extract did."""
    from imgsim.embed import embed_array

    probes = Probes.take(lambda x: embed_array(model, x)[0], read, index, seed=seed)
    if gallery is not None:
        worst = _worst(cosine_distances(gallery[probes.ids], probes.embeddings))
        if worst > PROBE_TOLERANCE:
            raise ImgsimError(f"the serving path embeds gallery images differently from extract (cosine distance "
                              f"up to {worst:.3g}); this is a bug in imgsim, please report it")
    return probes


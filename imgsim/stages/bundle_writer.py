"""Writing a ServingBundle: its probe set taken from the gallery, then its files (the torch weights and their ONNX
export, or a parent's model files copied; the index or a version's changes; probes; bundle.json) in one step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.typing import NDArray

from imgsim import atomic
from imgsim.bundle import PROBE_TOLERANCE, Engine, ServingBundle, cosine_distances, worst
from imgsim.bundle_format import (BUNDLE_JSON, CHANGES_VERSION_FILES, FILES, FORMAT_VERSION, MODEL_FILES, PROBES_FILE,
                                  Probes)
from imgsim.errors import ImgsimError
from imgsim.index import GalleryIndex
from imgsim.modelspec import ONNX_FILE, OPSET, PARITY, file_sha256

PROBE_COUNT = 32


def write_bundle(bundle: ServingBundle, out_dir: str | Path, *, model_from: str | Path | None = None) -> Path:
    """Write the whole bundle into ``out_dir`` (the torch weights, their ONNX export checked against them, index,
    probes, checksums), replacing any previous one in a single step. ``model_from``: a bundle folder whose model
    files are copied byte for byte instead (a new gallery version of the same model). A version of changes writes
    only its changes and probes."""
    out = Path(out_dir)
    if bundle.changes is not None:
        return _write_changes(bundle, out)
    if bundle.torch_model is None and model_from is None:
        raise ImgsimError("a ServingBundle is written from the torch model: pass torch_model=TrainedModel")
    with atomic.atomic_dir(out) as tmp:
        if model_from is not None:
            for name in MODEL_FILES:
                shutil.copyfile(Path(model_from) / name, tmp / name)
        else:
            bundle.torch_model.save(tmp)
            if bundle.onnx_model is not None:
                (tmp / ONNX_FILE).write_bytes(bundle.onnx_model)  # inside the atomic folder
            else:
                # torch loads only here: a gallery change copies its model files.
                from imgsim.nn.onnx_export import export_onnx

                bundle.onnx_parity = export_onnx(bundle.torch_model, tmp / ONNX_FILE, bundle.probes.inputs)
        bundle.index.save(tmp)
        bundle.probes.save(tmp / PROBES_FILE)
        bundle.files = {name: file_sha256(tmp / name) for name in FILES}
        atomic.write_text(tmp / BUNDLE_JSON, json.dumps(bundle_meta(bundle), indent=2))
    return out


def _write_changes(bundle: ServingBundle, out: Path) -> Path:
    """Only what changed since the base version: the change files and the probes; the model files and the base's
    index stay the base's (bundle.json names them by checksum)."""
    if bundle.base is None or not bundle.base.files:
        raise ImgsimError("a gallery version of changes is written with its base version (ServingBundle.base)")
    with atomic.atomic_dir(out) as tmp:
        bundle.changes.save(tmp)
        bundle.probes.save(tmp / PROBES_FILE)
        bundle.files = {**bundle.base.files, **{name: file_sha256(tmp / name) for name in CHANGES_VERSION_FILES}}
        atomic.write_text(tmp / BUNDLE_JSON, json.dumps(bundle_meta(bundle), indent=2))
    return out


def bundle_meta(bundle: ServingBundle) -> dict:
    """bundle.json's content, from a bundle whose files have been written (``files`` holds their checksums)."""
    index, changes = bundle.index, bundle.changes
    return {
        "format_version": FORMAT_VERSION,
        "model": {**bundle.source.to_json(), "embedding_dim": bundle.spec.args.dim, "classes": bundle.spec.classes},
        "index": {"backend": index.backend, "dim": index.dim, "metric": index.metric, "n_trees": index.n_trees,
                  "count": len(index.items), "next_id": index.next_id, "search_k": bundle.search_k,
                  "recall_at_10": bundle.index_recall, "recall_target": bundle.recall_target},
        "gallery": bundle.lineage.to_json(),
        **({"shard": bundle.shard.to_json()} if bundle.shard is not None else {}),
        **({"base": bundle.base.to_json(), "changes": {"added": len(changes.added_items),
                                                       "removed": len(changes.removed)}}
           if changes is not None else {}),
        "probes": {"count": len(bundle.probes.ids), "tolerance": PROBE_TOLERANCE, "parity": bundle.probe_parity},
        "onnx": {"opset": OPSET, "parity_max_abs": bundle.onnx_parity, "tolerance": PARITY,
                 **({"quantization": bundle.quantization} if bundle.quantization else {})},
        "files": {name: bundle.files[name] for name in (CHANGES_VERSION_FILES if changes is not None else FILES)},
    }


def take_probes(embed: Callable[[NDArray[np.uint8]], NDArray[np.float32]], read: Callable[[int], NDArray[np.uint8]],
                index: GalleryIndex, *, count: int = PROBE_COUNT, seed: int = 42) -> Probes:
    """Pick ``count`` gallery items spread over the index (``read`` takes a row), read their inputs and embed them."""
    n = len(index.items)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(count, n), replace=False))
    inputs = np.stack([read(int(r)) for r in rows])
    return Probes(np.asarray([index.items[r].id for r in rows], dtype=np.int64), [index.items[r].sha256 for r in rows],
                  inputs, np.asarray(embed(inputs), dtype=np.float32))


def build_probes(model, index: GalleryIndex, read: Callable[[int], NDArray[np.uint8]],
                 gallery: NDArray[np.float32] | None = None, seed: int = 42, engine: Engine | None = None) -> Probes:
    """Probes for a fresh index, embedded by ``engine`` (the model served), else the torch ``model``; with
    ``gallery`` (the batched extract embeddings) also check that the serving path (one small batch, no
    DataLoader) embeds exactly as extract did."""
    embed = engine or _torch_engine(model)
    probes = take_probes(lambda x: embed(x)[0], read, index, seed=seed)
    if gallery is not None:
        distance = worst(cosine_distances(gallery[probes.ids], probes.embeddings))
        if distance > PROBE_TOLERANCE:
            raise ImgsimError(f"the serving path embeds gallery images differently from extract (cosine distance "
                              f"up to {distance:.3g}); this is a bug in imgsim, please report it")
    return probes


def _torch_engine(model) -> Engine:
    from imgsim.nn.embed import embed_array  # torch loads only where a torch model embeds

    return lambda inputs: embed_array(model, inputs)

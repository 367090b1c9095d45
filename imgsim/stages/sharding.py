"""Cutting a serving bundle into a sharded gallery's parts (the layout and its checks: imgsim.sharded)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from imgsim import atomic
from imgsim.bundle import ServingBundle
from imgsim.bundle_format import BUNDLE_JSON, EMBEDDER, SHARD, ShardInfo
from imgsim.effort import retune
from imgsim.errors import ImgsimError
from imgsim.index import GalleryIndex
from imgsim.sharded import MAX_SHARDS, part_name, shard_of
from imgsim.stages.bundle_writer import write_bundle


def shard_bundle(source: str | Path, out: str | Path, shards: int) -> dict:
    """Cut the bundle in ``source`` into an embedder part and ``shards`` index shards under ``out`` (replaced in
    one step). The source is loaded and verified first; each part is verified after it is written. Returns a
    summary: gallery id, items per shard, bytes written."""
    if not isinstance(shards, int) or not 2 <= shards <= MAX_SHARDS:
        raise ImgsimError(f"shards must be an integer between 2 and {MAX_SHARDS}, got {shards!r}")
    whole = ServingBundle.load(source)
    if whole.shard is not None:
        part = part_name(whole.shard.role, whole.shard.index or 0)
        raise ImgsimError(f"{source} is already one part ({part}) of a sharded gallery: shard the whole bundle it "
                          "came from")
    items, index = whole.index.items, whole.index
    ids = np.asarray([item.id for item in items], dtype=np.int64)
    owner = shard_of(ids, shards)
    counts = np.bincount(owner, minlength=shards)
    if not counts.all():
        raise ImgsimError(f"a gallery of {len(items)} images cannot fill {shards} shards (shard(s) "
                          f"{np.flatnonzero(counts == 0).tolist()} would be empty): use fewer shards")
    gallery = hashlib.sha256((Path(source) / BUNDLE_JSON).read_bytes()).hexdigest()[:16]
    labels = tuple(sorted({item.label for item in items}))
    embeddings = np.asarray(index.embeddings)
    probe_rows = sorted({r for r in (index.row(int(i)) for i in whole.probes.ids) if r is not None})
    parts = [(EMBEDDER, 0, np.asarray(probe_rows, dtype=np.int64))] + \
        [(SHARD, i, np.flatnonzero(owner == i)) for i in range(shards)]
    with atomic.atomic_dir(out) as tmp:
        for role, i, rows in parts:
            part = GalleryIndex.build(embeddings[rows], [items[r] for r in rows], n_trees=index.n_trees,
                                      next_id=index.next_id, backend=index.backend)
            search_k, recall = whole.search_k, whole.index_recall
            if role == SHARD:  # a rebuilt index: its effort measured again, as extract measures it
                search_k, measured = retune(part, embeddings[rows], whole.recall_target, whole.search_k,
                                            what=f"shard-bundle: shard {i}'s index")
                recall = whole.index_recall if measured is None else measured
            info = ShardInfo(role, shards, gallery, len(items), tuple(counts.tolist()), index.next_id, labels,
                             i if role == SHARD else None)
            bundle = ServingBundle(whole.spec, part, whole.probes, whole.source, search_k, recall,
                                   onnx_parity=whole.onnx_parity, quantization=whole.quantization,
                                   lineage=whole.lineage, recall_target=whole.recall_target, shard=info)
            write_bundle(bundle, tmp / part_name(role, i), model_from=whole.model_folder)
        for role, i, _ in parts:  # the probe check of every part, before the folder replaces the old one
            ServingBundle.load(tmp / part_name(role, i))
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    return {"gallery": gallery, "shards": shards, "items": len(items), "shard_items": counts.tolist(),
            "bytes": written, "out": str(out)}

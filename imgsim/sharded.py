"""A sharded gallery: one serving bundle cut into an embedder part and N index shards, served by a Seldon graph.

Layout of the folder ``shard_bundle`` writes (each part a complete, verifiable ServingBundle)::

    OUT/embedder/   the model, with an index over the probe items only (the probe check needs one)
    OUT/shard-0/    the model, and the index over the items whose id % N == 0
    ...
    OUT/shard-<N-1>/

Every part's bundle.json carries ``shard``: its role and index, the shard count, the whole gallery's identity
(the checksum of the source bundle.json) and size, each shard's item count, and the gallery's labels (a label
filter is checked against the whole gallery, not one shard). Items keep their gallery ids; an item lives in
shard ``id % N``, so later ids spread evenly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from imgsim import atomic
from imgsim.bundle import BUNDLE_JSON, BundleError, ServingBundle
from imgsim.effort import retune
from imgsim.errors import ImgsimError
from imgsim.index import IndexBundle

EMBEDDER, SHARD = "embedder", "shard"
MAX_SHARDS = 256


def part_name(role: str, index: int = 0) -> str:
    """The folder (and graph node) name of one part: ``embedder`` or ``shard-<index>``."""
    return EMBEDDER if role == EMBEDDER else f"{SHARD}-{index}"


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard each gallery id lives in."""
    return np.asarray(ids, dtype=np.int64) % shards


def shard_bundle(source: str | Path, out: str | Path, shards: int) -> dict:
    """Cut the bundle in ``source`` into an embedder part and ``shards`` index shards under ``out`` (replaced in
    one step). The source is loaded and verified first; each part is verified after it is written. Returns a
    summary: gallery id, items per shard, bytes written."""
    if not isinstance(shards, int) or not 2 <= shards <= MAX_SHARDS:
        raise ImgsimError(f"shards must be an integer between 2 and {MAX_SHARDS}, got {shards!r}")
    whole = ServingBundle.load(source)
    if whole.shard:
        part = part_name(whole.shard["role"], whole.shard.get("index", 0))
        raise ImgsimError(f"{source} is already one part ({part}) of a sharded gallery: shard the whole bundle it "
                          "came from")
    items, index = whole.index.items, whole.index
    ids = np.asarray([item.id for item in items], dtype=np.int64)
    owner = shard_of(ids, shards)
    counts = np.bincount(owner, minlength=shards)
    if not counts.all():
        raise ImgsimError(f"a gallery of {len(items)} images cannot fill {shards} shards (shard(s) "
                          f"{np.flatnonzero(counts == 0).tolist()} would be empty): use fewer shards")
    common = {"count": shards, "gallery": hashlib.sha256((Path(source) / BUNDLE_JSON).read_bytes()).hexdigest()[:16],
              "items": len(items), "shard_items": counts.tolist(), "next_id": index.next_id,
              "labels": sorted({item.label for item in items})}
    embeddings = np.asarray(index.embeddings)
    probe_rows = sorted({r for r in (index.row(int(i)) for i in whole.probes.ids) if r is not None})
    parts = [(EMBEDDER, 0, np.asarray(probe_rows, dtype=np.int64))] + \
        [(SHARD, i, np.flatnonzero(owner == i)) for i in range(shards)]
    with atomic.atomic_dir(out) as tmp:
        for role, i, rows in parts:
            part = IndexBundle.build(embeddings[rows], [items[r] for r in rows], n_trees=index.n_trees,
                                     next_id=index.next_id, backend=index.backend)
            search_k, recall = whole.search_k, whole.index_recall
            if role == SHARD:  # a rebuilt index: its effort measured again, as extract measures it
                search_k, measured = retune(part, embeddings[rows], whole.recall_target, whole.search_k,
                                            what=f"shard-bundle: shard {i}'s index")
                recall = whole.index_recall if measured is None else measured
            bundle = ServingBundle(whole.spec, part, whole.probes, dict(whole.source), search_k,
                                   recall, onnx_parity=whole.onnx_parity,
                                   quantization=whole.quantization, lineage=dict(whole.lineage),
                                   recall_target=whole.recall_target,
                                   shard={"role": role, **({"index": i} if role == SHARD else {}), **common})
            bundle.save(tmp / part_name(role, i), model_from=whole.model_folder)
        for role, i, _ in parts:  # the probe check of every part, before the folder replaces the old one
            ServingBundle.load(tmp / part_name(role, i))
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    return {"gallery": common["gallery"], "shards": shards, "items": len(items), "shard_items": counts.tolist(),
            "bytes": written, "out": str(out)}


def check_part(bundle: ServingBundle, role: str, index: int, shards: int, where: str) -> None:
    """Refuse to serve a part other than the one the graph node was configured for (``role``, shard ``index``
    of ``shards``): a server never becomes ready on the wrong or an incomplete part of a sharded gallery."""
    info = bundle.shard
    want = part_name(role, index)
    if not info:
        raise BundleError(f"{where} is a whole bundle, not the {want} part of a sharded gallery: write one with "
                          f"'imgsim shard-bundle BUNDLE --shards {shards} --out DIR' and point this node at DIR/{want}")
    got = part_name(info.get("role", ""), int(info.get("index", 0)))
    if got != want or int(info.get("count", 0)) != shards:
        raise BundleError(f"{where} holds part {got} of a {info.get('count')}-shard gallery; this node serves {want} "
                          f"of {shards} shards: point it at that part's folder, or set its shards to "
                          f"{info.get('count')}")
    if role == SHARD and len(bundle.index.items) != int(info["shard_items"][index]):
        raise BundleError(f"{where}: shard {index} holds {len(bundle.index.items)} items, the sharded gallery "
                          f"recorded {info['shard_items'][index]}: write the sharded gallery again")

"""A sharded gallery: one serving bundle cut into an embedder part and N index shards, served by a Seldon graph.

Layout of the folder ``imgsim.stages.sharding.shard_bundle`` writes (each part a complete, verifiable ServingBundle)::

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

import numpy as np

from imgsim.bundle import ServingBundle
from imgsim.bundle_format import EMBEDDER, SHARD, BundleError

MAX_SHARDS = 256


def part_name(role: str, index: int = 0) -> str:
    """The folder (and graph node) name of one part: ``embedder`` or ``shard-<index>``."""
    return EMBEDDER if role == EMBEDDER else f"{SHARD}-{index}"


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard each gallery id lives in."""
    return np.asarray(ids, dtype=np.int64) % shards


def check_part(bundle: ServingBundle, role: str, index: int, shards: int, where: str) -> None:
    """Refuse to serve a part other than the one the graph node was configured for (``role``, shard ``index``
    of ``shards``): a server never becomes ready on the wrong or an incomplete part of a sharded gallery."""
    info = bundle.shard
    want = part_name(role, index)
    if info is None:
        raise BundleError(f"{where} is a whole bundle, not the {want} part of a sharded gallery: write one with "
                          f"'imgsim shard-bundle BUNDLE --shards {shards} --out DIR' and point this node at DIR/{want}")
    got = part_name(info.role, info.index or 0)
    if got != want or info.count != shards:
        raise BundleError(f"{where} holds part {got} of a {info.count}-shard gallery; this node serves {want} "
                          f"of {shards} shards: point it at that part's folder, or set its shards to {info.count}")
    if role == SHARD and len(bundle.index.items) != info.shard_items[index]:
        raise BundleError(f"{where}: shard {index} holds {len(bundle.index.items)} items, the sharded gallery "
                          f"recorded {info.shard_items[index]}: write the sharded gallery again")

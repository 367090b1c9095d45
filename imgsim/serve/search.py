"""Top-k similarity search over a bundle: the one code path both the pipeline and the server use."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from imgsim.bundle import ServingBundle
from imgsim.errors import BadInput
from imgsim.index import GalleryIndex, angular_from_cosine, cosine_from_angular, row_blocks, top_in_blocks


@dataclasses.dataclass(frozen=True)
class Neighbour:
    """One ranked gallery item; ``score`` is cosine similarity, ``distance`` Annoy's angular distance."""

    rank: int
    id: int
    path: str
    label: str
    distance: float
    score: float


# Filtered queries: with at most this many admissible items, rank them exactly (a few ms at 128-d); with more,
# ask the index for OVERFETCH x k candidates at a time (up to MAX_FETCH), then rank the admissible rest exactly.
EXACT_FILTER_ITEMS, OVERFETCH, MAX_FETCH = 20_000, 4, 4096
MAX_FILTER_IDS = 1000  # excluded ids per query


@dataclasses.dataclass(frozen=True)
class Filter:
    """What a query may return: items with one of ``labels`` (None: any), minus the ids in ``exclude_ids``."""

    labels: frozenset[str] | None = None
    exclude_ids: frozenset[int] = frozenset()

    def admits(self, label: str, item_id: int) -> bool:
        return (self.labels is None or label in self.labels) and item_id not in self.exclude_ids


@dataclasses.dataclass(frozen=True)
class QueryResult:
    """The neighbours of one query and the model's class prediction for it."""

    neighbours: list[Neighbour]
    predicted_label: str | None  # None for an embed-only model (no classes)
    probability: float | None


class Searcher:
    """Loads and verifies a bundle once; answers image and id queries. No torch with the default runtime."""

    def __init__(self, folder: str | Path, *, search_k: int = 0, runtime: str = "onnx", threads: int = 1,
                 version: str = "") -> None:
        """``search_k`` 0: the one the bundle's index recall was measured with at extract; ``runtime``: onnx
        (ONNX Runtime) or torch; ``threads``: the runtime's threads; ``version``: the registry version the
        bundle was fetched as (answers name it)."""
        self.bundle = ServingBundle.load(folder, runtime=runtime, threads=threads)
        self.bundle.version = version
        self.index = self.bundle.index
        self.preprocess = self.bundle.spec.preprocess
        self.classes = self.bundle.spec.classes
        self.search_k = search_k or self.bundle.search_k

    @property
    def index(self) -> GalleryIndex:
        return self._index

    @index.setter
    def index(self, index: GalleryIndex) -> None:
        # What the filters derive from the items, built at first use, goes with the index it was built from.
        self._index = index
        self._rows_by_label: dict[str, np.ndarray] | None = None
        self._label_of_row = np.zeros(0, dtype=np.int64)  # each row's label as a number (built with _rows_by_label)
        self._ids: np.ndarray | None = None  # each row's item id, for exclude_ids

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def size(self) -> int:
        return len(self.index.items)

    @property
    def gallery_size(self) -> int:
        """Images in the whole gallery: this bundle's, or all shards' when it is one part of a sharded gallery."""
        return self.bundle.shard.items if self.bundle.shard is not None else self.size

    def embed_inputs(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and class probabilities for preprocessed uint8 inputs (N, C, H, W)."""
        embedding, logits = self.bundle.engine(inputs)
        return embedding, _softmax(logits)

    def search_bytes(self, payloads: Sequence[bytes], k: int, where: Filter | None = None) -> list[QueryResult]:
        """Top-``k`` neighbours of each image file's bytes."""
        embeddings, probs = self.embed_inputs(np.stack([self.preprocess.decode(data) for data in payloads]))
        return [self.rank(e, p, k, where) for e, p in zip(embeddings, probs)]

    def search_id(self, item_id: int, k: int, where: Filter | None = None) -> QueryResult:
        """"More like this": neighbours of a gallery item (the item itself ranks first)."""
        row = self.index.row(item_id)
        if row is None:
            raise BadInput(f"unknown gallery id {_short(item_id)}: not in this gallery version ({self.size} images, "
                           f"ids below {self.index.next_id}); it was never added, or was removed")
        label = self.index.items[row].label
        probs = np.eye(len(self.classes), dtype=np.float32)[self.classes.index(label)] \
            if label in self.classes else np.zeros(len(self.classes), dtype=np.float32)
        return self.rank(np.asarray(self.index.embeddings[row]), probs, k, where)

    def check_filter(self, where: Filter) -> None:
        """A clear error for a filter that names a label this gallery does not hold."""
        # One part of a sharded gallery checks against the whole gallery's labels, which it records.
        known = set(self.bundle.shard.labels) if self.bundle.shard is not None else self._label_rows().keys()
        unknown = sorted(where.labels - known) if where.labels is not None else []
        if unknown:  # (the client's labels quoted short: a megabyte label would come back whole, and be logged)
            raise BadInput(f"unknown label(s) {_quoted(unknown, 3, 30)} in 'labels'; this gallery holds "
                           f"{len(known)} labels: {_quoted(sorted(known), 20, 40)}")

    def _label_rows(self) -> dict[str, np.ndarray]:
        """Each label's rows, in row order (built once)."""
        if self._rows_by_label is None:
            groups: dict[str, list[int]] = {}
            for row, item in enumerate(self.index.items):
                groups.setdefault(item.label, []).append(row)
            self._rows_by_label = {label: np.asarray(rows, dtype=np.int64) for label, rows in groups.items()}
            self._label_of_row = np.zeros(self.size, dtype=np.int64)  # a label's number: its place in the dict
            for number, rows in enumerate(self._rows_by_label.values()):
                self._label_of_row[rows] = number
        return self._rows_by_label

    def _admitted(self, rows: np.ndarray, where: Filter) -> np.ndarray:
        """The mask of ``rows`` (an array) that ``where`` admits, tested as arrays: no Python loop over rows."""
        keep = self._not_excluded(rows, self._excluded(where))
        if where.labels is not None:
            numbers = [n for n, label in enumerate(self._label_rows()) if label in where.labels]
            keep &= np.isin(self._label_of_row[rows], numbers)
        return keep

    def _excluded(self, where: Filter) -> np.ndarray:
        # (ids past int64 name no item, and would overflow the array)
        return np.asarray([i for i in where.exclude_ids if -2 ** 63 <= i < 2 ** 63], dtype=np.int64)

    def _not_excluded(self, rows: np.ndarray, excluded: np.ndarray) -> np.ndarray:
        if not len(excluded):
            return np.ones(len(rows), dtype=bool)
        if self._ids is None:
            self._ids = np.fromiter((item.id for item in self.index.items), dtype=np.int64, count=self.size)
        return ~np.isin(self._ids[rows], excluded)

    def nearest(self, embedding: np.ndarray, k: int, where: Filter | None = None) -> tuple[list[int], list[float]]:
        """Rows and angular distances of the ``k`` nearest admissible items: as many as the gallery has when
        fewer are admissible."""
        if where is None or (where.labels is None and not where.exclude_ids):
            return self.index.search(embedding, k, self.search_k)
        if where.labels is not None:
            # The labels' rows, block by block, never concatenated (ties rank in this order: sorted labels, rows).
            groups = [self._label_rows()[label] for label in sorted(where.labels) if label in self._label_rows()]
            if sum(len(rows) for rows in groups) <= EXACT_FILTER_ITEMS:
                return self._exact(embedding, k, groups, where)
        fetch = k
        while True:
            fetch = min(self.size, fetch * OVERFETCH + len(where.exclude_ids))
            # Annoy stops after search_k nodes: give it room for the larger answer (faiss-hnsw widens by itself).
            rows, dists = self.index.search(embedding, fetch, max(self.search_k, fetch * self.index.n_trees))
            kept = np.flatnonzero(self._admitted(np.asarray(rows, dtype=np.int64), where))[:k]
            if len(kept) >= k or fetch >= self.size:
                return [rows[i] for i in kept], [dists[i] for i in kept]
            if fetch >= MAX_FETCH:  # a filter that admits little of a large gallery: rank what it admits
                everything = [range(self.size)] if where.labels is None else groups
                return self._exact(embedding, k, everything, where)

    def _exact(self, embedding: np.ndarray, k: int, groups: list[np.ndarray | range], where: Filter) -> \
            tuple[list[int], list[float]]:
        """The k nearest admissible of ``groups``' rows by exact search, EXACT_BLOCK rows at a time (memory follows
        the block, not the label's size); equal scores in the order of the rows given."""
        excluded = self._excluded(where)
        blocks = (block[self._not_excluded(block, excluded)] if len(excluded) else block
                  for rows in groups for block in row_blocks(rows))
        rows, sims = top_in_blocks(self.index.embeddings, blocks, embedding, k)
        return rows.tolist(), angular_from_cosine(sims).tolist()

    def rank(self, embedding: np.ndarray, probs: np.ndarray, k: int, where: Filter | None = None) -> QueryResult:
        """The ``k`` nearest gallery items to one embedding (those ``where`` admits), with the class prediction
        ``probs``."""
        rows, dists = self.nearest(embedding, k, where)
        items = self.index.items
        neighbours = [Neighbour(rank + 1, items[r].id, items[r].path, items[r].label, float(d), cosine_from_angular(d))
                      for rank, (r, d) in enumerate(zip(rows, dists))]
        if not len(probs) or not probs.any():  # embed-only model, or an added image with no class label
            return QueryResult(neighbours, None, None)
        best = int(np.argmax(probs))
        return QueryResult(neighbours, self.classes[best], float(probs[best]))


def _quoted(texts: list[str], most: int, each: int) -> str:
    """At most ``most`` of ``texts``, each cut to about ``each`` characters: a list echoed into a message."""
    shown = []
    for text in texts[:most]:
        quoted = repr(text[:each])  # (cut before repr: repr of a megabyte is a megabyte)
        shown.append(quoted if len(text) <= each and len(quoted) <= each + 2 else quoted[:each + 2] + "...")
    return f"[{', '.join(shown)}]" + (f" and {len(texts) - most} more" if len(texts) > most else "")


def _short(value: int) -> str:
    text = str(value)
    return text if len(text) <= 20 else text[:20] + "..."


def _softmax(logits: np.ndarray) -> np.ndarray:
    if not logits.shape[1]:  # an embed-only model: no classes
        return logits
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def make_answer(searcher: Searcher, results: list[QueryResult]) -> dict:
    """The answer, naming the model and gallery version that produced it."""
    # (a plain dict per neighbour: dataclasses.asdict deep-copies every field, a cost on every answer)
    return {"results": [{"neighbours": [dict(vars(n)) for n in r.neighbours],
                         "predicted": None if r.predicted_label is None else
                         {"label": r.predicted_label, "probability": r.probability}}
                        for r in results],
            **searcher.bundle.identity()}

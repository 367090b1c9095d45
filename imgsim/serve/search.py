"""Top-k similarity search over a bundle: the one code path both the pipeline and the server use."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from imgsim.bundle import ServingBundle
from imgsim.errors import BadInput
from imgsim.index import cosine_from_angular


@dataclasses.dataclass(frozen=True)
class Neighbour:
    """One ranked gallery item; ``score`` is cosine similarity, ``distance`` Annoy's angular distance."""

    rank: int
    id: int
    path: str
    label: str
    distance: float
    score: float


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
    def version(self) -> str:
        return self.bundle.version

    @property
    def size(self) -> int:
        return len(self.index.items)

    def embed_inputs(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and class probabilities for preprocessed uint8 inputs (N, C, H, W)."""
        embedding, logits = self.bundle.engine(inputs)
        return embedding, _softmax(logits)

    def search_bytes(self, payloads: Sequence[bytes], k: int) -> list[QueryResult]:
        """Top-``k`` neighbours of each image file's bytes."""
        embeddings, probs = self.embed_inputs(np.stack([self.preprocess.decode(data) for data in payloads]))
        return [self.rank(e, p, k) for e, p in zip(embeddings, probs)]

    def search_id(self, item_id: int, k: int) -> QueryResult:
        """"More like this": neighbours of a gallery item (the item itself ranks first)."""
        row = self.index.row(item_id)
        if row is None:
            raise BadInput(f"unknown gallery id {_short(item_id)}: not in this gallery version ({self.size} images, "
                           f"ids below {self.index.next_id}); it was never added, or was removed")
        label = self.index.items[row].label
        probs = np.eye(len(self.classes), dtype=np.float32)[self.classes.index(label)] \
            if label in self.classes else np.zeros(len(self.classes), dtype=np.float32)
        return self.rank(np.asarray(self.index.embeddings[row]), probs, k)

    def rank(self, embedding: np.ndarray, probs: np.ndarray, k: int) -> QueryResult:
        """The ``k`` nearest gallery items to one embedding, with the class prediction ``probs``."""
        rows, dists = self.index.search(embedding, k, self.search_k)
        items = self.index.items
        neighbours = [Neighbour(rank + 1, items[r].id, items[r].path, items[r].label, float(d), cosine_from_angular(d))
                      for rank, (r, d) in enumerate(zip(rows, dists))]
        if not len(probs) or not probs.any():  # embed-only model, or an added image with no class label
            return QueryResult(neighbours, None, None)
        best = int(np.argmax(probs))
        return QueryResult(neighbours, self.classes[best], float(probs[best]))


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
    return {"results": [{"neighbours": [dataclasses.asdict(n) for n in r.neighbours],
                         "predicted": None if r.predicted_label is None else
                         {"label": r.predicted_label, "probability": r.probability}}
                        for r in results],
            **searcher.bundle.identity()}

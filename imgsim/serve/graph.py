"""The three nodes of a sharded gallery's Seldon graph, protocol-independent (model_server/ adapts them).

    TRANSFORMER embedder -> COMBINER merger -> MODEL shard-0 ... shard-<N-1>

Seldon's executor sends a query to the embedder's ``transform-input``, the embedder's answer to every shard's
``predict``, and the shards' answers together to the merger's ``aggregate``. The embedder decodes and embeds once
per query; each shard ranks its own items; the merger checks that every shard answered exactly once, from one
gallery, with an answer a shard gives, and merges their top-k into the answer a single server gives (same fields,
ids, distances, scores).
"""

from __future__ import annotations

import dataclasses
import heapq
import numbers
import time
from typing import Any

import numpy as np

from imgsim.bundle_format import EMBEDDER, SHARD
from imgsim.errors import BadInput, ImgsimError
from imgsim.index import cosine_from_angular
from imgsim.serve import inputs
from imgsim.serve.query import Answer, Query, UpstreamError, filters_of
from imgsim.serve.search import Filter, Searcher
from imgsim.serve.service import SimilarityService, ms_since
from imgsim.serve.settings import ServiceConfig
from imgsim.sharded import check_part


def _graph_settings(cfg: ServiceConfig, node: str) -> None:
    if not cfg.shards:
        raise ImgsimError(f"the {node} node of a sharded gallery needs 'shards' (the gallery's shard count, 2 or more)")


class EmbedService(SimilarityService):
    """The graph's TRANSFORMER: validates the query as a single server would, decodes and embeds it once."""

    def __init__(self, cfg: ServiceConfig) -> None:
        _graph_settings(cfg, EMBEDDER)
        super().__init__(cfg)

    def accept(self, searcher: Searcher, where: str) -> None:
        check_part(searcher.bundle, EMBEDDER, 0, self.cfg.shards, where)

    def answer_id(self, item_id: int, searcher: Searcher, k: int, where: Filter | None) -> Answer:
        raise BadInput("a sharded gallery answers image queries only ('id' needs the item's shard): send the "
                       "image, or its 'path'")

    def answer_embedded(self, embeddings: np.ndarray, probs: np.ndarray, searcher: Searcher, k: int,
                        where: Filter | None, timings: dict[str, float]) -> Answer:
        """The embedder's message for the shards: the query's embeddings, predicted classes, k and filter."""
        # float32 -> Python float -> JSON -> float32 is exact, so each shard ranks the very vector embedded here.
        results = []
        for embedding, p in zip(embeddings, probs):
            best = int(np.argmax(p)) if len(p) and p.any() else None
            results.append({"embedding": embedding.tolist(), "predicted": None if best is None else
                            {"label": searcher.classes[best], "probability": float(p[best])}})
        query_fields = {"k": k, "labels": None if where is None or where.labels is None else sorted(where.labels),
                        "exclude_ids": [] if where is None else sorted(where.exclude_ids)}
        return Answer({"results": results, "query": query_fields, "gallery": searcher.bundle.shard.gallery,
                       **_identity(searcher)}, timings)


NOT_A_MESSAGE = ("an index shard answers the embedder's message (jsonData with 'results' and 'query'); send queries "
                 "to the graph, not to a shard")


class ShardService(SimilarityService):
    """One index-shard MODEL: ranks its own items for the embeddings the embedder sent."""

    def __init__(self, cfg: ServiceConfig) -> None:
        _graph_settings(cfg, SHARD)
        super().__init__(cfg)

    def accept(self, searcher: Searcher, where: str) -> None:
        check_part(searcher.bundle, SHARD, self.cfg.shard, self.cfg.shards, where)

    def answer(self, query: Query) -> Answer:
        """Refused: a shard holds part of the gallery, so its answer to a client's query would miss the rest."""
        raise BadInput(NOT_A_MESSAGE)

    def rank(self, message: Any) -> Answer:
        """This shard's nearest items for each embedding of the embedder's ``message`` (the graph's own JSON,
        not a client's query)."""
        searcher = self.serving()
        started = time.perf_counter()
        if not isinstance(message, dict) or not isinstance(message.get("results"), list) or \
                not isinstance(message.get("query"), dict):
            raise BadInput(NOT_A_MESSAGE)
        gallery = searcher.bundle.shard.gallery
        if message.get("gallery") != gallery:
            raise ImgsimError(f"the embedder serves gallery {str(message.get('gallery'))[:20]!r}, shard "
                              f"{self.cfg.shard} serves {gallery!r}: roll out one sharded gallery to every node")
        query, results = message["query"], message["results"]
        if not 1 <= len(results) <= self.cfg.max_batch:
            raise BadInput(f"'results' must hold 1 to {self.cfg.max_batch} embeddings, got {len(results)}")
        k = self.k_within(inputs.integer(query.get("k"), "k"), searcher)
        where = filters_of(query.get("labels"), query.get("exclude_ids") or None)
        items, answers = searcher.index.items, []
        for i, result in enumerate(results):
            vector = _embedding(result, searcher.index.dim, i)
            rows, dists = searcher.nearest(vector, min(k, searcher.size), where)
            answers.append({"neighbours": [{"id": items[r].id, "path": items[r].path, "label": items[r].label,
                                            "distance": float(d)} for r, d in zip(rows, dists)],
                            "predicted": result.get("predicted")})
        answer = {"results": answers, "query": query, "gallery": gallery, "shard": self.cfg.shard,
                  "shards": self.cfg.shards, "items": searcher.size, **_identity(searcher)}
        return Answer(answer, {"search": ms_since(started)})


def _embedding(result: Any, dim: int, i: int) -> np.ndarray:
    vector = result.get("embedding") if isinstance(result, dict) else None
    if not isinstance(vector, list) or len(vector) != dim:
        raise BadInput(f"results[{i}].embedding must be a list of {dim} numbers")
    try:
        array = np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError):
        raise BadInput(f"results[{i}].embedding must be a list of {dim} numbers") from None
    if not np.all(np.isfinite(array)):
        raise BadInput(f"results[{i}].embedding holds a non-finite number")
    return array


def _identity(searcher: Searcher) -> dict[str, str]:
    return {key: value for key, value in searcher.bundle.identity().items() if key != "index_size"}



# Unit vectors' angular distance sqrt(2 - 2 cos) lies in [0, 2]; Annoy computes it in float32, so opposite vectors
# may come out a rounding error past 2.
MAX_DISTANCE, DISTANCE_SLACK = 2.0, 1e-6
MAX_ID = 2**53  # ids travel as doubles over gRPC: exact only below 2**53
IDENTITY = ("model_name", "model_version", "model_sha256", "bundle_version")


class ShardAnswerError(UpstreamError):
    """A shard's answer the merger cannot use: the graph's fault, not the client's (HTTP 502)."""


@dataclasses.dataclass(frozen=True)
class Merger:
    """The graph's COMBINER: one ranked answer from all shards' answers. Holds no bundle: ready at once. It trusts no
    shard: a shard's bad answer fails the query with ``ShardAnswerError``, never a wrong or invalid answer."""

    shards: int

    @classmethod
    def from_config(cls, cfg: ServiceConfig) -> "Merger":
        _graph_settings(cfg, "merger")
        return cls(cfg.shards)

    def merge(self, answers: list[Any]) -> dict:
        """The answer a single server gives over the whole gallery: each query's k nearest over all shards (ties
        broken by id), with rank, distance and score. Raises ``ImgsimError`` if a shard is missing or answered
        twice, or the shards serve different galleries; ``ShardAnswerError`` for an answer no shard gives (a field
        missing or of another type, a distance outside [0, 2], an id twice or in another shard's part)."""
        seen = self._by_shard(answers)
        first = seen[0]
        k = _whole(first["query"].get("k"))
        if k is None or k < 1:
            raise _unusable(0, f"query.k must be a whole number of at least 1, got {_short(first['query'].get('k'))}")
        for shard, answer in seen.items():
            if answer["query"] != first["query"] or len(answer["results"]) != len(first["results"]):
                raise _unusable(shard, "its query or its number of results differs from shard 0's: every shard "
                                "answers the embedder's one message")
        if not first["results"]:
            raise _unusable(0, "'results' is empty")
        results = [{"neighbours": self._ranked(seen, q, k),
                    "predicted": _predicted(first["results"][q].get("predicted"), q)}
                   for q in range(len(first["results"]))]
        identity = {key: first[key] for key in IDENTITY if key in first}
        return {"results": results, **identity, "index_sha256": first["gallery"],
                "index_size": str(sum(a["items"] for a in seen.values())), "shards": str(self.shards)}

    def _by_shard(self, answers: Any) -> dict[int, dict]:
        """Each shard's answer by its number, its fields checked; the graph's faults as ``ImgsimError``."""
        if not isinstance(answers, list):
            raise ShardAnswerError("the merger takes the shards' answers (a list of jsonData objects)")
        seen: dict[int, dict] = {}
        for position, answer in enumerate(answers):
            shard = _whole(answer.get("shard")) if isinstance(answer, dict) else None
            if shard is None or _whole(answer.get("shards")) is None:
                raise ShardAnswerError(f"message {position} of {len(answers)} is not an index shard's answer (no "
                                       f"whole 'shard' and 'shards'): {_short(answer)}")
            if answer["shards"] != self.shards or not 0 <= shard < self.shards:
                raise ImgsimError(f"an answer from shard {_short(shard)} of {_short(answer['shards'])} reached a "
                                  f"merger of {self.shards} shards: every node of the graph needs the same 'shards'")
            if shard in seen:
                raise ImgsimError(f"shard {shard} answered twice: the graph lists it twice; each of the {self.shards} "
                                  "shards must appear once")
            seen[shard] = _checked_fields(answer, shard)
        missing = sorted(set(range(self.shards)) - seen.keys())
        if missing:
            raise ImgsimError(f"shard(s) {missing} of {self.shards} did not answer: the graph must list every shard")
        galleries = sorted({a["gallery"] for a in seen.values()})
        if len(galleries) > 1:
            raise ImgsimError(f"the shards serve different galleries ({', '.join(g[:20] for g in galleries)}): "
                              "roll out one sharded gallery to every node")
        return dict(sorted(seen.items()))

    def _ranked(self, seen: dict[int, dict], q: int, k: int) -> list[dict]:
        """Query ``q``'s k nearest over every shard's neighbours, each checked, each id once."""
        owner: dict[int, int] = {}
        pooled = []
        for shard, answer in seen.items():
            result = answer["results"][q]
            neighbours = result.get("neighbours") if isinstance(result, dict) else None
            if not isinstance(neighbours, list) or len(neighbours) > k:
                raise _unusable(shard, f"results[{q}].neighbours must be a list of at most k={k}")
            for n in neighbours:
                distance, item_id, path, label = _neighbour(n, shard, q)
                if item_id in owner:
                    raise _unusable(shard, f"gallery id {item_id} in results[{q}] came from shard {owner[item_id]} "
                                    "too: each id is in one shard, once")
                if item_id % self.shards != shard:  # an item lives in shard id % N (imgsim.sharded.shard_of)
                    raise _unusable(shard, f"gallery id {item_id} lives in shard {item_id % self.shards}")
                owner[item_id] = shard
                pooled.append((distance, item_id, path, label))
        best = heapq.nsmallest(k, pooled, key=lambda entry: entry[:2])
        return [{"rank": rank + 1, "id": item_id, "path": path, "label": label, "distance": distance,
                 "score": cosine_from_angular(distance)} for rank, (distance, item_id, path, label) in enumerate(best)]


def _checked_fields(answer: dict, shard: int) -> dict:
    """``answer`` once its fields other than the neighbours have the types an index shard sends."""
    if not isinstance(answer.get("query"), dict) or not isinstance(answer.get("results"), list):
        raise _unusable(shard, "it needs 'query' (an object) and 'results' (a list)")
    if not isinstance(answer.get("gallery"), str):
        raise _unusable(shard, f"'gallery' must be a string, got {_short(answer.get('gallery'))}")
    items = _whole(answer.get("items"))
    if items is None or not 0 <= items < MAX_ID:
        raise _unusable(shard, f"'items' must be a whole number, got {_short(answer.get('items'))}")
    strange = [key for key in IDENTITY if key in answer and not isinstance(answer[key], str)]
    if strange:
        raise _unusable(shard, f"{strange[0]!r} must be a string, got {_short(answer[strange[0]])}")
    return {**answer, "shard": shard, "shards": int(answer["shards"]), "items": items}


def _neighbour(n: Any, shard: int, q: int) -> tuple[float, int, str, str]:
    """One neighbour's distance (in [0, 2]), id, path and label, or ``ShardAnswerError`` naming what is wrong."""
    if not isinstance(n, dict):
        raise _unusable(shard, f"a neighbour in results[{q}] is not an object: {_short(n)}")
    item_id, distance = _whole(n.get("id")), n.get("distance")
    if item_id is None or not 0 <= item_id < MAX_ID:
        raise _unusable(shard, f"a neighbour's id must be a whole number from 0 to 2**53, got {_short(n.get('id'))}")
    # NaN fails every comparison; a bool is an int to Python, not a distance (numpy's floats: in-process callers).
    if isinstance(distance, bool) or not isinstance(distance, numbers.Real) or \
            not 0 <= distance <= MAX_DISTANCE + DISTANCE_SLACK:
        raise _unusable(shard, f"neighbour {item_id}'s distance must be a number from 0 to 2, got {_short(distance)}")
    if not isinstance(n.get("path"), str) or not isinstance(n.get("label"), str):
        raise _unusable(shard, f"neighbour {item_id} needs 'path' and 'label' strings")
    return min(float(distance), MAX_DISTANCE), item_id, n["path"], n["label"]


def _predicted(value: Any, q: int) -> dict | None:
    """The embedder's predicted class as shard 0 passed it on: null, or a label and a probability in [0, 1]."""
    if value is None:
        return None
    label, p = (value.get("label"), value.get("probability")) if isinstance(value, dict) else (None, None)
    if not isinstance(label, str) or isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise _unusable(0, f"results[{q}].predicted must be null or a label and a probability from 0 to 1, got "
                        f"{_short(value)}")
    return {"label": label, "probability": float(p)}


def _whole(value: Any) -> int | None:
    try:
        return inputs.integer(value, "value")  # over gRPC every JSON number arrives as a double
    except BadInput:
        return None


def _unusable(shard: int, what: str) -> ShardAnswerError:
    return ShardAnswerError(f"shard {shard} sent an answer the merger cannot use: {what}")


def _short(value: Any, limit: int = 60) -> str:
    """At most ``limit`` characters of what a shard sent: an error never echoes a whole answer."""
    try:
        text = repr(value[:limit] if isinstance(value, (str, list)) else value)
    except ValueError:  # an int past Python's 4300-digit str() limit
        return "a number too long to show"
    return text if len(text) <= limit else text[:limit] + "..."

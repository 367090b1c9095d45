"""The three nodes of a sharded gallery's Seldon graph, protocol-independent (model_server/ adapts them).

    TRANSFORMER embedder -> COMBINER merger -> MODEL shard-0 ... shard-<N-1>

Seldon's executor sends a query to the embedder's ``transform-input``, the embedder's answer to every shard's
``predict``, and the shards' answers together to the merger's ``aggregate``. The embedder decodes and embeds once
per query; each shard ranks its own items; the merger checks that every shard answered exactly once, from one
gallery, and merges their top-k into the answer a single server gives (same fields, ids, distances, scores).
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from typing import Any

import numpy as np

from imgsim.errors import BadInput, ImgsimError
from imgsim.index import cosine_from_angular
from imgsim.serve import inputs
from imgsim.serve.search import MAX_FILTER_IDS, Searcher
from imgsim.serve.service import SimilarityService, ms_since
from imgsim.serve.settings import ServiceConfig
from imgsim.sharded import EMBEDDER, SHARD, check_part


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

    def handle(self, json_data: Any, bin_data: bytes | None, tags: dict) -> tuple[dict, dict[str, float]]:
        searcher = self.serving()
        timings: dict[str, float] = {}
        started = time.perf_counter()
        k, where, query = self.parse(json_data, bin_data, tags, searcher)
        if isinstance(query, int):
            raise BadInput("a sharded gallery answers image queries only ('id' needs the item's shard): send the "
                           "image, or its 'path'")
        embeddings, probs = self.embed(query, searcher, started, timings)
        # float32 -> Python float -> JSON -> float32 is exact, so each shard ranks the very vector embedded here.
        results = []
        for embedding, p in zip(embeddings, probs):
            best = int(np.argmax(p)) if len(p) and p.any() else None
            results.append({"embedding": embedding.tolist(), "predicted": None if best is None else
                            {"label": searcher.classes[best], "probability": float(p[best])}})
        query_fields = {"k": k, "labels": None if where is None or where.labels is None else sorted(where.labels),
                        "exclude_ids": [] if where is None else sorted(where.exclude_ids)}
        return {"results": results, "query": query_fields, "gallery": searcher.bundle.shard["gallery"],
                **_identity(searcher)}, timings


class ShardService(SimilarityService):
    """One index-shard MODEL: ranks its own items for the embeddings the embedder sent."""

    def __init__(self, cfg: ServiceConfig) -> None:
        _graph_settings(cfg, SHARD)
        super().__init__(cfg)

    def accept(self, searcher: Searcher, where: str) -> None:
        check_part(searcher.bundle, SHARD, self.cfg.shard, self.cfg.shards, where)

    def handle(self, json_data: Any, bin_data: bytes | None, tags: dict) -> tuple[dict, dict[str, float]]:
        searcher = self.serving()
        started = time.perf_counter()
        if not isinstance(json_data, dict) or not isinstance(json_data.get("results"), list) or \
                not isinstance(json_data.get("query"), dict):
            raise BadInput("an index shard answers the embedder's message (jsonData with 'results' and 'query'); "
                           "send queries to the graph, not to a shard")
        gallery = searcher.bundle.shard["gallery"]
        if json_data.get("gallery") != gallery:
            raise ImgsimError(f"the embedder serves gallery {str(json_data.get('gallery'))[:20]!r}, shard "
                              f"{self.cfg.shard} serves {gallery!r}: roll out one sharded gallery to every node")
        query, results = json_data["query"], json_data["results"]
        if not 1 <= len(results) <= self.cfg.max_batch:
            raise BadInput(f"'results' must hold 1 to {self.cfg.max_batch} embeddings, got {len(results)}")
        k = inputs.integer(query.get("k"), "k")
        if not 1 <= k <= self.cfg.max_k:
            raise BadInput(f"k must be between 1 and {self.cfg.max_k}, got {k}")
        where = inputs.filter_of(query.get("labels"), query.get("exclude_ids") or None, MAX_FILTER_IDS)
        items, answers = searcher.index.items, []
        for i, result in enumerate(results):
            vector = _embedding(result, searcher.index.dim, i)
            rows, dists = searcher.nearest(vector, min(k, searcher.size), where)
            answers.append({"neighbours": [{"id": items[r].id, "path": items[r].path, "label": items[r].label,
                                            "distance": float(d)} for r, d in zip(rows, dists)],
                            "predicted": result.get("predicted")})
        answer = {"results": answers, "query": query, "gallery": gallery, "shard": self.cfg.shard,
                  "shards": self.cfg.shards, "items": searcher.size, **_identity(searcher)}
        return answer, {"search_ms": ms_since(started)}


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


def _whole_number(value: Any) -> int | None:
    try:
        return inputs.integer(value, "shard")
    except BadInput:
        return None


def _identity(searcher: Searcher) -> dict[str, str]:
    return {key: value for key, value in searcher.bundle.identity().items() if key != "index_size"}


@dataclasses.dataclass(frozen=True)
class Merger:
    """The graph's COMBINER: one ranked answer from all shards' answers. Holds no bundle: ready at once."""

    shards: int

    @staticmethod
    def _merged(answers: list[dict], k: int) -> list[dict]:
        counts = {len(a["results"]) for a in answers}
        if len(counts) != 1:
            raise ImgsimError(f"the shards answered different numbers of queries ({sorted(counts)})")
        results = []
        for q in range(counts.pop()):
            pooled = [(float(n["distance"]), int(n["id"]), n) for a in answers for n in a["results"][q]["neighbours"]]
            best = heapq.nsmallest(k, pooled, key=lambda entry: entry[:2])
            results.append({"neighbours": [{"rank": rank + 1, "id": item_id, "path": str(n["path"]),
                                            "label": str(n["label"]), "distance": distance,
                                            "score": cosine_from_angular(distance)}
                                           for rank, (distance, item_id, n) in enumerate(best)],
                            "predicted": answers[0]["results"][q].get("predicted")})
        return results

    @classmethod
    def from_config(cls, cfg: ServiceConfig) -> "Merger":
        _graph_settings(cfg, "merger")
        return cls(cfg.shards)

    def merge(self, answers: list[Any]) -> dict:
        """The answer a single server gives over the whole gallery: each query's k nearest over all shards (ties
        broken by id), with rank, distance and score. Raises ``ImgsimError`` if a shard is missing or answered
        twice, or the shards serve different galleries."""
        if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
            raise BadInput("the merger takes the shards' answers (a list of jsonData objects)")
        seen: dict[int, dict] = {}
        for answer in answers:
            shard = _whole_number(answer.get("shard"))  # over gRPC every JSON number arrives as a double
            if shard is None or _whole_number(answer.get("shards")) != self.shards or not 0 <= shard < self.shards:
                raise ImgsimError(f"an answer from shard {str(shard)[:10]} of {str(answer.get('shards'))[:10]} reached "
                                  f"a merger of {self.shards} shards: every node of the graph needs the same 'shards'")
            if shard in seen:
                raise ImgsimError(f"shard {shard} answered twice: the graph lists it twice; each of the {self.shards} "
                                  "shards must appear once")
            seen[shard] = answer
        missing = sorted(set(range(self.shards)) - seen.keys())
        if missing:
            raise ImgsimError(f"shard(s) {missing} of {self.shards} did not answer: the graph must list every shard")
        galleries = sorted({str(a.get("gallery")) for a in answers})
        if len(galleries) > 1:
            raise ImgsimError(f"the shards serve different galleries ({', '.join(g[:20] for g in galleries)}): "
                              "roll out one sharded gallery to every node")
        first = seen[0]
        try:
            results = self._merged(answers, inputs.integer(first["query"]["k"], "k"))
            size = sum(int(a.get("items", 0)) for a in answers)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadInput(f"a shard's answer is malformed ({exc!r}): the merger takes index shards' answers") from None
        identity = {key: first[key] for key in ("model_name", "model_version", "model_sha256", "bundle_version")
                    if key in first}
        return {"results": results, **identity, "index_sha256": first["gallery"],
                "index_size": str(size), "shards": str(self.shards)}

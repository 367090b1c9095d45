"""One index shard of a sharded gallery (a MODEL node, see imgsim.serve.graph): rank its items for the embedder's
embeddings. Parameters ``shard`` and ``shards`` name the part it must serve; any other part is never ready."""

from __future__ import annotations

from typing import Any

from ModelServer import ModelServer

from imgsim.serve.graph import ShardService
from imgsim.serve.query import Answer


class IndexShard(ModelServer):
    """Reads the embedder's message (its jsonData), not a client's query; same limits and errors as ModelServer."""

    service_class = ShardService
    compact_answers = False  # the merger reads jsonData

    def answer(self, json_data: Any, bin_data: bytes | None, tags: dict) -> Answer:
        return self.service.rank(json_data)

"""One index shard of a sharded gallery (a MODEL node, see imgsim.serve.graph): rank its items for the embedder's
embeddings. Parameters ``shard`` and ``shards`` name the part it must serve; any other part is never ready."""

from __future__ import annotations

from ModelServer import ModelServer

from imgsim.serve.graph import ShardService


class IndexShard(ModelServer):
    service_class = ShardService
    compact_answers = False  # the merger reads jsonData

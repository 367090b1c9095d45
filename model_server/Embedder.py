"""A sharded gallery's TRANSFORMER node (see imgsim.serve.graph): decode and embed each query once."""

from __future__ import annotations

from typing import Any

from ModelServer import ModelServer

from imgsim.serve.graph import EmbedService


class Embedder(ModelServer):
    """Seldon's executor calls ``transform_input`` and passes the answer (the query's embeddings, k and filter)
    to the merger's children, the index shards. Same input, limits and errors as ModelServer."""

    service_class = EmbedService
    compact_answers = False  # the shards read jsonData

    def transform_input_raw(self, request: Any) -> Any:
        return self.predict_raw(request)

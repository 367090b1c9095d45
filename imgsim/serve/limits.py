"""The request-body limits every imgsim server and the page apply (413 past them), and the words a client gets for
them. Imported by the page too, so nothing here loads the search stack."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (settings loads the bundle's module; the page imports this one without it)
    from imgsim.serve.settings import ServiceConfig

SMALL_BODY = 64 * 1024  # a body with no image in it: a query by id or path, a form's fields


def body_limit(cfg: ServiceConfig, messages: int = 1) -> int:
    """The largest request body a model server reads, v1, v2 and a graph's nodes alike: ``max_request_bytes`` for
    each message the body carries (a graph's merger reads one answer per shard). The page's upload route takes
    ``upload_limit``, its other routes SMALL_BODY."""
    return cfg.max_request_bytes * messages


def upload_limit(max_image_bytes: int) -> int:
    """The largest body the page's upload route reads: one image and the form's fields beside it."""
    return max_image_bytes + SMALL_BODY


def too_large(limit: int) -> str:
    """What a client is told when its body passes ``limit`` bytes."""
    return f"the request body is larger than {limit} bytes"

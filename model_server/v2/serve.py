"""`mlserver`, with a guard in front of its REST API: what the Seldon v1 server refuses before parsing, MLServer
1.7.1 would read whole and parse (it has no body limit), or fail on with a 500 (a body that is not UTF-8).

    python serve.py start .          (in model_server/v2; the serve-v2 image's command)

The guard answers 413 to a body over ``IMGSIM_MAX_REQUEST_BYTES`` (the server setting ``max_request_bytes``),
from its Content-Length or while it streams in, and 400 to one that is not UTF-8, each as MLServer's own errors
look (``{"error": ...}``); everything else reaches MLServer as it came. It is added where MLServer builds its
REST app, so the command line, settings and the gRPC server are MLServer's own.

MLServer logs every error a model raises with its trace (its gRPC handler calls ``logger.exception``), a client's
bad input included, at level ERROR: a trace per bad request under hostile traffic. ``OneLineClientErrors`` logs a
client error (an ``MLServerError`` with a 4xx status) as a one-line WARNING with its message; anything else keeps
its level and trace.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Awaitable, Callable

import mlserver.rest.server as rest_server
from mlserver.cli import main
from mlserver.errors import MLServerError

from imgsim.serve.settings import ServiceConfig

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyGuard:
    """ASGI middleware: reads a request's body up to ``max_bytes`` and passes it on, or answers 413 / 400."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_big = f"the request body is larger than {self.max_bytes} bytes (IMGSIM_MAX_REQUEST_BYTES)"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _refuse(send, 413, too_big)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _refuse(send, 413, too_big)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            await _refuse(send, 400, "the request body must be UTF-8 JSON (an Open Inference Protocol request)")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: a disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class OneLineClientErrors(logging.Filter):
    """On MLServer's loggers: a client error's record as a WARNING without its trace (the message stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, MLServerError) and 400 <= error.status_code < 500:
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            return logging.getLogger(record.name).isEnabledFor(logging.WARNING)  # (ERROR passed the level check)
        return True


def _guarded(create_app):
    def create(*args, **kwargs):
        app = create_app(*args, **kwargs)
        app.add_middleware(BodyGuard, max_bytes=ServiceConfig.from_sources().max_request_bytes)
        return app
    return create


if __name__ == "__main__":
    rest_server.create_app = _guarded(rest_server.create_app)  # where MLServer's RESTServer builds its app
    for name in ("mlserver", "mlserver.grpc"):  # the loggers of MLServer's error handlers (a logger's filter does
        logging.getLogger(name).addFilter(OneLineClientErrors())  # not see its children's records)
    sys.exit(main())

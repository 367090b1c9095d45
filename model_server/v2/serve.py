"""`mlserver`, with a guard in front of its APIs: what a client may reach, how much it may hold, and in which form.

    python serve.py start .          (in model_server/v2; the serve-v2 image's command)

The REST guard (``Guard``):

- answers 404 to MLServer's model-repository API (``/v2/repository/...``: index, load, unload) and the stream
  routes, so no client can unload or reload the model or break a connection half-answered;
- holds at most ``max_inflight_requests`` requests with a body, and ``max_inflight_bytes`` of large bodies (each
  counted ``INFLIGHT_COPIES`` times), answering 503 with ``Retry-After`` beyond, before reading the body;
- reads a body within ``body_timeout_s`` (408 after), up to ``max_request_bytes`` (413, from its Content-Length
  or as it streams in), holds it once, and answers 400 to one that is not UTF-8 JSON;
- translates the binary tensor extension (``imgsim.serve.binary_tensors``) both ways;
- shortens any 4xx message to ``MAX_MESSAGE`` characters: MLServer's own validation errors quote the input.

Errors look as MLServer's own (``{"error": ...}``). It is added where MLServer builds its REST app, so the command
line and settings are MLServer's own. The gRPC server gets no repository RPCs (``UNIMPLEMENTED``, as any unknown
method), no streaming, MLServer's message limit set to ``max_request_bytes`` and at most
``max_inflight_requests`` RPCs at once (``RESOURCE_EXHAUSTED`` beyond).

MLServer logs every error a model raises with its trace (its gRPC handler calls ``logger.exception``), a client's
bad input included, at level ERROR: a trace per bad request under hostile traffic. ``OneLineClientErrors`` logs a
client error (an ``MLServerError`` with a 4xx status) as a one-line WARNING with its message; anything else keeps
its level and trace.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from typing import Any, Awaitable, Callable

import grpc
import mlserver.grpc.server as grpc_server
import mlserver.rest.server as rest_server
from mlserver.cli import main
from mlserver.errors import MLServerError
from mlserver.grpc.servicers import InferenceServicer

from imgsim.errors import BadInput
from imgsim.serve import binary_tensors
from imgsim.serve.process import memory_limit
from imgsim.serve.limits import SMALL_BODY, body_limit, too_large
from imgsim.serve.settings import INFLIGHT_COPIES, ServiceConfig

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CLOSED = re.compile(r"/v2/repository(/.*)?|/v2/models/[^/]+(/versions/[^/]+)?/(infer|generate)_stream/?")
INFER = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/(infer|generate)/?")  # (generate: MLServer's alias)
LENGTH = re.compile(rb"[0-9]{1,12}")
MAX_MESSAGE = 300  # characters of an error message: enough to say what is wrong, too few to echo a body
MAX_ECHO = 100  # characters of MLServer's own messages (not found, validation), which quote what the client sent
RETRY_AFTER_S = 1


def inflight_bytes(cfg: ServiceConfig) -> int:
    """``max_inflight_bytes``, or a quarter of the pod's memory limit (256 MiB without one)."""
    if cfg.max_inflight_bytes:
        return cfg.max_inflight_bytes
    limit = memory_limit()
    return limit // 4 if limit else 256 * 2**20


class Guard:
    """ASGI middleware in front of MLServer's REST app (see the module's doc)."""

    def __init__(self, app, cfg: ServiceConfig) -> None:
        self.app, self.cfg, self.limit = app, cfg, body_limit(cfg)
        self.requests, self.bytes_left = 0, inflight_bytes(cfg)  # one event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if CLOSED.fullmatch(_route(scope)):
            await _refuse(send, 404, "Not Found")
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, _Reply(send, None))
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and not LENGTH.fullmatch(declared):
            await _refuse(send, 400, "Content-Length must be a number of bytes")
            return
        if declared is not None and int(declared) > self.limit:
            await _refuse(send, 413, self._too_big())
            return
        # A large body holds its share of the byte budget from its headers on (bounded memory whatever it sends);
        # a small one nothing until it is in, so clients that open requests and send nothing lock out no query.
        charge = _charge(int(declared) if declared is not None else 0)
        if charge > self.bytes_left:
            await _refuse(send, *_BUSY)
            return
        self.bytes_left -= charge
        held = [charge]  # what this request holds of the budget; a chunked body's share grows as it arrives
        try:
            await self._guarded(scope, receive, send, headers, held)
        finally:
            self.bytes_left += held[0]

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, headers: dict, held: list[int]) -> None:
        try:
            async with asyncio.timeout(self.cfg.body_timeout_s):
                body = await self._read(receive, held)
        except TimeoutError:
            await _refuse(send, 408, f"the request body did not arrive within {self.cfg.body_timeout_s:g} s")
            return
        except _Refused as refused:
            await _refuse(send, *refused.args)
            return
        if body is None:
            return  # the client went away
        if self.requests >= self.cfg.max_inflight_requests:
            await _refuse(send, *_BUSY)
            return
        self.requests += 1
        try:
            await self._answer(scope, receive, send, headers, body)
        finally:
            self.requests -= 1

    async def _answer(self, scope: Scope, receive: Receive, send: Send, headers: dict, body: bytes) -> None:
        wants = None
        try:
            if INFER.fullmatch(_route(scope)):
                # Off the event loop when large: decoding a binary body and base64-encoding it take a while.
                translate = _translated(body, headers) if len(body) <= SMALL_BODY else \
                    await asyncio.to_thread(_translated, body, headers)
                body, wants = translate
            else:
                body.decode("utf-8")
        except UnicodeDecodeError:
            await _refuse(send, 400, "the request body must be UTF-8 JSON (an Open Inference Protocol request)")
            return
        except BadInput as exc:
            await _refuse(send, 400, _short(str(exc)))
            return
        if binary_tensors.HEADER.encode() in headers:  # now JSON: said so to MLServer, which parses by content type
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k not in _REWRITTEN] + [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        message: Message | None = {"type": "http.request", "body": body, "more_body": False}
        del body  # held once from here: by the message MLServer reads

        async def replay() -> Message:
            nonlocal message
            if message is None:
                return await receive()  # after the body: a disconnect, when it comes
            handed, message = message, None
            return handed

        await self.app(scope, replay, _Reply(send, wants))

    async def _read(self, receive: Receive, held: list[int]) -> bytes | None:
        """The whole body, or None if the client went away."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise _Refused(413, self._too_big())
            extra = _charge(size) - held[0]  # more than it declared: a chunked body
            if extra > 0:
                if extra > self.bytes_left:
                    raise _Refused(*_BUSY)
                self.bytes_left -= extra
                held[0] += extra
            chunks.append(chunk)
            if not message.get("more_body", False):
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                return body

    def _too_big(self) -> str:
        return f"{too_large(self.limit)} (IMGSIM_MAX_REQUEST_BYTES)"


_REWRITTEN = (b"content-type", b"content-length", binary_tensors.HEADER.encode())
_BUSY = (503, "the server holds as many requests as it may; retry shortly",
         [(b"retry-after", str(RETRY_AFTER_S).encode())])


class _Refused(Exception):
    """(status, message[, headers]) for ``_refuse``."""


def _charge(size: int) -> int:
    """What a body of ``size`` bytes holds of ``max_inflight_bytes``: nothing while small (counted by requests only)."""
    return 0 if size <= SMALL_BODY else size * INFLIGHT_COPIES


async def _refuse(send: Send, status: int, message: str, headers: list | None = None) -> None:
    """An error as MLServer words its own; the connection is closed after it, so an unread body is not read on."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _route(scope: Scope) -> str:
    """The path MLServer routes on: without the root path (MLSERVER_ROOT_PATH), which Starlette strips first."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _translated(body: bytes, headers: dict) -> tuple[bytes, tuple[bool, dict[str, bool]] | None]:
    """An infer request as MLServer reads it (JSON), and which outputs it wants in binary (None: none)."""
    header_length = headers.get(binary_tensors.HEADER.encode())
    if header_length is None:
        body.decode("utf-8")
        if b'"binary_data' not in body:  # the common case: no extension, nothing parsed twice
            return body, None
        request = binary_tensors.parse_json(body, "the request body")
    elif not LENGTH.fullmatch(header_length):
        raise BadInput(f"{binary_tensors.HEADER} must be the length of the request's JSON part")
    else:
        request = binary_tensors.decode_request(body, int(header_length))
    if not isinstance(request, dict):
        return body, None  # MLServer says what is wrong with it
    default, per_output = binary_tensors.wants_binary(request)
    wants = (default, per_output) if default or any(per_output.values()) else None
    return (body if header_length is None else json.dumps(request).encode()), wants


class _Reply:
    """``send`` for MLServer's answer: a 4xx message shortened, outputs made binary where the request asked."""

    def __init__(self, send: Send, wants: tuple[bool, dict[str, bool]] | None) -> None:
        self.send, self.wants = send, wants
        self.start: Message | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            encoded = any(k.lower() == b"content-encoding" for k, _ in message.get("headers", []))
            if not encoded and (message["status"] >= 400 or (self.wants and message["status"] == 200)):
                self.start = message  # held until the body is complete
                return
        elif message["type"] == "http.response.body" and self.start is not None:
            self.chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await self._rewritten(b"".join(self.chunks))
            return
        await self.send(message)

    async def _rewritten(self, body: bytes) -> None:
        status = self.start["status"]
        headers = [h for h in self.start.get("headers", []) if h[0].lower() not in (b"content-length", b"content-type")]
        content_type = b"application/json"
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):
            answer = None
        if status >= 400:
            message = answer.get("error") if isinstance(answer, dict) else None
            text = message if isinstance(message, str) else body.decode("utf-8", "replace")
            if status in (404, 422):  # MLServer's own: the model name or the input, quoted whole
                body = json.dumps({"error": _short(text, MAX_ECHO)}).encode()
            elif len(body) > MAX_MESSAGE or not isinstance(message, str):
                body = json.dumps({"error": _short(text)}).encode()
        elif isinstance(answer, dict):
            binary = binary_tensors.encode_response(answer, *self.wants)
            if binary is not None:
                body, content_type = binary[0], b"application/octet-stream"
                headers.append((binary_tensors.HEADER.encode(), str(binary[1]).encode()))
        headers += [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})


def _short(message: str, limit: int = MAX_MESSAGE) -> str:
    return message if len(message) <= limit else message[:limit] + " ..."


class OneLineClientErrors(logging.Filter):
    """On MLServer's loggers: a client error's record as a WARNING without its trace (the message stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, MLServerError) and 400 <= error.status_code < 500:
            record.exc_info = record.exc_text = None
            record.msg, record.args = _short(record.getMessage()), ()  # MLServer's validation errors quote the input
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            return logging.getLogger(record.name).isEnabledFor(logging.WARNING)  # (ERROR passed the level check)
        return True


def _guarded(create_app):
    def create(*args, **kwargs):
        app = create_app(*args, **kwargs)
        app.add_middleware(Guard, cfg=ServiceConfig.from_sources())
        return app
    return create


async def _closed_rpc(self, request, context) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")  # gRPC's own words for it


async def _closed_stream(self, requests, context):
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
    yield  # (an async generator, as gRPC calls a streaming method)


class _ShortDetails:
    """A servicer's context whose abort quotes at most MAX_ECHO characters: MLServer's messages name the model
    (or quote the input) whole."""

    def __init__(self, context) -> None:
        self._context = context

    def __getattr__(self, name: str):
        return getattr(self._context, name)

    async def abort(self, code, details: str = "", trailing_metadata=()):
        return await self._context.abort(code, _short(details, MAX_MESSAGE if code == grpc.StatusCode.INVALID_ARGUMENT
                                                      else MAX_ECHO), trailing_metadata)


class ShortDetails(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behaviour = handler.unary_unary

        async def call(request, context):
            return await behaviour(request, _ShortDetails(context))

        return handler._replace(unary_unary=call)


class _LimitedServers:
    """``grpc.aio`` for MLServer's gRPC server, with ``maximum_concurrent_rpcs`` set and details kept short."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def server(self, *args, interceptors=(), **kwargs):
        return grpc.aio.server(*args, maximum_concurrent_rpcs=self.limit,
                               interceptors=[ShortDetails(), *interceptors], **kwargs)


def close_management(cfg: ServiceConfig) -> None:
    """What no client may reach over gRPC: the repository service and RPCs, streaming; and the limits."""
    grpc_server.add_ModelRepositoryServiceServicer_to_server = lambda servicer, server: None
    for rpc in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"):
        setattr(InferenceServicer, rpc, _closed_rpc)
    InferenceServicer.ModelStreamInfer = _closed_stream
    grpc_server.aio = _LimitedServers(cfg.max_inflight_requests)
    os.environ.setdefault("MLSERVER_GRPC_MAX_MESSAGE_LENGTH", str(body_limit(cfg)))


if __name__ == "__main__":
    close_management(ServiceConfig.from_sources())
    rest_server.create_app = _guarded(rest_server.create_app)  # where MLServer's RESTServer builds its app
    for name in ("mlserver", "mlserver.grpc"):  # the loggers of MLServer's error handlers (a logger's filter does
        logging.getLogger(name).addFilter(OneLineClientErrors())  # not see its children's records)
    sys.exit(main())

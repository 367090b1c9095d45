"""Request bodies read with a cap (chunked ones too) and kept in memory: what stands between a client and the
page's memory and /tmp."""

from __future__ import annotations

import io
import json
import socket

from flask import Request, Response
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wsgi import ClosingIterator


class BoundedBody:
    """WSGI middleware: a request body is never read past its route's limit, whatever its transfer encoding.
    Werkzeug 2.2 checks MAX_CONTENT_LENGTH against Content-Length only, so a chunked body was read to its end.
    A declared length over the limit is answered 413 at once; a chunked one when the limit is passed."""

    def __init__(self, app, limits: dict[str, int], default: int, headers: dict[str, str] | None = None):
        self.app, self.limits, self.default, self.headers = app, limits, default, headers or {}

    def __call__(self, environ, start_response):
        limit = self.limits.get(environ.get("PATH_INFO", ""), self.default)
        declared = environ.get("CONTENT_LENGTH") or ""
        if declared.isdigit() and int(declared) > limit:
            return ClosingIterator(_too_large(limit, self.headers)(environ, start_response), lambda: _stop_reading(environ))
        capped = environ["wsgi.input"] = _CappedStream(environ["wsgi.input"], limit)
        return ClosingIterator(self.app(environ, start_response), lambda: capped.exceeded and _stop_reading(environ))


def _stop_reading(environ) -> None:
    """After a 413, read no more of this connection: gunicorn would otherwise read the rest of the body to
    its end (to find the next request), a thread held for as long as the client keeps sending. With the read
    side shut, gunicorn sees the end of the stream and closes the connection."""
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # already gone


class _CappedStream:
    """Reads at most ``limit`` + 1 bytes, then raises 413 (Flask answers it through its error handler)."""

    def __init__(self, stream, limit: int):
        self.stream, self.limit, self.seen = stream, limit, 0

    @property
    def exceeded(self) -> bool:
        return self.seen > self.limit

    def read(self, size: int = -1) -> bytes:
        return self._take(self.stream.read, size)

    def readline(self, size: int = -1) -> bytes:
        return self._take(self.stream.readline, size)

    def _take(self, read, size) -> bytes:
        room = self.limit + 1 - self.seen
        data = read(room if size is None or size < 0 else min(size, room)) if room > 0 else b""
        self.seen += len(data)
        if self.seen > self.limit:
            raise RequestEntityTooLarge()
        return data

    def __iter__(self):
        return iter(self.readline, b"")


def _too_large(limit: int, headers: dict[str, str]):
    body = json.dumps({"error": f"the request body is larger than {limit} bytes"}).encode()
    return Response(body, status=413, mimetype="application/json", headers=headers)


class InMemoryRequest(Request):
    """Uploaded file parts stay in memory (bounded by the body limit) instead of spilling into the pod's small
    /tmp, which Werkzeug does past 500 kB."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()

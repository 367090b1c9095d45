"""Request bodies read with a cap (chunked ones too), a deadline and a bound on how many are held at once, kept
in memory; and the relayed query's body, built without copying the image: what stands between a client and
the page's memory and /tmp."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time

from flask import Request, Response
from werkzeug.exceptions import RequestEntityTooLarge, RequestTimeout
from werkzeug.wsgi import ClosingIterator

from imgsim.serve.limits import too_large

RETRY_AFTER_S = 5  # what a refused client is told to wait: a normal upload is relayed well within it
SMALL_SLOTS = 256  # bodies within the small routes' limit held at once, so large uploads cannot lock them out


class BoundedBody:
    """WSGI middleware: a request body is never read past its route's limit, whatever its transfer encoding.
    Werkzeug 2.2 checks MAX_CONTENT_LENGTH against Content-Length only, so a chunked body was read to its end.
    A declared length over the limit is answered 413 at once; a chunked one when the limit is passed.
    At most ``slots`` requests with a large body are held at once, and SMALL_SLOTS with a small one (more are
    answered 503, their body unread), and
    each body must arrive within ``deadline_s`` (else 408), so stalled uploads cannot pin the page's memory."""

    def __init__(self, app, limits: dict[str, int], default: int, headers: dict[str, str] | None = None, *,
                 slots: int = 1000, deadline_s: float = 30.0):
        self.app, self.limits, self.default, self.headers = app, limits, default, headers or {}
        self.slots, self.deadline_s = slots, deadline_s
        self._free = threading.BoundedSemaphore(slots)  # never waited on: a greenlet or a thread alike
        self._free_small = threading.BoundedSemaphore(SMALL_SLOTS)

    def __call__(self, environ, start_response):
        limit = self.limits.get(environ.get("PATH_INFO", ""), self.default)
        declared = environ.get("CONTENT_LENGTH") or ""
        if declared.isdigit() and int(declared) > limit:
            return self._refuse(environ, start_response, 413, too_large(limit))
        has_body = (declared.isdigit() and int(declared) > 0) or "HTTP_TRANSFER_ENCODING" in environ
        # A body no larger than every other route's limit (a "more like this" query, form fields) has slots of its own.
        slots = self._free_small if declared.isdigit() and int(declared) <= self.default else self._free
        if has_body and not slots.acquire(blocking=False):
            return self._refuse(environ, start_response, 503, f"the page is holding all the queries it can "
                                f"({self.slots}); try again in {RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)})
        deadline = _Deadline(self.deadline_s, environ.get("gunicorn.socket")) if has_body else None
        capped = environ["wsgi.input"] = _CappedStream(environ["wsgi.input"], limit, deadline,
                                                       int(declared) if declared.isdigit() else None)

        def done():
            if deadline is not None:
                deadline.finish()
                slots.release()
            if capped.exceeded or (deadline is not None and deadline.expired):
                _stop_reading(environ)
        try:
            return ClosingIterator(self.app(environ, start_response), done)
        except BaseException:
            done()
            raise

    def _refuse(self, environ, start_response, code: int, message: str, headers: dict[str, str] | None = None):
        answer = Response(json.dumps({"error": message}), status=code, mimetype="application/json",
                          headers={**self.headers, **(headers or {})})
        return ClosingIterator(answer(environ, start_response), lambda: _stop_reading(environ))


def _stop_reading(environ) -> None:
    """After a 413, 408 or 503, read no more of this connection: gunicorn would otherwise read the rest of the
    body to its end (to find the next request), a greenlet held for as long as the client keeps sending. With
    the read side shut, gunicorn sees the end of the stream and closes the connection."""
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # already gone


class _Deadline:
    """When a body must have arrived. Past it the connection's read side is shut, which wakes a read blocked on
    a stalled client whether it waits in a thread or a greenlet, and the body's stream answers 408."""

    def __init__(self, seconds: float, sock):
        self.seconds, self.end, self.expired, self._done = seconds, time.monotonic() + seconds, False, False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire, (sock,)) if sock is not None else None
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()

    def _expire(self, sock) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
        _stop_reading({"gunicorn.socket": sock})

    def finish(self) -> None:
        """The body has been read (or the answer sent): the deadline no longer applies."""
        with self._lock:
            self._done = True
        if self._timer is not None:
            self._timer.cancel()

    def check(self) -> None:
        if self.expired or (not self._done and time.monotonic() > self.end):
            self.expired = True
            raise RequestTimeout(f"the request body did not arrive within {self.seconds:g} s")


class _CappedStream:
    """Reads at most ``limit`` + 1 bytes, then raises 413 (Flask answers it through its error handler); past
    the ``deadline``, 408."""

    def __init__(self, stream, limit: int, deadline: _Deadline | None = None, length: int | None = None):
        self.stream, self.limit, self.seen, self.deadline, self.length = stream, limit, 0, deadline, length

    @property
    def exceeded(self) -> bool:
        return self.seen > self.limit

    def read(self, size: int = -1) -> bytes:
        return self._take(self.stream.read, size)

    def readline(self, size: int = -1) -> bytes:
        return self._take(self.stream.readline, size)

    def _take(self, read, size) -> bytes:
        room = self.limit + 1 - self.seen
        try:
            data = read(room if size is None or size < 0 else min(size, room)) if room > 0 else b""
        except OSError:
            if self.deadline is not None:
                self.deadline.check()  # the read side was shut at the deadline: that, not a broken stream
            raise
        self.seen += len(data)
        if self.seen > self.limit:
            raise RequestEntityTooLarge()
        if self.deadline is not None:
            self.deadline.check()
            if (not data and size != 0) or (self.length is not None and self.seen >= self.length):
                self.deadline.finish()  # the whole body is in
        return data

    def __iter__(self):
        return iter(self.readline, b"")


class InMemoryRequest(Request):
    """Uploaded file parts stay in memory (bounded by the body limit) instead of spilling into the pod's small
    /tmp, which Werkzeug does past 500 kB."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def upload_bytes(stream) -> bytes:
    """An uploaded part's bytes. From InMemoryRequest's buffer without a copy: BytesIO.getvalue() hands over
    its buffer once it is trimmed to size (CPython), where read() would copy it."""
    return stream.getvalue() if isinstance(stream, io.BytesIO) else stream.read()


class ImageJson:
    """A JSON query body with an image inside it as base64, encoded piece by piece as ``requests`` sends it:
    the image is held once, not again as base64, as JSON text and as its bytes. ``make_body(image)`` is the
    protocol's body (a dict); it is built once around a random marker, whose base64 marks the image's place."""

    CHUNK = 3 * 64 * 1024  # a multiple of 3: the pieces' base64 joins into the whole's

    def __init__(self, image: bytes, make_body):
        marker = os.urandom(24)  # 192 random bits: the client's labels will not hold its base64 by chance
        self.head, found, self.tail = json.dumps(make_body(marker)).encode().partition(base64.b64encode(marker))
        if not found:
            raise ValueError("the protocol's body does not hold the image as base64")
        self.image = image

    def __len__(self) -> int:  # requests sends Content-Length, not chunks, for an iterable with a length
        return len(self.head) + 4 * ((len(self.image) + 2) // 3) + len(self.tail)

    def __iter__(self):
        yield self.head
        view = memoryview(self.image)
        for start in range(0, len(view), self.CHUNK):
            yield base64.b64encode(view[start:start + self.CHUNK])
        yield self.tail

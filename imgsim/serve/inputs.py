"""What a client may send, checked: base64 fields, integers, gallery paths inside the root, a pixel budget."""

from __future__ import annotations

import base64
import binascii
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgsim.errors import BadInput

if TYPE_CHECKING:  # the page imports this module without the search stack
    from imgsim.serve.search import Filter


def read_gallery_file(gallery_root: str | Path, path: Any, max_bytes: int,
                      missing: type[BadInput] = BadInput) -> bytes:
    """Read a file named by a client only if it really lies inside ``gallery_root``; ``BadInput`` otherwise, and
    ``missing`` for a file inside it that does not exist (the page's thumbnails: its 404)."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise BadInput("'path' must be a non-empty string")
    root = Path(gallery_root).resolve()
    # Whether a path escapes is decided before the filesystem is asked anything about it, so a client gets
    # the same answer for an outside file that exists and one that does not.
    outside = BadInput(f"path {short(path)} is outside the gallery root")
    lexical = Path(os.path.normpath(root / path))
    if root not in lexical.parents:
        raise outside
    try:
        real = lexical.resolve()  # follows symlinks inside the root, wherever they point
    except (OSError, RuntimeError):
        raise BadInput(f"path {short(path)} cannot be resolved in the gallery (a symlink loop?)") from None
    if root not in real.parents:
        raise outside
    try:
        if not real.exists():  # inside the root, saying which is fine
            raise missing(f"path {short(path)} does not exist in the gallery")
        if not real.is_file():
            raise BadInput(f"path {short(path)} is not a regular file")
        if real.stat().st_size > max_bytes:
            raise BadInput(f"path {short(path)} is larger than {max_bytes} bytes")
        return real.read_bytes()
    except OSError as exc:  # a name too long, a file this server may not read
        raise BadInput(f"path {short(path)} cannot be read from the gallery ({exc.strerror})") from None


class PixelBudget:
    """Decoded pixels left to one request."""

    def __init__(self, total: int) -> None:
        self.total, self.left = total, total

    def take(self, pixels: int) -> None:
        if pixels > self.left:
            raise BadInput(f"the request's images add up to more than {self.total} pixels; send fewer or smaller "
                           "images per request")
        self.left -= pixels


def integer(value: Any, name: str) -> int:
    # JSON over gRPC arrives as a protobuf Value, where every number is a double: accept 5.0, not 5.5 or "5".
    # A huge JSON integer stays an int (math.isfinite would raise OverflowError on it): range checks refuse it.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, float) or not math.isfinite(value) or not value.is_integer():
        raise BadInput(f"{name} must be an integer, got {short(value)}")
    return int(value)


def filter_of(labels: Any, exclude_ids: Any, max_ids: int) -> Filter | None:
    """A query's filter from its ``labels`` (a list of label strings) and ``exclude_ids`` (a list of gallery
    ids), either absent; None when both are."""
    from imgsim.serve.search import Filter

    if labels is None and exclude_ids is None:
        return None
    if labels is not None and (not isinstance(labels, list) or not labels or
                               not all(isinstance(label, str) for label in labels)):
        raise BadInput(f"'labels' must be a non-empty list of label strings, got {short(labels)}")
    if exclude_ids is not None and not isinstance(exclude_ids, list):
        raise BadInput(f"'exclude_ids' must be a list of gallery ids, got {short(exclude_ids)}")
    if exclude_ids is not None and len(exclude_ids) > max_ids:
        raise BadInput(f"'exclude_ids' has {len(exclude_ids)} ids; at most {max_ids} per query")
    return Filter(None if labels is None else frozenset(labels),
                  frozenset(integer(i, "exclude_ids[]") for i in exclude_ids or []))


def short(value: Any, limit: int = 40) -> str:
    text = repr(value) if not isinstance(value, (str, bytes)) or len(value) < limit else repr(value[:limit]) + "..."
    return text if len(text) <= limit + 5 else text[:limit] + "..."


def decode_base64(value: Any, name: str) -> bytes:
    """Strictly decode a base64 string (or bytes), naming the field in the error."""
    if not isinstance(value, (str, bytes)):
        raise BadInput(f"{name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{name} is not valid base64") from None

"""The serving core's words, free of any protocol: a query, its answer, what an error means to a client (status and
message) and the metrics every server reports (the request-body limit is in ``limits``).

Each protocol's adapter decodes its wire into a :class:`Query`, asks ``SimilarityService.answer(query)`` and
encodes the :class:`Answer` in its own shapes; a failure becomes its status through :func:`status_for`. The page
imports this module for ``status_for``, so the search stack is imported only where a query is built.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from imgsim.errors import BadInput, ImgsimError
from imgsim.serve import inputs

if TYPE_CHECKING:  # (imported where used: the page loads this module without the search stack)
    from imgsim.serve.search import Filter

log = logging.getLogger(__name__)

# ---- the query and its answer --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Query:
    """What a client asks, whatever the protocol: the ``k`` nearest (None: the server's default) that ``filters``
    admits, of exactly one of ``images`` (encoded image files, read one at a time), a gallery ``id`` or a gallery
    ``path``. The server's limits (k at most max_k, batch size, known labels) are checked when it is answered."""

    k: int | None = None
    filters: Filter | None = None
    images: Sequence[bytes] | None = None
    id: int | None = None
    path: Any = None  # as the client sent it: read_gallery_file checks it, where a server reads any

    def __post_init__(self) -> None:
        from imgsim.serve.search import Filter  # (here, not at the top: see the module's doc)

        given = [name for name in ("images", "id", "path") if getattr(self, name) is not None]
        if len(given) != 1:
            raise BadInput(f"a query needs exactly one of images, id or path, got {' and '.join(given) or 'none'}")
        for name in ("k", "id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise BadInput(f"{name} must be an integer, got {inputs.short(value)}")  # adapters convert first
        if self.filters is not None and not isinstance(self.filters, Filter):
            raise BadInput(f"filters must be a Filter, got {inputs.short(self.filters)}")
        if self.images is not None and (isinstance(self.images, (bytes, str)) or not hasattr(self.images, "__len__")
                                        or not len(self.images)):
            raise BadInput("images must be a non-empty sequence of encoded images")


class Encoded(Sequence[bytes]):
    """A wire's image elements (base64 text, or bytes), each decoded only when read: a request holds its images
    once, as the wire carried them, plus one decoded image at a time."""

    def __init__(self, elements: Sequence[Any], decode: Callable[[Any, int], bytes]) -> None:
        self.elements, self.decode = elements, decode

    def __len__(self) -> int:
        return len(self.elements)

    def __getitem__(self, i):  # (a slice is not needed: the service reads them in order)
        return self.decode(self.elements[i], i)

    def __iter__(self) -> Iterator[bytes]:
        return (self.decode(e, i) for i, e in enumerate(self.elements))


def filters_of(labels: Any, exclude_ids: Any) -> Filter | None:
    """A query's filter from what a client sent as ``labels`` and ``exclude_ids`` (either absent: None)."""
    from imgsim.serve.search import MAX_FILTER_IDS

    return inputs.filter_of(labels, exclude_ids, MAX_FILTER_IDS)


@dataclasses.dataclass(frozen=True)
class Answer:
    """A query's answer: ``body`` (``results`` with their neighbours, and the identity of the version that
    answered), the JSON every protocol sends in its own envelope; ``timings``, milliseconds per stage
    (``decode``, ``embed``, ``search``)."""

    body: dict
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def identity(self) -> dict[str, str]:
        return identity_of(self.body)

    @property
    def queries(self) -> int:
        """Queries answered (one per image or id): what the queries metric counts."""
        return len(self.body["results"])


def identity_of(body: dict) -> dict[str, str]:
    """The string fields of an answer: the model and gallery version that answered it (not the newest), and a
    graph node's own fields; every protocol sends them beside the answer, in its own envelope."""
    return {key: value for key, value in body.items() if isinstance(value, str)}


# ---- metrics: the same names on every server -------------------------------------------------------------------

STAGES = ("decode", "embed", "search")
QUERIES, REJECTED, INDEX_SIZE = "imgsim_queries", "imgsim_rejected_requests", "imgsim_index_size"
TIMER, COUNTER = "timer", "counter"


def stage_metric(stage: str) -> str:
    """The name of a stage's timing metric (exported in seconds)."""
    return f"imgsim_{stage}_seconds"


@dataclasses.dataclass(frozen=True)
class Metric:
    """One update an answered request makes: a ``TIMER`` (``value`` in milliseconds) or a ``COUNTER`` increment."""

    kind: str
    name: str
    value: float


def metrics_of(answer: Answer) -> list[Metric]:
    """What an answered request adds to the metrics: each stage's time, then the queries it answered."""
    timers = [Metric(TIMER, stage_metric(stage), ms) for stage, ms in answer.timings.items()]
    return [*timers, Metric(COUNTER, QUERIES, answer.queries)]


def is_rejection(code: int) -> bool:
    """Whether a refused request counts in ``REJECTED``: the client's own fault, not this server's or a node's."""
    return 400 <= code < 500


def index_size_of(versions: dict[str, str]) -> float:
    """The index-size gauge from a service's ``versions()``: a shard's own items, an embedder's whole gallery, 0
    while nothing is loaded."""
    return float(versions.get("index_size") or 0)


# ---- errors ----------------------------------------------------------------------------------------------

class UpstreamError(ImgsimError):
    """What another node of the deployment sent is unusable: neither the client's fault nor this server's (502)."""


class NotFound(BadInput):
    """The file a request's URL names is not there (404): the page's thumbnails. A query's path is its input (400)."""


def status_for(error: BaseException, log_name: str = "the server log") -> tuple[int, str]:
    """The HTTP status and message a client gets for ``error``: 404 for a file its URL names that is not there, 400
    for its own bad input, 502 for another node's unusable answer, 503 while the server cannot answer (not ready, a
    deployment at odds with itself), 500 with a generic message for anything else, whose trace goes to ``log_name``
    (logged here)."""
    if isinstance(error, NotFound):
        return 404, str(error)
    if isinstance(error, BadInput):
        return 400, str(error)
    if isinstance(error, UpstreamError):
        return 502, str(error)
    if isinstance(error, ImgsimError):
        return 503, str(error)
    log.error("imgsim: unexpected failure while answering a request", exc_info=error)
    return 500, f"internal error; see {log_name}"

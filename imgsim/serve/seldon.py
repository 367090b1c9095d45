"""Fixes for seldon-core's Python wrapper (1.18 and 1.19 ship the same one), installed by the ModelServer adapter."""

from __future__ import annotations

import bisect

import grpc
from google.protobuf.message import DecodeError
from seldon_core import seldon_methods
from seldon_core import wrapper as seldon_wrapper
from seldon_core.flask_utils import SeldonMicroserviceException
from seldon_core.metrics import BINS, SeldonMetrics
from seldon_core.utils import json_to_seldon_model_metadata


def install() -> None:
    """Idempotent: proper gRPC status codes, metadata from the loaded model, a cheaper custom-metrics update."""
    _install_grpc_status_mapping()
    _install_live_grpc_metadata()
    if not isinstance(seldon_wrapper.grpc, _GrpcWithDecoding):
        seldon_wrapper.grpc = _GrpcWithDecoding()
    SeldonMetrics._update_hist = staticmethod(update_histogram)


def update_histogram(x: float, vals: list, sumv: float) -> tuple[list[float], float]:
    """Seldon's ``_update_hist`` with plain floats instead of numpy scalars.

    Seldon pickles every worker's whole metrics dict to and from its Manager process twice per request;
    numpy scalars in the histograms made that ~3x slower (0.81 vs 0.26 ms per update with our three timers,
    more under load). Same bins as ``np.histogram(x, BINS)``: [a, b), the last bin closed, outside ignored.
    """
    vals = [float(v) for v in vals]
    i = bisect.bisect_right(BINS, x) - 1
    if x == BINS[-1]:
        i = len(BINS) - 2
    if 0 <= i < len(vals):
        vals[i] += 1.0
    return vals, float(sumv + x)


def grpc_status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, SeldonMicroserviceException):
        codes = {400: grpc.StatusCode.INVALID_ARGUMENT, 502: grpc.StatusCode.UNAVAILABLE, 503: grpc.StatusCode.UNAVAILABLE}
        return codes.get(exc.status_code, grpc.StatusCode.INTERNAL), exc.message
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


def _install_grpc_status_mapping() -> None:
    """seldon-core 1.18's gRPC servicer lets every exception become UNKNOWN; map ours to proper status codes, for
    a model's Predict and for a sharded graph's TransformInput (embedder) and Aggregate (merger)."""
    servicer = seldon_wrapper.SeldonModelGRPC
    for name in ("Predict", "TransformInput", "Aggregate"):
        original = getattr(servicer, name)
        if not getattr(original, "_imgsim", False):
            setattr(servicer, name, _with_status(original))


def _with_status(original):
    def call(self, request_grpc, context):
        try:
            return original(self, request_grpc, context)
        except Exception as exc:  # noqa: BLE001 - every failure gets a status; none leaks a trace
            code, message = grpc_status_for(exc)
            context.abort(code, message)

    call._imgsim = True
    call.__name__ = original.__name__
    return call


_UNDECODABLE = object()


class TolerantDecoding(grpc.ServerInterceptor):
    """A message protobuf cannot decode (nested past its recursion limit, or not a SeldonMessage) is the client's
    INVALID_ARGUMENT: gRPC's own handler logs a trace for it and answers INTERNAL."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        decode, behaviour = handler.request_deserializer, handler.unary_unary

        def tolerant(data: bytes):
            try:
                return decode(data)
            except DecodeError:
                return _UNDECODABLE

        def call(request, context):
            if request is _UNDECODABLE:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the message cannot be decoded as a Seldon message "
                                                                "(nested too deeply, or not one)")
            return behaviour(request, context)

        return handler._replace(request_deserializer=tolerant, unary_unary=call)


class _GrpcWithDecoding:
    """``grpc`` as seldon-core's wrapper sees it: its server built with :class:`TolerantDecoding`."""

    def __getattr__(self, name: str):
        return getattr(grpc, name)

    @staticmethod
    def server(*args, interceptors=(), **kwargs):
        return grpc.server(*args, interceptors=[TolerantDecoding(), *interceptors], **kwargs)


def _install_live_grpc_metadata() -> None:
    """seldon-core 1.18 asks the model for its metadata once, before load(): ask on every Metadata call."""
    servicer = seldon_wrapper.SeldonModelGRPC
    if getattr(servicer.ModelMetadata, "_imgsim", False):
        return

    def metadata(self, request_grpc, context):
        data = seldon_methods.init_metadata(self.user_model)
        if data is None:
            context.abort(grpc.StatusCode.INTERNAL, "model metadata failed validation; see the server log")
        return json_to_seldon_model_metadata(data)

    metadata._imgsim = True
    servicer.Metadata = servicer.ModelMetadata = metadata

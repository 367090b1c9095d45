"""The model server's settings, declared once: defaults and help; set by ``IMGSIM_*`` environment variables
or the SeldonDeployment's graph parameters (``ModelServer(**params)``)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from imgsim import config
from imgsim.bundle import RUNTIMES
from imgsim.config import setting
from imgsim.errors import ImgsimError
from imgsim.images import SERVING_MAX_PIXELS
from imgsim.sharded import MAX_SHARDS

ENV_PREFIX = "IMGSIM_"
INFLIGHT_COPIES = 3  # a REST body while MLServer answers it: the body, its parsed JSON, the decoded image bytes


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Server settings; each can come from a constructor parameter or an ``IMGSIM_<NAME>`` environment variable."""

    model_uri: str = setting("/mnt/models", "the bundle: folder, runs:/..., models:/name/N or models:/name@alias "
                             "(an alias is followed as it moves)", "loading")
    default_k: int = setting(5, "neighbours per answer when the request names no k", "answers")
    max_k: int = setting(100, "the largest k a request may ask for", "answers")
    gallery_root: str = setting("", "folder that requests by path may read from; empty: no requests by path", "answers")
    search_k: int = setting(0, "Annoy search_k; 0: the one the bundle's index recall was measured with at extract",
                            "answers")
    max_image_bytes: int = setting(8 * 1024 * 1024, "largest encoded image", "limits")
    max_request_bytes: int = setting(16 * 1024 * 1024, "largest request body", "limits")
    max_batch: int = setting(32, "most images in one request", "limits")
    # JPEG photos of any size draft-decode below it; split's larger limit would let one request cost several times.
    max_pixels: int = setting(SERVING_MAX_PIXELS, "most pixels one image may decode to (after JPEG draft scaling)",
                              "limits")
    max_request_pixels: int = setting(48_000_000, "most pixels over all of a request's images", "limits")
    max_inflight_requests: int = setting(64, "requests with a body the v2 server holds at once (503 with Retry-After "
                                         "beyond): each small one costs little, large ones are held by max_inflight_bytes",
                                         "limits")
    max_inflight_bytes: int = setting(0, "request bytes the v2 server holds at once, each large body counted "
                                      f"{INFLIGHT_COPIES} times (the copies answering it makes); 0: a quarter of the "
                                      "pod's memory limit, 256 MiB without one", "limits")
    body_timeout_s: float = setting(30.0, "seconds a client has to send a request's body to the v2 server (408 "
                                    "after)", "limits")
    max_concurrent_decodes: int = setting(1, "decodes at once per worker process: decoding is where a request's "
                                          "memory goes (~100 MB at 12 MP)", "limits")
    bundle_sha256: str = setting("", "the sha256 the bundle's bundle.json must have (imgsim rollout sets it from the "
                                 "registry's tag); empty: a registry version is checked against its own tag only",
                                 "loading")
    base_root: str = setting("", "a local folder a downloaded gallery version's base may be read from; empty: a base "
                             "comes from the same registry only", "loading")
    runtime: str = setting("onnx", "onnx: ONNX Runtime (the serving image has no torch); torch: the PyTorch weights",
                           "loading")
    threads: int = setting(1, "the runtime's threads per worker: several workers must not oversubscribe the cores",
                           "loading")
    load_backoff_s: float = setting(1.0, "first wait before retrying a failed load; doubles up to the maximum",
                                    "loading")
    load_backoff_max_s: float = setting(60.0, "longest wait between load attempts", "loading")
    poll_interval_s: float = setting(30.0, "how often to look for a newer gallery (the version an alias names, or a "
                                     "replaced bundle folder); 0: only on SIGHUP", "loading")
    shards: int = setting(0, "a node of a sharded gallery's Seldon graph: how many index shards the gallery has "
                          "(0: this server serves a whole bundle)", "graph")
    shard: int = setting(0, "an index-shard node: which shard it serves, 0 .. shards - 1", "graph")

    def __post_init__(self) -> None:
        if not 1 <= self.default_k <= self.max_k:
            raise ImgsimError(f"need 1 <= default_k <= max_k, got default_k={self.default_k}, max_k={self.max_k}")
        if self.runtime not in RUNTIMES:
            raise ImgsimError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.shards and not (2 <= self.shards <= MAX_SHARDS and 0 <= self.shard < self.shards):
            raise ImgsimError(f"need 2 <= shards <= {MAX_SHARDS} and 0 <= shard < shards, got shards={self.shards}, "
                              f"shard={self.shard}")
        if self.bundle_sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.bundle_sha256):
            raise ImgsimError("bundle_sha256 must be a sha256 in 64 lowercase hex characters (the registry's "
                              "imgsim.bundle_sha256 tag), or empty")
        small = [f.name for f in dataclasses.fields(self) if f.name.startswith("max_") and
                 getattr(self, f.name) < (0 if f.name == "max_inflight_bytes" else 1)]
        if not 0 < self.body_timeout_s < 24 * 3600:  # NaN and inf too: no deadline, or every body late
            raise ImgsimError(f"body_timeout_s must be above 0 and under a day, got {self.body_timeout_s}")
        if small or self.threads < 1:
            raise ImgsimError(f"{', '.join(small or ['threads'])} must be at least 1")

    @classmethod
    def from_sources(cls, **params: Any) -> "ServiceConfig":
        """Constructor parameters win over ``IMGSIM_<NAME>`` environment variables, which win over defaults."""
        return config.from_sources(cls, ENV_PREFIX, params, "server parameter")

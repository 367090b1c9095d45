"""Shared by the memory and soak benches: the serving bundle, hostile and good payloads, a server's PSS."""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
from imgsim.bundle import ServingBundle
from imgsim.errors import ImgsimError

DEMO_BUNDLE = REPO / "bundles" / "demo"
# What the chart deploys (values.yaml), so the figures are the pod's.
CHART_SETTINGS = {"GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "2", "GRPC_WORKERS": "1", "GRPC_THREADS": "2",
                  "IMGSIM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def demo_bundle(path: Path = DEMO_BUNDLE) -> Path:
    """The bundle `make demo` exports (Fashion-MNIST, 60k gallery), or one line saying how to make it."""
    try:
        ServingBundle.load(path)
    except (ImgsimError, OSError) as exc:
        raise SystemExit(f"{path} is not a usable bundle ({str(exc)[:160]}): run `make demo` first "
                         "(it trains, extracts and exports bundles/demo; ~12 min on 2 cores)") from None
    return path


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _picture(size: tuple[int, int], mode: str, *, noise: bool = True, seed: int = 0) -> Image.Image:
    # Gradients compress to a small upload that decodes to the full size; a little noise makes JPEG/GIF work.
    # Without noise a 4000x2990 PNG is a few kB, so 16 copies fit in one request.
    grad = Image.linear_gradient("L").resize(size)
    base = grad
    if noise:
        base = Image.blend(grad, Image.fromarray(np.random.default_rng(seed).integers(0, 8, (size[1], size[0]),
                                                                                     dtype=np.uint8)), 0.1)
    if mode == "L":
        return base
    return Image.merge("RGB", (base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), grad)).convert(mode)


def hostile_payloads() -> dict[str, bytes]:
    """The issue's request mix (a tiny 1-bit 36 MP PNG, a 16-bit 16 MP PNG) and the other expensive kinds, each
    as large as the server's defaults admit or larger."""
    sixteen = Image.fromarray((np.arange(4000 * 4000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(4000, 4000))
    frames = [_picture((1500, 1500), "RGB", seed=seed).convert("P") for seed in range(4)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "1-bit 6000x6000 PNG": encode(Image.new("1", (6000, 6000)), "PNG"),
        "16-bit 4000x4000 PNG": encode(sixteen, "PNG"),
        "RGBA 4000x2990 PNG": encode(_picture((4000, 2990), "RGBA", noise=False), "PNG"),
        "CMYK 4000x2990 JPEG": encode(_picture((4000, 2990), "CMYK"), "JPEG", quality=70),
        "animated GIF 4x1500x1500": gif.getvalue(),
        "progressive JPEG 6000x4000": encode(_picture((6000, 4000), "RGB"), "JPEG", quality=70, progressive=True),
    }


def server_pids(leader: int) -> list[int]:
    """Every process of a server started in its own session (the wrapper, gunicorn, its workers, gRPC)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == leader:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def pss_mb(leader: int) -> float:
    """Proportional set size of all the server's processes: shared pages (the mmapped index) counted once."""
    return smaps_mb(leader, "Pss")


def smaps_mb(leader: int, field: str) -> float:
    """One smaps_rollup ``field`` (Pss, Rss, ...) summed over the server's processes, in MB."""
    total = 0
    for pid in server_pids(leader):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))
        except OSError:
            pass
    return total / 1024


class PeakSampler:
    """Samples a server's PSS every ``interval`` seconds in the background; ``peak`` is the largest seen."""

    def __init__(self, leader: int, interval: float = 0.05) -> None:
        self.leader, self.interval, self.peak, self.samples = leader, interval, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, pss_mb(self.leader))
            self.samples += 1
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

"""MLServer's HTTP stack, side by side in one run: uvicorn's HTTP parser (h11, pure Python, or httptools, its C
parser, which it takes when installed) and MLServer's gzip of answers (on, its default, or off), for the echo model
and imgsim on the demo bundle; REST at one client, rounds interleaved so that every variant sees the same machine.

python -m bench.v2_http [--bundle bundles/demo] [--rounds 8] [--per-round 100]

Each variant is a real MLServer (model_server/v2/serve.py in .venv-serve-v2) started from a copy of its model folder
with ``gzip_enabled`` set in settings.json; h11 is forced by putting a package named ``httptools`` that fails to
import ahead on PYTHONPATH. Both are checked on the running server (the parser by the libraries it mapped, gzip by
an answer's Content-Encoding), so each row is what it says.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from bench.common import save, table
from bench.hostile import DEMO_BUNDLE, demo_bundle
from bench.serving import V2_SETTINGS, query_image, v2_body, v2_rest_client
from support.servers import REPO, start_mlserver

MODELS = {"echo": REPO / "bench" / "v2_echo", "imgsim": REPO / "model_server" / "v2"}
WARMUP = 30


def model_folder(source: Path, gzip: bool, into: Path) -> Path:
    folder = into / f"{source.name}-{'gzip' if gzip else 'plain'}"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("__pycache__"))
    settings = json.loads((folder / "settings.json").read_text())
    (folder / "settings.json").write_text(json.dumps(settings | {"gzip_enabled": gzip}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=100)
    args = parser.parse_args()
    bundle = demo_bundle(args.bundle)
    image = query_image(bundle)
    servers, latencies = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "no-httptools" / "httptools").mkdir(parents=True)
        (tmp / "no-httptools" / "httptools" / "__init__.py").write_text(
            'raise ImportError("hidden by bench/v2_http.py: uvicorn falls back to h11")\n')
        try:
            for model, source in MODELS.items():
                for http in ("h11", "httptools"):
                    for gzip in (True, False):
                        env = V2_SETTINGS | {"IMGSIM_MODEL_URI": str(bundle)}
                        if http == "h11":
                            env["PYTHONPATH"] = f"{tmp / 'no-httptools'}:{REPO}"
                        key = (model, http, "on" if gzip else "off")
                        servers[key] = start_mlserver(env, tmp / f"{'-'.join(key)}.log",
                                                      folder=model_folder(source, gzip, tmp / "-".join(key)))
            calls, encodings = {}, {}
            body = v2_body(image)
            for key, server in servers.items():
                model, http, _ = key
                assert ("httptools" in Path(f"/proc/{server.proc.pid}/maps").read_text()) == (http == "httptools"), key
                # What a client that accepts gzip (requests does) gets back (gzip: answers over 500 bytes).
                reply = requests.post(f"{server.rest}/v2/models/{model}/infer", json=body, timeout=30)
                encodings[key] = (f"{reply.headers.get('content-length')} B on the wire "  # (reply.content: unzipped)
                                  f"({reply.headers.get('content-encoding', 'plain')}, {len(reply.content)} B)")
                calls[key] = v2_rest_client(server.rest, model, image)
                for _ in range(WARMUP):
                    assert calls[key](), key
                latencies[key] = []
            for _ in range(args.rounds):
                for key, call in calls.items():
                    for _ in range(args.per_round):
                        started = time.perf_counter()
                        ok = call()
                        latencies[key].append((time.perf_counter() - started) * 1000)
                        assert ok, key
        finally:
            for server in servers.values():
                server.stop()
    rows = []
    for (model, http, gzip), values in latencies.items():
        base = np.percentile(latencies[(model, "h11", "on")], 50)
        rows.append({"model": model, "http": http, "gzip": gzip, "answer": encodings[(model, http, gzip)],
                     "requests": len(values), "p50_ms": float(np.percentile(values, 50)),
                     "p90_ms": float(np.percentile(values, 90)),
                     "of_h11_gzip": float(np.percentile(values, 50) / base)})
    print(table(rows, ["model", "http", "gzip", "answer", "requests", "p50_ms", "p90_ms", "of_h11_gzip"]))
    print(f"wrote {save('v2_http', {'rounds': args.rounds, 'per_round': args.per_round, 'rows': rows})}")


if __name__ == "__main__":
    main()

"""top_k_viewer.ipynb: ask a server (or a bundle in-process) for neighbours, review and walk the answers."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from numpy.typing import NDArray

from imgsim.explore.gallery import Gallery

Ask = Callable[[bytes, int], dict]  # image bytes, k -> an answer as the server gives it (jsonData)


def asker(server_url: str = "", folder: str | Path | None = None) -> Ask:
    """Query a running server over REST, or a bundle in-process, with the same answer shape."""
    if server_url:
        from imgsim.serve.client import query_rest

        return lambda data, k: query_rest(server_url, data, k)
    from imgsim.serve.search import Searcher, make_answer

    searcher = Searcher(folder)
    return lambda data, k: make_answer(searcher, searcher.search_bytes([data], k))


def id_asker(server_url: str = "", folder: str | Path | None = None) -> Callable[[int, int], dict]:
    """"More like this" by gallery id, from a server over REST or from a bundle in-process."""
    if server_url:
        import requests

        def ask(item_id: int, k: int) -> dict:
            response = requests.post(f"{server_url.rstrip('/')}/api/v1.0/predictions",
                                     json={"jsonData": {"id": item_id, "k": k}}, timeout=30)
            response.raise_for_status()
            return response.json()["jsonData"]
        return ask
    from imgsim.serve.search import Searcher, make_answer

    searcher = Searcher(folder)
    return lambda item_id, k: make_answer(searcher, [searcher.search_id(item_id, k)])


def review(gallery: Gallery, ask: Ask, rows: NDArray[np.int64], k: int = 5) -> list[dict]:
    """Query with gallery images and record each answer; an image's own copy is skipped so top-1 means the
    nearest *other* image. ``wrong`` marks a top-1 of another class; ``first_right`` is the rank of the first
    neighbour of the query's class (k + 1 if none): the higher, the more wrong."""
    out = []
    for row in rows:
        item = gallery.index.items[int(row)]
        answer = ask((gallery.root / item.path).read_bytes(), k + 1)
        neighbours = [n for n in answer["results"][0]["neighbours"] if n["id"] != item.id][:k]
        ranks = [n["rank"] for n in neighbours if n["label"] == item.label]
        out.append({"id": item.id, "path": item.path, "label": item.label, "neighbours": neighbours,
                    "wrong": bool(neighbours) and neighbours[0]["label"] != item.label,
                    "first_right": min(ranks) if ranks else k + 1, "top1_score": neighbours[0]["score"] if neighbours else 0.0,
                    "bundle_version": answer.get("bundle_version", ""), "index_sha256": answer.get("index_sha256", "")})
    return out


def most_wrong(reviews: list[dict]) -> list[dict]:
    """Queries whose top-1 is of another class, the first right neighbour farthest down (then the surest
    wrong top-1) first."""
    return sorted((r for r in reviews if r["wrong"]), key=lambda r: (-r["first_right"], -r["top1_score"]))


def walk(gallery: Gallery, ask_id: Callable[[int, int], dict], start: int, steps: int = 6) -> list[dict]:
    """"More like this", repeatedly: from gallery id ``start`` to its nearest not yet visited neighbour."""
    path, current, seen = [], start, {start}
    for _ in range(steps):
        answer = ask_id(current, steps + 2)
        path.append(answer["results"][0]["neighbours"][0])
        nxt = next((n for n in answer["results"][0]["neighbours"] if n["id"] not in seen), None)
        if nxt is None:
            break
        seen.add(nxt["id"])
        current = nxt["id"]
    return path


def show_rows(gallery: Gallery, reviews: list[dict], out: Path, title: str = "") -> Path:
    """A PNG of each query beside its neighbours with label and score (green: same class)."""
    from imgsim.plots import neighbour_grid

    by_id = {item.id: row for row, item in enumerate(gallery.index.items)}
    rows = [(gallery.thumbnail(by_id[r["id"]]), r["label"],
             [(gallery.thumbnail(by_id[n["id"]]), n["label"], n["score"]) for n in r["neighbours"]]) for r in reviews]
    return neighbour_grid(rows, out, value="score", title=title)

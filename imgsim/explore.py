"""What the notebooks compute: ANN against exact search, embedding maps and class confusion, top-k reviews."""

from __future__ import annotations

import base64
import dataclasses
import io
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from imgsim.bundle import ServingBundle
from imgsim.index import GalleryItem, IndexBundle
from imgsim.metrics import exact_topk, recall_at_k


@dataclasses.dataclass
class Gallery:
    """A bundle's index and where its images are, loaded without a model (exploring needs only vectors)."""

    index: IndexBundle
    root: Path | None
    search_k: int
    n_trees: int
    classes: list[str]
    folder: Path | None = None  # the bundle's folder, for in-process search
    download: tempfile.TemporaryDirectory | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, folder: str | Path, root: str | Path | None = None) -> "Gallery":
        bundle = ServingBundle.load(folder)
        found = root or bundle.gallery.get("root")
        return cls(bundle.index, Path(found) if found else None, bundle.search_k, bundle.index.n_trees,
                   list(bundle.spec.classes), Path(folder))

    @classmethod
    def fetch(cls, uri: str, root: str | Path | None = None) -> tuple["Gallery", str]:
        """The gallery behind any bundle URI (folder, runs:/, models:/) and its registry version or "". A download
        is held by the gallery (its index is memory-mapped) and deleted with it or when the kernel exits."""
        from imgsim import tracking
        from imgsim.export import resolve_bundle

        download = None if tracking.local_path(uri) is not None else tempfile.TemporaryDirectory(prefix="imgsim-")
        folder, version = resolve_bundle(uri, download.name if download else None)
        gallery = cls.open(folder, root)
        gallery.download = download
        return gallery, version

    def sample(self, n: int, seed: int = 0) -> NDArray[np.int64]:
        """``n`` rows spread at random over the gallery (all of them if it is smaller)."""
        return np.sort(np.random.default_rng(seed).permutation(len(self.index.items))[:n])

    def thumbnail(self, row: int, side: int = 64) -> Image.Image | None:
        from imgsim.images import decode_image

        if self.root is None:
            return None
        try:
            img = decode_image((self.root / self.index.items[row].path).read_bytes(), draft=side)
        except (OSError, ValueError):
            return None
        img.thumbnail((side, side))
        return img


def ann_grid(gallery: Gallery, n_trees: Sequence[int], search_k: Sequence[int], queries: int = 500, k: int = 10,
             seed: int = 0) -> list[dict]:
    """Recall@k against exact search and single-query speed for every n_trees x search_k, on gallery vectors
    as queries; each n_trees is a fresh build (time and file size recorded). The bundle's own setting is
    included and marked."""
    vectors = np.asarray(gallery.index.embeddings, dtype=np.float32)
    picked = vectors[gallery.sample(queries, seed)]
    truth = exact_topk(picked, vectors, k)
    started = time.perf_counter()
    exact_topk(picked, vectors, k, chunk=1)
    exact_qps = len(picked) / (time.perf_counter() - started)
    items = [GalleryItem(i, "", "", "", "") for i in range(len(vectors))]
    rows = []
    for trees in sorted(set(n_trees) | {gallery.n_trees}):
        started = time.perf_counter()
        index = IndexBundle.build(vectors, items, n_trees=trees, seed=seed)
        build = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            index.save(tmp)
            size_mb = (Path(tmp) / "index.ann").stat().st_size / 2**20
        for budget in sorted(set(search_k) | ({gallery.search_k} if trees == gallery.n_trees else set())):
            started = time.perf_counter()
            found = [index.search(q, k, budget)[0] for q in picked]
            qps = len(picked) / (time.perf_counter() - started)
            rows.append({"n_trees": trees, "search_k": budget, "recall_at_k": recall_at_k(found, truth, k),
                         "qps": qps, "speedup_vs_exact": qps / exact_qps, "build_seconds": build,
                         "index_mb": size_mb, "bundle_setting": trees == gallery.n_trees and budget == gallery.search_k})
    return rows


def plot_ann_grid(rows: list[dict], out: Path | None = None):
    """Recall against queries per second, one line per n_trees, the bundle's setting ringed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trees in sorted({r["n_trees"] for r in rows}):
        line = sorted((r for r in rows if r["n_trees"] == trees), key=lambda r: r["search_k"])
        ax.plot([r["qps"] for r in line], [r["recall_at_k"] for r in line], marker="o", label=f"{trees} trees")
    for r in rows:
        if r["bundle_setting"]:
            ax.scatter([r["qps"]], [r["recall_at_k"]], s=220, facecolors="none", edgecolors="red", linewidths=2,
                       label=f"bundle: {r['n_trees']} trees, search_k {r['search_k']}", zorder=5)
    ax.set_xscale("log"), ax.set_xlabel("queries per second (one at a time)"), ax.set_ylabel("recall@k vs exact")
    ax.legend(fontsize=8), ax.grid(alpha=0.3)
    if out is not None:
        fig.savefig(out, dpi=100, bbox_inches="tight")
    return fig


def embedding_map(gallery: Gallery, rows: NDArray[np.int64], method: str = "tsne", seed: int = 0) -> NDArray[np.float64]:
    """2-D coordinates of the given rows: UMAP when asked and installed, else t-SNE."""
    vectors = np.asarray(gallery.index.embeddings)[rows]
    if method == "umap":
        try:
            import umap

            return umap.UMAP(random_state=seed).fit_transform(vectors)
        except ImportError:
            pass
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, init="pca", random_state=seed,
                perplexity=min(30.0, max(2.0, (len(rows) - 1) / 3))).fit_transform(vectors)


def interactive_map(gallery: Gallery, rows: NDArray[np.int64], coords: NDArray[np.float64], out: Path):
    """A bokeh scatter coloured by class with each image as a thumbnail on hover, written as one self-contained
    HTML file (bokeh's JavaScript inlined: no CDN). Returns a second copy of the figure for the notebook to show
    (a bokeh model belongs to one document only)."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    data = _map_data(gallery, rows, coords)
    out.write_text(file_html(_map_figure(data, len(rows)), INLINE, "imgsim embedding map"))
    return _map_figure(data, len(rows))


def _map_data(gallery: Gallery, rows: NDArray[np.int64], coords: NDArray[np.float64]) -> dict:
    from bokeh.palettes import Category10, Category20

    labels = [gallery.index.items[r].label or "unlabelled" for r in rows]
    names = sorted(set(labels))
    palette = (Category10[10] if len(names) <= 10 else Category20[20]) * (len(names) // 20 + 1)
    return {"x": coords[:, 0], "y": coords[:, 1], "label": labels,
            "path": [gallery.index.items[r].path for r in rows], "id": [gallery.index.items[r].id for r in rows],
            "color": [palette[names.index(label)] for label in labels],
            "thumb": [_data_uri(gallery.thumbnail(int(r))) for r in rows]}


def _map_figure(data: dict, n: int):
    from bokeh.models import ColumnDataSource, HoverTool
    from bokeh.plotting import figure

    fig = figure(width=760, height=620, title=f"{n} gallery embeddings", tools="pan,wheel_zoom,reset,save")
    fig.scatter("x", "y", source=ColumnDataSource(data), color="color", legend_field="label", size=6, alpha=0.8)
    fig.add_tools(HoverTool(tooltips='<div><img src="@thumb" width="64" height="64"><br>'
                                     '<b>@label</b> id @id<br><small>@path</small></div>'))
    fig.legend.label_text_font_size = "8pt"
    return fig


def _data_uri(img: Image.Image | None) -> str:
    if img is None:
        return ""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def neighbour_confusion(gallery: Gallery, rows: NDArray[np.int64], k: int = 10) -> tuple[list[str], NDArray[np.float64]]:
    """Share of each class's k nearest gallery neighbours (itself excluded, exact search) that fall in each
    class: rows are the query's class, columns the neighbour's; each sampled class's row sums to 1."""
    vectors = np.asarray(gallery.index.embeddings)
    labels = [item.label or "unlabelled" for item in gallery.index.items]
    names = sorted(set(labels))
    column = {name: i for i, name in enumerate(names)}
    matrix = np.zeros((len(names), len(names)))
    for query, found in zip(rows, exact_topk(vectors[rows], vectors, k + 1)):
        for n in [n for n in found if n != query][:k]:
            matrix[column[labels[query]], column[labels[n]]] += 1
    return names, matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)


def worst_pairs(names: list[str], matrix: NDArray[np.float64], n: int = 5) -> list[dict]:
    """The class pairs whose neighbourhoods mix most (both directions added), worst first."""
    pairs = [{"classes": (names[a], names[b]), "mixing": float(matrix[a, b] + matrix[b, a])}
             for a in range(len(names)) for b in range(a + 1, len(names))]
    return sorted(pairs, key=lambda p: -p["mixing"])[:n]


Ask = Callable[[bytes, int], dict]  # image bytes, k -> an answer as the server gives it (jsonData)


def asker(server_url: str = "", folder: str | Path | None = None) -> Ask:
    """Query a running server over REST, or a bundle in-process, with the same answer shape."""
    if server_url:
        from imgsim.client import query_rest

        return lambda data, k: query_rest(server_url, data, k)
    from imgsim.search import Searcher
    from imgsim.service import make_answer

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
    from imgsim.search import Searcher
    from imgsim.service import make_answer

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

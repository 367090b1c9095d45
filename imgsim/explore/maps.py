"""embedding_explorer.ipynb: 2-D maps of the embeddings and which classes share neighbourhoods."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from imgsim.explore.gallery import Gallery
from imgsim.metrics import exact_topk


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

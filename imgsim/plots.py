"""Pictures people would rather look at: embedding maps, query/neighbour grids, training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from numpy.typing import NDArray  # noqa: E402
from PIL import Image  # noqa: E402


def embedding_map(embeddings: NDArray[np.float32], labels: Sequence[str], out: Path, *, max_points: int = 2000,
                  seed: int = 42) -> Path:
    """A t-SNE map of a sample of embeddings, coloured by class."""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(len(embeddings))[:max_points])
    points = TSNE(n_components=2, init="pca", random_state=seed,
                  perplexity=min(30.0, max(2.0, (len(pick) - 1) / 3))).fit_transform(embeddings[pick])
    names = np.array(labels)[pick]
    fig, ax = plt.subplots(figsize=(8, 8))
    classes = sorted(set(names))
    for name, (colour, marker) in zip(classes, class_styles(len(classes))):
        mask = names == name
        ax.scatter(points[mask, 0], points[mask, 1], s=6, label=name, color=colour, marker=marker)
    if len(classes) > 10:  # a legend that long covers the points: beside the map, in columns
        ax.legend(markerscale=3, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), ncol=1 + len(classes) // 30)
    else:
        ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_title(f"t-SNE of {len(pick)} embeddings")
    ax.set_xticks([]), ax.set_yticks([])
    return _save(fig, out)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def class_styles(n: int) -> list[tuple[tuple[float, float, float], str]]:
    """A (colour, marker) per class, all different: tab20's colours, the strong ones first (the first ten are
    tab10's), then the same colours with the next marker. Matplotlib's default cycle repeats after ten."""
    palette = plt.get_cmap("tab20").colors
    colours = list(palette[0::2]) + list(palette[1::2])
    return [(colours[i % len(colours)], MARKERS[(i // len(colours)) % len(MARKERS)]) for i in range(n)]


def neighbour_grid(rows: Sequence[tuple[Image.Image | None, str, list[tuple[Image.Image | None, str, float]]]],
                   out: Path, *, value: str = "d", title: str = "") -> Path:
    """One row per query: the query image, then its neighbours with label and ``value`` (distance by default;
    green: the query's label). A missing image leaves its cell blank."""
    cols = 1 + max(len(r[2]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.8 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (query, label, neighbours) in enumerate(rows):
        if query is not None:
            axes[r, 0].imshow(query, cmap="gray")
        axes[r, 0].set_title(f"query\n{label}", fontsize=7, color="blue")
        for c, (img, n_label, number) in enumerate(neighbours, start=1):
            if img is not None:
                axes[r, c].imshow(img, cmap="gray")
            axes[r, c].set_title(f"{n_label}\n{value}={number:.3f}", fontsize=7,
                                 color="green" if n_label == label else "red")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, out)


def pair_grid(pairs: Sequence[tuple[Image.Image | None, str, Image.Image | None, str, str]], out: Path,
              per_row: int = 4) -> Path:
    """Image pairs side by side, ``per_row`` pairs to a row, each pair titled with its caption and names."""
    rows = -(-len(pairs) // per_row)
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(2.3 * per_row, 1.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for n, (left, left_name, right, right_name, caption) in enumerate(pairs):
        r, c = divmod(n, per_row)
        for ax, img, name in ((axes[r, 2 * c], left, left_name), (axes[r, 2 * c + 1], right, right_name)):
            if img is not None:
                ax.imshow(img, cmap="gray")
            ax.text(0.5, -0.08, _tail(name), transform=ax.transAxes, fontsize=5, ha="center", va="top")
        axes[r, 2 * c].set_title(caption, fontsize=7, color="darkred", x=1.0)
    return _save(fig, out)


def _tail(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else "..." + name[-limit:]


def training_curves(history: list[dict], out: Path) -> Path:
    """Loss and accuracy by epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o")
    left.set_xlabel("epoch"), left.set_ylabel("train loss")
    right.plot(epochs, [h["train_accuracy"] for h in history], marker="o", label="train")
    right.plot(epochs, [h["eval_accuracy"] for h in history], marker="o", label="eval")
    right.set_xlabel("epoch"), right.set_ylabel("accuracy"), right.legend()
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100, bbox_inches="tight")  # (a legend beside the map is kept whole)
    plt.close(fig)
    return out

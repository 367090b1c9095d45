"""The pictures logged to MLflow: a class map that tells 22 classes apart."""

from __future__ import annotations

import numpy as np
from PIL import Image

from imgsim.plots import class_styles, embedding_map


def test_every_class_of_a_large_gallery_gets_its_own_colour_and_marker():
    for n in (1, 10, 22, 60):
        styles = class_styles(n)
        assert len(styles) == n and len(set(styles)) == n
    assert len({colour for colour, _ in class_styles(20)}) == 20  # colours first, markers only past them


def test_the_embedding_map_of_22_classes_draws_them_in_22_styles(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    scatter = matplotlib.axes.Axes.scatter
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", lambda self, *a, **kw: (drawn.append(
        (tuple(kw["color"]), kw["marker"], kw["label"])), scatter(self, *a, **kw))[1])
    rng = np.random.default_rng(0)
    labels = [f"class-{i % 22:02d}" for i in range(440)]
    embeddings = (rng.normal(size=(440, 16)) + np.repeat(np.eye(22, 16) * 8, 20, axis=0)[np.argsort(
        np.argsort([int(l[6:]) for l in labels], kind="stable"))]).astype(np.float32)
    out = embedding_map(embeddings, labels, tmp_path / "map.png")
    assert len(drawn) == 22 and len({(c, m) for c, m, _ in drawn}) == 22
    with Image.open(out) as img:
        assert img.size[0] > 500 and img.size[1] > 500

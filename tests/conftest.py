"""Shared fixtures: a small real image folder with every kind of bad file, and one real pipeline run."""

from __future__ import annotations

import io
import json
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.store import mlflow_store

@pytest.fixture(scope="session", autouse=True)
def _feature_store(tmp_path_factory):
    """Backbone features the tests keep go to a session folder (and the stage processes they start inherit it), not
    to the checkout's checkpoints/features."""
    import os

    before = os.environ.get("IMGSIM_FEATURE_STORE")
    os.environ["IMGSIM_FEATURE_STORE"] = str(tmp_path_factory.mktemp("features"))
    yield
    if before is None:
        os.environ.pop("IMGSIM_FEATURE_STORE", None)
    else:
        os.environ["IMGSIM_FEATURE_STORE"] = before


CLASSES = ("circle", "square", "stripes")
PER_CLASS = 12


def _picture(label: str, i: int, size: int = 32) -> Image.Image:
    """Class-typical synthetic images with per-image variation, so a tiny model can learn them."""
    rng = np.random.default_rng(zlib.crc32(f"{label}-{i}".encode()))  # str hash() varies per process
    yy, xx = np.mgrid[:size, :size]
    c = size / 2 + rng.uniform(-3, 3, 2)
    if label == "circle":
        arr = ((yy - c[0]) ** 2 + (xx - c[1]) ** 2 < (size / 3.5) ** 2) * 220
    elif label == "square":
        arr = ((abs(yy - c[0]) < size / 4) & (abs(xx - c[1]) < size / 4)) * 220
    else:
        arr = ((xx + int(rng.integers(0, 4))) // 4 % 2) * 220
    arr = np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def photo(seed: int, side: int = 96) -> Image.Image:
    """A smooth random picture: different seeds give pictures unlike each other (unlike the fixture's shapes)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC)


TINTS = {"red": (1.0, 0.35, 0.35), "green": (0.35, 1.0, 0.35), "blue": (0.35, 0.35, 1.0)}


def colour_folder(root, per_class: int = 10):
    """Three classes of smooth random pictures, each class tinted its own colour: learnable from ImageNet
    features, unlike each other within a class."""
    for c, (label, tint) in enumerate(TINTS.items()):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            arr = np.asarray(photo(100 * c + i, side=48), dtype=np.float32) * np.array(tint, dtype=np.float32)
            Image.fromarray(arr.astype(np.uint8)).save(root / label / f"{i:02d}.png")
    return root


def make_image_folder(root: Path, per_class: int = PER_CLASS) -> dict[str, str]:
    """Write a class-per-folder tree plus every awkward case; returns {relative path: expected rejection}."""
    for label in CLASSES:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            _picture(label, i).save(root / label / f"{i:03d}.png")
    circle = _picture("circle", 100)
    circle.convert("RGBA").save(root / "circle" / "rgba.png")
    circle.convert("P").save(root / "circle" / "palette.png")
    circle.convert("CMYK").save(root / "circle" / "cmyk.jpg")
    Image.fromarray(np.asarray(circle).astype(np.uint16) * 257).save(root / "circle" / "sixteen.png")
    (root / "square" / "nested" / "deeper").mkdir(parents=True)
    _picture("square", 101).convert("RGB").save(root / "square" / "nested" / "deeper" / "photo.webp")
    _picture("square", 102).save(root / "square" / "nested" / "bitmap.bmp")
    _picture("stripes", 103).save(root / "stripes" / "anim.gif", save_all=True,
                                  append_images=[_picture("stripes", 104)])
    (root / "stripes" / "duplicate.png").write_bytes((root / "stripes" / "000.png").read_bytes())
    (root / "circle" / ".hidden.png").write_bytes((root / "circle" / "000.png").read_bytes())
    (root / ".cache").mkdir()
    (root / ".cache" / "junk.png").write_bytes(b"junk")
    bad = {
        "circle/empty.png": "empty file",
        "circle/notes.txt": "not an image",
        "square/truncated.png": "corrupt or truncated",
        "square/bomb.png": "decompression bomb",
        "stripes/outside.png": "symlink pointing outside",
        "README.md": "not inside a class folder",
    }
    (root / "circle" / "empty.png").write_bytes(b"")
    (root / "circle" / "notes.txt").write_text("hello, not an image")
    buf = io.BytesIO()
    _picture("square", 105).save(buf, format="PNG")
    (root / "square" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.new("1", (9000, 9000)).save(root / "square" / "bomb.png")  # 81 MP in a few kB
    outside = root.parent / f"{root.name}-outside.png"
    _picture("stripes", 106).save(outside)
    (root / "stripes" / "outside.png").symlink_to(outside)
    (root / "README.md").write_text("class folders live here")
    return bad


@pytest.fixture
def image_folder(tmp_path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "images"
    return root, make_image_folder(root)


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
    """split -> train (2 epochs) -> extract once through the real MLflow store; shared by many tests."""
    from imgsim.runs.main import run_main
    from imgsim.split import SplitConfig
    from imgsim.stages.settings import ExtractConfig, TrainConfig

    work = tmp_path_factory.mktemp("pipeline")
    root = work / "images"
    bad = make_image_folder(root)
    with mlflow_store(work):
        result = run_main(
            SplitConfig(data_dir=str(root), test_ratio=0.25, eval_ratio=0.1),
            TrainConfig(epochs=2, batch_size=16, widths=(8, 16), depths=(1, 1), embedding_dim=16, image_size=32,
                        checkpoint_dir=str(work / "ckpt")),
            ExtractConfig(n_trees=5, plot_points=40),
        )
        (work / "result.json").write_text(json.dumps(result))
    return {"work": work, "root": root, "bad": bad, "result": result}


@pytest.fixture(scope="session")
def registry_server(pipeline_run, tmp_path_factory):
    """A real `mlflow server` over the pipeline's store, as a cluster's tracking server: the servers' environments
    carry mlflow-skinny, which reads a registry over HTTP only."""
    from support.servers import start_tracking_server

    srv = start_tracking_server(pipeline_run["work"], tmp_path_factory.mktemp("registry") / "mlflow.log")
    yield srv.rest
    srv.stop()


@pytest.fixture
def living(pipeline_run):
    """The pipeline's extract bundle registered as version 1 of a fresh gallery name, with an alias; a fresh
    folder under the image root for the images a test adds."""
    import mlflow

    from imgsim.modelspec import file_sha256
    from imgsim.runs import tracking

    name = f"gallery-{uuid.uuid4().hex[:8]}"
    with mlflow_store(pipeline_run["work"]):
        run_id = pipeline_run["result"]["extract"]
        uri = mlflow.get_run(run_id).info.artifact_uri + "/bundle"
        with tracking.fetched(uri + "/bundle.json", "bundle.json") as meta:  # vouched for as extract does
            digest = file_sha256(meta)
        assert tracking.register_bundle(name, run_id, uri, "serving", bundle_sha256=digest) == "1"
        incoming = pipeline_run["root"] / f"incoming-{name}"
        incoming.mkdir()
        yield {"name": name, "uri": f"models:/{name}@serving", "root": pipeline_run["root"], "incoming": incoming,
               "work": pipeline_run["work"]}

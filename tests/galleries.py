"""Helpers for tests of the living gallery: a fresh registered gallery per test, changes, lookups."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from imgsim.bundle import ServingBundle
from imgsim.bundle_format import Lineage, read_meta
from imgsim.runs.export import fetched_version
from imgsim.runs.gallery import run_gallery_add, run_gallery_remove
from imgsim.stages.settings import AddConfig, RemoveConfig
from tests.conftest import _picture


def add(living, **kw) -> dict:
    return run_gallery_add(AddConfig(bundle=living["uri"], register_name=living["name"], **kw))


def remove(living, **kw) -> dict:
    return run_gallery_remove(RemoveConfig(bundle=living["uri"], register_name=living["name"], **kw))


def load_version(uri: str) -> ServingBundle:
    with fetched_version(uri) as (folder, version):
        bundle = ServingBundle.load(folder)
        bundle.version = version
        bundle.lineage = Lineage.from_json(read_meta(folder)["gallery"])
        return bundle


def alias_version(living) -> str:
    return str(MlflowClient().get_model_version_by_alias(living["name"], "serving").version)


def new_images(folder: Path, n: int, start: int = 500) -> list[str]:
    paths = []
    for i in range(n):
        path = folder / f"new-{start + i}.png"
        _picture(("circle", "square", "stripes")[i % 3], start + i).save(path)
        paths.append(str(path))
    return paths



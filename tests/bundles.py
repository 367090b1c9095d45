"""Bundles for tests: the test pipeline's own, exported; and built by hand: another model's bundle over the same
gallery, re-recorded checksums."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from imgsim.bundle import ServingBundle
from imgsim.bundle_format import BUNDLE_JSON, FILES, ModelSource
from imgsim.index import GalleryIndex
from imgsim.modelspec import file_sha256
from imgsim.nn.embed import embed_array
from imgsim.nn.model import EmbeddingNet, TrainedModel
from imgsim.runs.export import export_bundle
from imgsim.stages.bundle_writer import build_probes, write_bundle
from support.store import mlflow_store


def pipeline_bundle(pipeline_run: dict, folder: Path) -> Path:
    """The test pipeline's extract bundle (conftest's ``pipeline_run``), exported and verified into ``folder``."""
    with mlflow_store(pipeline_run["work"]):
        return export_bundle(pipeline_run["result"]["bundle_uri"], folder)


def rerecord_checksums(folder: Path) -> None:
    meta = json.loads((folder / BUNDLE_JSON).read_text())
    meta["files"] = {name: file_sha256(folder / name) for name in FILES}
    (folder / BUNDLE_JSON).write_text(json.dumps(meta))


def other_model_bundle(good: Path, out: Path) -> Path:
    """A complete, self-consistent bundle of another model with the same shape over the same gallery."""
    first = ServingBundle.load(good)
    torch.manual_seed(123)
    net = EmbeddingNet(first.spec.args, first.spec.preprocess).eval()
    other = TrainedModel(first.spec.args, first.spec.preprocess, first.spec.classes, net.state_dict(), {})
    inputs = {int(i): x for i, x in zip(first.probes.ids, first.probes.inputs)}
    # Embed every gallery item the way the other model would (probe inputs stand in for the rest).
    fill = first.probes.inputs[0]
    vectors = embed_array(net, np.stack([inputs.get(i, fill) for i in range(len(first.index.items))]))[0]
    index = GalleryIndex.build(vectors, first.index.items, n_trees=first.index.n_trees)
    probes = build_probes(net, index, lambda i: inputs.get(i, fill), vectors)
    return write_bundle(ServingBundle(other.spec, index, probes, ModelSource("other"), torch_model=other), out)

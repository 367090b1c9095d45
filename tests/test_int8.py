"""precision=int8: extract quantizes the serving model on gallery images, embeds the gallery with that same model,
and the bundle serves it, verified against its own probes; its torch weights are refused as its engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from imgsim.bundle import ServingBundle
from imgsim.bundle_format import BUNDLE_JSON, BundleError, Lineage, ModelSource
from imgsim.modelspec import ONNX_FILE
from imgsim.nn.data import ImageFiles
from imgsim.nn.quantize import TRUNK_PREFIX
from imgsim.serve.runtime import OnnxModel
from imgsim.split import SplitConfig, split_dataset
from imgsim.stages.bundle_writer import write_bundle
from imgsim.stages.extract import extract
from imgsim.stages.gallery import add_images
from imgsim.stages.settings import AddConfig, ExtractConfig, TrainConfig
from imgsim.stages.train import train_model
from tests.conftest import colour_folder


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """A head-mode model at 64 px and its int8 extraction (with train's float32 features in the store, unused)."""
    work = tmp_path_factory.mktemp("int8")
    manifest = split_dataset(SplitConfig(data_dir=str(colour_folder(work / "images")), test_ratio=0.2,
                                         eval_ratio=0.2))
    store = str(work / "features")
    cfg = TrainConfig(image_size=64, epochs=3, head_views=1, checkpoint_dir=str(work / "c"), feature_store=store)
    bundle = train_model(cfg, manifest).bundle
    result = extract(ExtractConfig(precision="int8", feature_store=store, workers=0, gallery_name=""), bundle,
                     manifest)
    return bundle, manifest, result


def _save(bundle, manifest, result, folder):
    return write_bundle(ServingBundle(bundle.spec, result.index, result.probes, ModelSource("test"), result.search_k,
                                      torch_model=bundle, onnx_model=result.int8.onnx,
                                      quantization=result.int8.record(), lineage=Lineage(root=str(manifest.root))),
                        folder)


def test_the_served_model_is_int8_in_the_backbone_and_float32_in_the_head(int8_run):
    _, _, result = int8_run
    graph = onnx.load_from_string(result.int8.onnx).graph
    quantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(n.name.startswith(TRUNK_PREFIX) and n.input[1] in quantized for n in convs)
    head = [n for n in graph.node if n.op_type == "Gemm"]
    assert head and not any(n.input[1] in quantized for n in head)  # the head's weights: float32
    assert result.int8.calibration_images == len(result.index.items)  # a gallery smaller than the sample: all of it


def test_the_gallery_is_embedded_by_the_model_that_serves_it(int8_run):
    bundle, manifest, result = int8_run
    items = [item for item in manifest.items if item.split == "train"]
    images = np.stack([ImageFiles(items, manifest.root, bundle.preprocess).read(i) for i in range(len(items))])
    served = OnnxModel(result.int8.onnx, bundle.preprocess)(images)[0]
    assert np.abs(served - np.asarray(result.index.embeddings)).max() <= 1e-5
    # Close to the float32 model's, not equal to it: the probes record both.
    assert 0.9 <= result.metrics["int8_probe_cosine_min"] <= result.metrics["int8_probe_cosine_mean"] < 1 - 1e-6


def test_the_bundle_serves_the_int8_model_and_refuses_its_torch_weights(int8_run, tmp_path):
    bundle, manifest, result = int8_run
    folder = _save(bundle, manifest, result, tmp_path / "b")
    assert (folder / ONNX_FILE).read_bytes() == result.int8.onnx
    meta = json.loads((folder / BUNDLE_JSON).read_text())
    assert meta["onnx"]["quantization"]["precision"] == "int8" and meta["probes"]["parity"] > 1e-4
    loaded = ServingBundle.load(folder)  # verifies: the probes re-embedded by the int8 engine
    assert loaded.quantization == result.int8.record()
    assert np.abs(loaded.engine(result.probes.inputs)[0] - result.probes.embeddings).max() <= 1e-5
    with pytest.raises(BundleError, match="int8 model.onnx.*use runtime 'onnx'"):
        ServingBundle.load(folder, runtime="torch")


def test_a_gallery_change_embeds_with_the_int8_model_and_stays_int8(int8_run, tmp_path):
    bundle, manifest, result = int8_run
    parent = ServingBundle.load(_save(bundle, manifest, result, tmp_path / "b"))
    new = Path(manifest.root) / "added" / "new.png"
    new.parent.mkdir(exist_ok=True)
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(new)
    change = add_images(parent, AddConfig(bundle="", label="added"), [str(new)])
    child = ServingBundle.load(write_bundle(change.bundle, tmp_path / "child"), base=tmp_path / "b")
    assert child.quantization == parent.quantization
    added = child.index.row(change.added[0].id)
    image = bundle.preprocess.decode(new.read_bytes())
    assert np.abs(child.index.embeddings[added] - parent.engine(image[None])[0][0]).max() <= 1e-5
    with pytest.raises(BundleError, match="use runtime 'onnx'"):
        ServingBundle.load(tmp_path / "child", base=tmp_path / "b", runtime="torch")


def test_the_float32_export_in_an_int8_bundle_is_refused(int8_run, tmp_path):
    bundle, _, result = int8_run
    from imgsim.nn.onnx_export import export_onnx

    fp32 = tmp_path / "fp32.onnx"
    export_onnx(bundle, fp32, result.probes.inputs)
    folder = write_bundle(ServingBundle(bundle.spec, result.index, result.probes, ModelSource("test"), result.search_k,
                                        torch_model=bundle, onnx_model=fp32.read_bytes(),
                                        quantization=result.int8.record()), tmp_path / "b")
    with pytest.raises(BundleError, match="model.onnx is not the model that built this index"):
        ServingBundle.load(folder)


@pytest.mark.parametrize("settings, error", [({"precision": "int4"}, "precision must be one of fp32, int8"),
                                             ({"precision": "int8", "num_shards": 2}, "one extract process"),
                                             ({"precision": "int8", "shard_group": "g"}, "one extract process"),
                                             ({"precision": "int8", "merge": "g"}, "one extract process")])
def test_precision_settings_are_checked(settings, error):
    with pytest.raises(ValueError, match=error):
        ExtractConfig(**settings)

"""The embedding ResNet: shapes, normalisation, no NaNs, and the TrainedModel round trip."""

import pytest
import torch

from imgsim.errors import ImgsimError
from imgsim.images import Preprocess
from imgsim.modelspec import ModelArgs
from imgsim.nn.model import EmbeddingNet, TrainedModel

PRE = Preprocess(size=28, channels=1, mean=(0.3,), std=(0.3,))


@pytest.mark.parametrize("head", ["cosine", "linear"])
def test_forward_and_embed_shapes_without_nans(head):
    model = EmbeddingNet(ModelArgs(num_classes=5, widths=(8, 16, 32), depths=(1, 2, 1), embedding_dim=24,
                                      head=head), PRE).eval()
    x = torch.rand(3, 1, 28, 28)
    logits, emb = model(x), model.embed(x)
    assert logits.shape == (3, 5) and emb.shape == (3, 24)
    assert torch.isfinite(logits).all() and torch.isfinite(emb).all()
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    both_emb, both_logits = model.embed_and_classify(x)
    assert torch.allclose(both_emb, emb) and torch.allclose(both_logits, logits)


def test_colour_and_larger_inputs():
    pre = Preprocess(size=64, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    model = EmbeddingNet(ModelArgs(num_classes=2, widths=(4, 8), depths=(1, 1), embedding_dim=8), pre).eval()
    assert model.embed(torch.rand(2, 3, 64, 64)).shape == (2, 8)


def test_bundle_round_trip_gives_identical_outputs(tmp_path):
    args = ModelArgs(num_classes=3, widths=(4, 8), depths=(1, 1), embedding_dim=8)
    model = EmbeddingNet(args, PRE).eval()
    bundle = TrainedModel(args, PRE, ["a", "b", "c"], model.state_dict(), {"epochs": 1})
    loaded = TrainedModel.load(bundle.save(tmp_path / "m"))
    x = torch.rand(2, 1, 28, 28)
    assert loaded.classes == ["a", "b", "c"] and loaded.preprocess == PRE and loaded.args == args
    assert torch.allclose(loaded.build().embed(x), model.embed(x))


@pytest.mark.parametrize("kwargs, message", [
    ({"widths": (8, 16), "depths": (1,)}, "equal length"),
    ({"head": "arc"}, "head must be"),
    ({"num_classes": 1}, "at least 2 classes"),
])
def test_bad_model_args_are_rejected(kwargs, message):
    with pytest.raises(ImgsimError, match=message):
        ModelArgs(**{"num_classes": 3, **kwargs})


def test_loading_a_folder_without_a_model_is_clear(tmp_path):
    with pytest.raises(ImgsimError, match="no usable imgsim model"):
        TrainedModel.load(tmp_path)

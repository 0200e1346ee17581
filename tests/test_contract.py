"""timm's model contract, exercised on a small instance of a registered variant."""
from __future__ import annotations

import pytest
import timm
import torch
from reference import randomize_batchnorm
from torch import nn

from convmixer_timm import VARIANTS

MODEL = "convmixer_256_8_ks9_p1"
KW = dict(dim=16, depth=4)


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return randomize_batchnorm(timm.create_model(MODEL, **KW)).eval()


@pytest.fixture()
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 16, 16)


def test_features_head_and_pre_logits(model, x):
    feats = model.forward_features(x)
    assert feats.shape == (2, 16, 16, 16)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, model.num_features) and model.num_features == model.head_hidden_size == 16
    torch.testing.assert_close(model.forward_head(feats), model.get_classifier()(pre))
    torch.testing.assert_close(model(x), model.forward_head(feats))


def test_forward_intermediates(model, x):
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 4 and all(t.shape == (2, 16, 16, 16) for t in inter)
    torch.testing.assert_close(final, model.forward_features(x))
    only = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    torch.testing.assert_close(only[0], inter[0])
    torch.testing.assert_close(only[1], inter[2])
    last2 = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
    torch.testing.assert_close(last2[-1], inter[-1])
    early_final, early = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert len(early) == 1
    torch.testing.assert_close(early_final, inter[1])
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_prune_intermediate_layers(model, x):
    _, inter = model.forward_intermediates(x)
    kept = model.prune_intermediate_layers([1])
    assert kept == [1] and len(model.blocks) == 2
    assert isinstance(model.head, nn.Identity)
    torch.testing.assert_close(model.forward_features(x), inter[1])


def test_reset_classifier_and_group_matcher(model, x):
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.num_classes == 7
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 16, 16, 16)
    model.reset_classifier(3, "catavgmax")
    assert model.head_hidden_size == 32 and model(x).shape == (2, 3)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) == 1 + 4 + 1  # stem, each block, head


def test_grad_checkpointing_gives_same_outputs_and_grads(x):
    torch.manual_seed(0)
    a = timm.create_model(MODEL, **KW)
    b = timm.create_model(MODEL, **KW)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    assert b.grad_checkpointing
    for m in (a, b):
        m.train()
        m(x).square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_features_only_with_out_indices(x):
    model = timm.create_model(MODEL, features_only=True, out_indices=(0, 3), **KW)
    outs = model(x)
    assert [o.shape for o in outs] == [(2, 16, 16, 16)] * 2
    assert model.feature_info.channels() == [16, 16]
    assert model.feature_info.reduction() == [1, 1]
    default = timm.create_model("convmixer_768_32", features_only=True, dim=8, depth=5)
    assert len(default(torch.randn(1, 3, 28, 28))) == 3  # the last 3 blocks, like timm's built-in


def test_device_and_dtype_arguments(x):
    model = timm.create_model(MODEL, dtype=torch.float64, device="cpu", **KW)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(x.double()).dtype == torch.float64
    meta = timm.create_model("convmixer_1536_20", device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_torchscript(model, x):
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))
    torch.testing.assert_close(scripted.forward_features(x), model.forward_features(x))


@pytest.mark.slow
def test_torch_compile_full_graph(model, x):
    # aot_eager traces through dynamo and AOTAutograd (graph breaks fail with fullgraph) without a C++ build.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


def test_module_bucket_is_timms_convmixer():
    """Deliberate: the whole family lives in timm's 'convmixer' bucket, replacing timm's three entries."""
    assert set(timm.list_models(module="convmixer")) == {v.name for v in VARIANTS}

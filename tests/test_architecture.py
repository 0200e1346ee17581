"""The architecture is the paper's and timm's: same keys, same outputs, exact parameter counts, every variant.

Tolerances: outputs of identical float32 computations are compared with ``atol=1e-5 * scale`` where scale is
the reference logits' max magnitude (the plugin runs the same ops in the same order, so the observed difference
is 0; the margin allows other oneDNN kernels); float64 comparisons use 1e-10.
"""
from __future__ import annotations

import pytest
import timm
import torch
from reference import paper_convmixer, randomize_batchnorm
from timm.models.convmixer import ConvMixer as TimmConvMixer
from torch import nn

from convmixer_timm import VARIANTS, ConvMixer, get_variant

TIMM_BUILTIN_NAMES = ["convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20_ks9_p14"]


def assert_close_to(reference: torch.Tensor, actual: torch.Tensor, rel: float = 1e-5) -> None:
    scale = reference.abs().max().item()
    torch.testing.assert_close(actual, reference, rtol=0, atol=rel * max(scale, 1e-6))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_parameter_count_matches_paper_formula(variant):
    model = timm.create_model(variant.name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == variant.param_count()
    model = timm.create_model(variant.name, device="meta", num_classes=7, in_chans=1)
    assert sum(p.numel() for p in model.parameters()) == variant.param_count(in_chans=1, num_classes=7)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_pretrained_cfg_and_architecture_follow_the_table(variant):
    model = timm.create_model(variant.name, device="meta")
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == variant.num_classes == model.num_classes
    assert cfg["input_size"] == (3, variant.img_size, variant.img_size)
    assert (model.num_features, len(model.blocks), model.kernel_size, model.patch_size) == (
        variant.h, variant.d, variant.k, variant.p)
    assert model.act_name == variant.act
    assert model.blocks[0][1].kernel_size == (1, 1)
    assert model.blocks[0][0].fn[0].kernel_size == (variant.k, variant.k)
    assert model.blocks[0][0].fn[0].groups == variant.h
    # A config claims weights only where weights exist.
    assert bool(cfg.get("hf_hub_id")) == (variant.weights_tag is not None)
    if variant.weights_tag:
        assert cfg["hf_hub_id"] == f"timm/{variant.name}.{variant.weights_tag}"
        assert f"{variant.name}.{variant.weights_tag}" in timm.list_pretrained(variant.name + "*")


@pytest.mark.parametrize("name", TIMM_BUILTIN_NAMES)
@pytest.mark.slow
def test_full_size_parity_with_timm_builtin(name):
    """The published timm weights load unchanged: same keys and shapes, same outputs (at 112 px, a quarter of the
    cost of 224; the weights do not depend on the image size)."""
    torch.manual_seed(0)
    ours = randomize_batchnorm(timm.create_model(name)).eval()
    v = get_variant(name)
    act = nn.ReLU if v.act == "relu" else nn.GELU
    builtin = TimmConvMixer(v.h, v.d, v.k, v.p, act_layer=act).eval()
    theirs_sd, ours_sd = builtin.state_dict(), ours.state_dict()
    assert list(theirs_sd) == list(ours_sd)
    assert all(theirs_sd[k].shape == ours_sd[k].shape for k in ours_sd)
    builtin.load_state_dict(ours_sd)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert_close_to(builtin(x), ours(x))


@pytest.mark.parametrize("k", [3, 5, 8, 9])
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_small_parity_with_paper_code_and_timm_in_float64(k, act):
    """The from-the-paper listing and timm's built-in, train and eval, odd and even kernels, 1e-10 in float64."""
    torch.manual_seed(k)
    act_cls = nn.ReLU if act == "relu" else nn.GELU
    ours = ConvMixer(24, 3, kernel_size=k, patch_size=3, num_classes=5, act_layer=act, dtype=torch.float64)
    paper = paper_convmixer(24, 3, k, 3, 5, act=act_cls).double()
    builtin = TimmConvMixer(24, 3, k, 3, num_classes=5, act_layer=act_cls).double()
    randomize_batchnorm(ours)
    paper.load_state_dict(_timm_to_original(ours.state_dict(), depth=3))
    builtin.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 31, 31, dtype=torch.float64)  # 31 // 3 = 10: the grid floors like the stem conv
    for mode in ("eval", "train"):
        for m in (ours, paper, builtin):
            m.train(mode == "train")
        out = ours(x)
        assert out.shape == (2, 5)
        torch.testing.assert_close(out, paper(x), rtol=0, atol=1e-10)
        torch.testing.assert_close(out, builtin(x), rtol=0, atol=1e-10)


def _timm_to_original(state_dict, depth):
    out = {}
    for key, value in state_dict.items():
        if key.startswith("stem."):
            out[key[len("stem."):]] = value
        elif key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            out[f"{int(i) + 3}.{rest}"] = value
        else:
            out[f"{depth + 5}.{key[len('head.'):]}"] = value
    return out


@pytest.mark.parametrize("k", [2, 4, 8])
def test_even_kernel_keeps_grid_like_padding_same(k):
    model = ConvMixer(8, 1, kernel_size=k, patch_size=2, num_classes=0, global_pool="").eval()
    x = torch.randn(1, 3, 14, 14)
    assert model(x).shape == (1, 8, 7, 7)
    conv = model.blocks[0][0].fn[0]
    reference = nn.functional.conv2d(torch.ones(1, 8, 7, 7), conv.weight, conv.bias, padding="same", groups=8)
    torch.testing.assert_close(conv(torch.ones(1, 8, 7, 7)), reference)


def test_drop_path_is_stochastic_depth_on_the_residual_branch():
    torch.manual_seed(0)
    model = timm.create_model("convmixer_256_8_ks5_p2", dim=16, depth=4, drop_path_rate=0.5)
    rates = [b[0].drop_path.drop_prob if hasattr(b[0].drop_path, "drop_prob") else 0.0 for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5])
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))  # a different branch is dropped each call
    model.eval()
    assert torch.equal(model(x), model(x))
    with pytest.raises(ValueError, match="drop_path_rate"):
        ConvMixer(8, 2, drop_path_rate=1.5)


def test_activation_by_name_and_every_argument_is_json_serialisable(tmp_path):
    import json

    from timm.models import save_for_hf

    model = timm.create_model("convmixer_256_8_ks5_p2", dim=16, depth=2, act_layer="relu")
    assert isinstance(model.blocks[0][2], nn.ReLU)
    model_args = dict(dim=16, depth=2, act_layer="relu", drop_path_rate=0.1)
    save_for_hf(model, tmp_path, model_args=model_args)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_args"].items() >= model_args.items()
    reloaded = timm.create_model(f"local-dir:{tmp_path}")
    assert isinstance(reloaded.blocks[0][2], nn.ReLU)
    with pytest.raises(ValueError, match="unknown activation 'no_such_activation'"):
        ConvMixer(8, 2, act_layer="no_such_activation")


def test_wrong_input_channels_name_the_expected_number():
    model = timm.create_model("convmixer_256_8_ks5_p2", dim=8, depth=1)
    with pytest.raises(RuntimeError, match=r"expects images of shape \(N, 3, H, W\).*in_chans=1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expects images .*x.unsqueeze\(0\)"):
        model(torch.randn(3, 32, 32))
    gray = timm.create_model("convmixer_256_8_ks5_p2", dim=8, depth=1, in_chans=1)
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 10)

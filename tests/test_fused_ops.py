"""The fused training path equals the module path: outputs, gradients, running statistics.

Reference: timm's built-in ``ConvMixer`` with the same weights (its blocks are plain modules). Float32 tolerances
are relative to the largest reference magnitude (1e-4, the project's exactness bar); gradcheck runs in float64.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import randomize_batchnorm
from timm.models.convmixer import ConvMixer as TimmConvMixer
from torch import nn
from torch.func import functional_call

from convmixer_timm import ConvMixer
from convmixer_timm.models._fused import ActBatchNormResidual, fused_block_forward, fused_block_supported

CASES = [(5, "gelu"), (8, "gelu"), (3, "relu"), (4, "relu")]


def _pair(k: int, act: str, dim: int = 16, depth: int = 2, patch: int = 2):
    torch.manual_seed(0)
    timm_act = nn.GELU if act == "gelu" else nn.ReLU
    ref = randomize_batchnorm(TimmConvMixer(dim, depth, k, patch, num_classes=10, act_layer=timm_act))
    ours = ConvMixer(dim, depth, k, patch, num_classes=10, act_layer=act)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(("k", "act"), CASES)
def test_training_step_matches_timm(k, act, channels_last):
    ref, ours = _pair(k, act)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref, ours = ref.to(memory_format=fmt).train(), ours.to(memory_format=fmt).train()
    assert all(fused_block_supported(b) for b in ours.blocks)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=fmt)
    target = torch.randint(0, 10, (4,))
    outs = []
    for model in (ref, ours):
        logits = model(x)
        F.cross_entropy(logits, target).backward()
        outs.append(logits)
    assert _rel(outs[0], outs[1]) < 1e-4
    for (name, p_ref), p_ours in zip(ref.named_parameters(), ours.parameters(), strict=True):
        assert _rel(p_ref.grad, p_ours.grad) < 1e-4, name
    for (name, b_ref), b_ours in zip(ref.named_buffers(), ours.buffers(), strict=True):
        torch.testing.assert_close(b_ours, b_ref, rtol=1e-5, atol=1e-6, msg=name)


def test_eval_and_unsupported_blocks_use_the_module_path():
    _, ours = _pair(5, "gelu")
    ours.eval()
    assert not any(fused_block_supported(b) for b in ours.blocks)
    silu = ConvMixer(8, 1, 3, 2, num_classes=4, act_layer="silu").train()
    assert not fused_block_supported(silu.blocks[0])
    dropped = ConvMixer(8, 2, 3, 2, num_classes=4, drop_path_rate=0.5).train()
    assert not fused_block_supported(dropped.blocks[1])


def test_momentum_none_is_a_cumulative_average():
    _, ours = _pair(3, "gelu", depth=1)
    for m in ours.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    ref = copy.deepcopy(ours).train()
    ours.train()
    x = torch.randn(3, 3, 8, 8)
    for _ in range(2):
        ours(x)
        h = ref.stem(x)
        for module in ref.blocks[0]:  # the plain modules, bypassing the block's fused forward
            h = module(h)
    for b_ref, b_ours in zip(ref.blocks.buffers(), ours.blocks.buffers(), strict=True):
        torch.testing.assert_close(b_ours, b_ref)


@pytest.mark.parametrize(("k", "act"), [(3, "gelu"), (4, "relu")])
def test_gradcheck_fused_block_float64(k, act):
    _, model = _pair(k, act, dim=3, depth=1)
    block = model.blocks[0].double().train()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in block.named_parameters()}
    names = list(params)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return functional_call(block, dict(zip(names, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params.values()), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_function_and_block_match_the_modules():
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    b = torch.randn(3, dtype=torch.float64)
    z, shift = ActBatchNormResidual.apply(a, x, w, b, None, None, 0.0, 1e-5, "gelu")
    assert not shift.requires_grad
    expected = x + F.batch_norm(F.gelu(a), None, None, w, b, training=True, eps=1e-5)
    torch.testing.assert_close(z + shift.view(1, -1, 1, 1), expected)
    # The fused block is the module block, ReLU too.
    _, model = _pair(4, "relu", dim=6, depth=1)
    block = model.blocks[0].train()
    h = torch.randn(2, 6, 7, 7)
    ref_block = copy.deepcopy(block)
    expected = h
    for module in ref_block:
        expected = module(expected)
    torch.testing.assert_close(fused_block_forward(block, h), expected, rtol=1e-5, atol=1e-5)

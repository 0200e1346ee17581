"""timm's train.py flags: ``--bn-momentum``/``--bn-eps`` are honoured, and ``--grad-checkpointing`` trains as
training without it does, BatchNorm running statistics included.

train.py passes ``bn_momentum=args.bn_momentum, bn_eps=args.bn_eps`` to ``timm.create_model``, which drops the
None ones (flags not given). ``--grad-checkpointing`` calls ``model.set_grad_checkpointing(True)``: timm's
``checkpoint_seq`` / ``checkpoint`` (``torch.utils.checkpoint``, non-reentrant unless ``TIMM_REENTRANT_CKPT`` or
``timm.layers.set_reentrant_ckpt`` asks for reentrant) run each block again during backward.

Tolerances: float64 runs compare to 1e-9 relative (plus 1e-12 absolute for values near zero). The runs compute
the same quantities in different but exact summation orders: reentrant checkpointing runs its first forward
without autograd, so PyTorch's BatchNorm computes the statistics the kernels compute in the run without
checkpointing. float32 runs (the fused inference model) compare to 1e-4, the project's exactness bar.
``num_batches_tracked`` is an integer count and must be equal.
"""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from dispatched import OurOperatorCalls
from reference import randomize_batchnorm
from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt
from timm.models.convmixer import ConvMixer as TimmConvMixer
from torch import nn

from convmixer_timm import ConvMixer, speed
from convmixer_timm.hub import load_hub_folder, save_hub_folder
from convmixer_timm.speed import FusedConvMixerInference

SMALL = dict(dim=8, depth=2, kernel_size=3, patch_size=2, num_classes=5)
F64 = dict(rtol=1e-9, atol=1e-12)


@pytest.fixture(params=[False, True], ids=["non-reentrant", "reentrant"])
def reentrant(request):
    saved = use_reentrant_ckpt()
    set_reentrant_ckpt(request.param)
    yield request.param
    set_reentrant_ckpt(saved)


def _norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _images(batch: int = 4, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=dtype)


# -- --bn-momentum / --bn-eps -------------------------------------------------------------------------------------

def test_create_model_sets_every_batchnorm_as_train_py_asks():
    model = timm.create_model("convmixer_768_32", bn_momentum=0.01, bn_eps=1e-3, **SMALL)
    assert type(model) is ConvMixer
    norms = _norms(model)
    assert len(norms) == 1 + 2 * SMALL["depth"]
    assert {(m.momentum, m.eps) for m in norms} == {(0.01, 1e-3)}


def test_flags_not_given_keep_pytorch_defaults():
    # train.py without the flags passes bn_momentum=None, bn_eps=None; create_model drops them.
    for model in (timm.create_model("convmixer_768_32", bn_momentum=None, bn_eps=None, **SMALL),
                  ConvMixer(**SMALL, bn_momentum=None, bn_eps=None)):
        assert {(m.momentum, m.eps) for m in _norms(model)} == {(0.1, 1e-5)}


@pytest.mark.parametrize("arg, value", [
    ("bn_momentum", 1.5), ("bn_momentum", -0.1), ("bn_momentum", float("nan")), ("bn_momentum", "0.1"),
    ("bn_momentum", True), ("bn_eps", 0.0), ("bn_eps", -1e-5), ("bn_eps", float("inf")), ("bn_eps", "1e-3"),
])
def test_bad_batchnorm_values_are_refused_naming_the_argument(arg, value):
    with pytest.raises(ValueError, match=f"{arg} must be"):
        ConvMixer(**SMALL, **{arg: value})


def test_training_step_uses_the_momentum_and_eps(kernels):
    """One training step against timm's built-in whose BatchNorms were given the same momentum and eps: same
    output, gradients and running statistics, on the kernels and on PyTorch's ops."""
    torch.manual_seed(0)
    ref = TimmConvMixer(8, 2, 3, 2, num_classes=5, act_layer=nn.GELU).double().train()
    for m in _norms(ref):
        m.momentum, m.eps = 0.3, 0.5  # far from the defaults, so using those instead could not pass
    ours = ConvMixer(**SMALL, bn_momentum=0.3, bn_eps=0.5).double().train()
    ours.load_state_dict(ref.state_dict())
    x = _images()
    with OurOperatorCalls() as seen:
        out = ours(x)
        out.square().sum().backward()
    expected = ref(x)
    expected.square().sum().backward()
    assert ("act_batch_norm_train" in seen.called) == (kernels == "kernels")
    torch.testing.assert_close(out, expected, **F64)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, **F64, msg=name)
    for (name, a), b in zip(ours.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(a, b, **F64, msg=name)


def test_eval_and_fused_inference_use_the_eps():
    torch.manual_seed(0)
    model = ConvMixer(**SMALL, bn_eps=1e-3).eval()
    randomize_batchnorm(model)
    with torch.no_grad():
        for m in _norms(model):
            m.running_var.mul_(1e-3)  # variances near eps, so eps changes the outputs
    default_eps = ConvMixer(**SMALL).eval()
    default_eps.load_state_dict(model.state_dict())
    x = _images(dtype=torch.float32)
    with torch.inference_mode():
        expected = model(x)
        assert not torch.allclose(default_eps(x), expected, rtol=1e-2)
        for depthwise in ("onednn",) + (("kernel",) if speed.load() is not None else ()):
            fused = FusedConvMixerInference(model, depthwise=depthwise)
            torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_hub_folder_keeps_the_batchnorm_values(tmp_path):
    model = ConvMixer(**SMALL, bn_momentum=0.01, bn_eps=1e-3).eval()
    randomize_batchnorm(model)
    folder = save_hub_folder(model, tmp_path / "bn", "convmixer_768_32", dataset="random")
    model_args = json.loads((folder / "config.json").read_text())["model_args"]
    assert (model_args["bn_momentum"], model_args["bn_eps"]) == (0.01, 1e-3)
    loaded = load_hub_folder(folder)
    assert {(m.momentum, m.eps) for m in _norms(loaded)} == {(0.01, 1e-3)}
    x = _images(dtype=torch.float32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    plain = save_hub_folder(ConvMixer(**SMALL), tmp_path / "plain", "convmixer_768_32", dataset="random")
    plain_args = json.loads((plain / "config.json").read_text()).get("model_args", {})
    assert "bn_momentum" not in plain_args and "bn_eps" not in plain_args


# -- --grad-checkpointing -----------------------------------------------------------------------------------------

def _loss_of_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), torch.arange(x.shape[0]) % SMALL["num_classes"])


def _loss_of_forward_intermediates(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    final, intermediates = model.forward_intermediates(x)
    return model.forward_head(final).square().mean() + sum(t.square().mean() for t in intermediates)


def _train(model: nn.Module, loss_of, checkpointing: bool, steps: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` SGD steps on fixed images; after each, every gradient and BatchNorm buffer, by name."""
    model.set_grad_checkpointing(checkpointing)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = _images(dtype=next(model.parameters()).dtype)
    states = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(model, x).backward()
        state = {f"{name}.grad": p.grad.clone() for name, p in model.named_parameters()}
        state.update({name: b.clone() for name, b in model.named_buffers()})
        states.append(state)
        optimizer.step()
    return states


@pytest.mark.parametrize("loss_of", [_loss_of_forward, _loss_of_forward_intermediates],
                         ids=["forward", "forward_intermediates"])
def test_grad_checkpointing_updates_running_stats_once_per_step(kernels, reentrant, loss_of):
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvMixer(**SMALL)).double().train()
    plain = _train(copy.deepcopy(model), loss_of, checkpointing=False, steps=2)
    with OurOperatorCalls() as seen:
        checkpointed = _train(copy.deepcopy(model), loss_of, checkpointing=True, steps=2)
    # The kernels really ran in the checkpointed run (its recomputation), and really did not without them.
    assert ("act_batch_norm_train" in seen.called) == (kernels == "kernels")
    for step, (expected, actual) in enumerate(zip(plain, checkpointed, strict=True), 1):
        assert expected.keys() == actual.keys()
        for name, value in expected.items():
            if name.endswith("num_batches_tracked"):
                assert int(actual[name]) == int(value) == step, name
            else:
                torch.testing.assert_close(actual[name], value, **F64, msg=f"step {step}: {name}")


@pytest.mark.slow
def test_compiled_training_with_grad_checkpointing_updates_running_stats_once(reentrant):
    """``torch.compile(fullgraph=True)`` traces the checkpointed blocks without a graph break; its graph updates
    each buffer in its forward only, as eager training without checkpointing does."""
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvMixer(**SMALL)).train()
    plain = _train(copy.deepcopy(model), _loss_of_forward, checkpointing=False, steps=1)[0]
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    torch._dynamo.reset()
    compiled = torch.compile(checkpointed, fullgraph=True)
    _loss_of_forward(compiled, _images(dtype=torch.float32)).backward()
    for name, value in checkpointed.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert int(value) == int(plain[name]) == 1, name
        else:
            torch.testing.assert_close(value, plain[name], rtol=1e-4, atol=1e-6, msg=name)
    for name, p in checkpointed.named_parameters():
        torch.testing.assert_close(p.grad, plain[f"{name}.grad"], rtol=1e-4, atol=1e-6, msg=name)

"""A true drop-in: wherever timm's built-in ConvMixer works, ours works the same.

Every test runs the same PyTorch tool on our model and on timm's built-in ``timm.models.convmixer.ConvMixer``
holding the same weights: wherever timm's built-in works, ours must work and give the same result; only where
timm's raises may ours raise, with exactly the same exception type. For an odd and an even kernel, with the compiled
kernels on and off where they could take part. Tolerances: float64 runs agree to 1e-9 of each tensor's largest
magnitude (different but exact summation orders); float32 runs, compiled graphs included, to 1e-4 (the project's
exactness bar, see tests/test_training.py); on top of that, rounding noise of 512 ulps of the result's largest
magnitude (entries that are zero in exact arithmetic).

Also here: the process keeps the user's allocator settings. Registration in every import order is in
tests/test_registration.py.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reference import randomize_batchnorm
from timm.models.convmixer import ConvMixer as TimmConvMixer
from torch import nn
from torch.utils._pytree import tree_flatten

from convmixer_timm import CheckpointError, ConvMixer, restore_cpu_allocator, speed
from convmixer_timm.speed import allocator_tuned

ROOT = Path(__file__).resolve().parents[1]
needs_kernels = pytest.mark.skipif(speed.load() is None, reason="kernels not built: only the fallback can run")


def _pair(k: int, dtype: torch.dtype = torch.float64, dim: int = 8, depth: int = 2) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(k)
    ref = randomize_batchnorm(TimmConvMixer(dim, depth, k, 2, num_classes=5, act_layer=nn.GELU)).to(dtype)
    ours = ConvMixer(dim, depth, k, 2, num_classes=5, act_layer="gelu").to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _images(dtype: torch.dtype = torch.float64, channels_last: bool = False, batch: int = 4) -> torch.Tensor:
    x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _layout(t: torch.Tensor) -> tuple[bool, bool]:
    return t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last)


# An entry that is zero in exact arithmetic (the gradient of a weight just before a training BatchNorm) is rounding
# noise in both runs: it is judged against what the dtype resolves, a few hundred ulps of the largest magnitude in
# the whole result (the size of the terms its sums add up), never relative to itself.
NOISE_ULPS = 512


def same_result_or_same_failure(run: Callable[[nn.Module], object], ref: nn.Module, ours: nn.Module,
                                rtol: float = 1e-9, layouts: bool = False) -> object:
    """``run`` on both models. Where timm's built-in works, ours must work and give the same tensors (and memory
    formats), within ``rtol`` of each tensor's largest magnitude plus rounding noise; only where timm's raises may
    ours raise, and then exactly the same exception type."""
    try:
        expected = run(ref)
    except Exception as ref_error:
        try:
            run(ours)
        except Exception as our_error:
            assert type(our_error) is type(ref_error), (ref_error, our_error)
            return None
        pytest.fail(f"timm's built-in raised {type(ref_error).__name__}: {ref_error}; ours did not")
    result = run(ours)  # timm's built-in works here: an error of ours fails the test with its own traceback
    ref_leaves, _ = tree_flatten(expected)
    our_leaves, _ = tree_flatten(result)
    assert len(ref_leaves) == len(our_leaves)
    overall = max((a.detach().abs().max().item() for a in ref_leaves
                   if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel()), default=0.0)
    for a, b in zip(ref_leaves, our_leaves, strict=True):
        if not isinstance(a, torch.Tensor):
            assert a == b
            continue
        assert a.shape == b.shape and a.dtype == b.dtype
        if layouts:
            assert _layout(a) == _layout(b), "memory format differs from timm's"
        if not a.is_floating_point():
            assert torch.equal(a, b)
            continue
        if not a.numel():
            continue
        bound = rtol * a.detach().abs().max().item() + NOISE_ULPS * torch.finfo(a.dtype).eps * overall
        error = (b.detach() - a.detach()).abs().max().item()
        assert error <= bound, f"differs from timm's by {error:.3g}, more than {bound:.3g}"
    return result


# -- forward, memory formats, errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("k", [5, 8])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_outputs_keep_the_callers_memory_format(k, mode, channels_last):
    ref, ours = _pair(k)
    x = _images(channels_last=channels_last)

    def run(model):
        model.train(mode == "train")
        features = model.forward_features(x)
        return features, model.forward_head(features), model(x), model.forward_intermediates(x, indices=2)

    same_result_or_same_failure(run, ref, ours, layouts=True)
    final, intermediates = ours.train(mode == "train").forward_intermediates(x)
    expected = (False, True) if channels_last else (True, False)
    assert all(_layout(t) == expected for t in (final, *intermediates))


@pytest.mark.parametrize("bad", [(2, 1, 16, 16), (3, 16, 16), (1, 2, 3, 16, 16)], ids=["channels", "3d", "5d"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bad_input_raises_the_same_error_type(bad, mode):
    ref, ours = _pair(5)
    x = torch.randn(*bad, dtype=torch.float64)
    same_result_or_same_failure(lambda model: model.train(mode == "train")(x), ref, ours)


def test_a_checkpoint_of_another_shape_is_a_runtime_error():
    ref, ours = _pair(5)
    other = TimmConvMixer(8, 2, 7, 2, num_classes=5).state_dict()
    with pytest.raises(RuntimeError) as timm_error:
        ref.load_state_dict(other)
    assert type(timm_error.value) is RuntimeError
    # Ours raises CheckpointError, a RuntimeError (and a ValueError) naming the fix: every `except RuntimeError`
    # written for timm's built-in catches it. The one deliberate subclass, so it is asserted here by name.
    with pytest.raises(CheckpointError, match="checkpoint shapes do not fit this model") as our_error:
        ours.load_state_dict(other)
    assert isinstance(our_error.value, RuntimeError)


# -- autograd: double backward, torch.func, gradgradcheck ---------------------------------------------------------

@pytest.mark.parametrize("k", [5, 8])
def test_double_backward_gradient_penalty(k, kernels):
    ref, ours = _pair(k)
    x = _images()

    def run(model):
        model.train().zero_grad()
        images = x.clone().requires_grad_()
        loss = model(images).logsumexp(1).sum()
        (grad,) = torch.autograd.grad(loss, images, create_graph=True)
        (loss + grad.pow(2).sum()).backward()
        return [p.grad for p in model.parameters()]

    same_result_or_same_failure(run, ref, ours)


@pytest.mark.parametrize("k", [5, 8])
@pytest.mark.parametrize("transform", ["grad", "jacrev", "vmap_grad", "jvp"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_func_transforms(k, transform, mode, kernels):
    from torch.func import functional_call, grad, jacrev, jvp, replace_all_batch_norm_modules_, vmap

    ref, ours = (copy.deepcopy(m) for m in _pair(k))
    x = _images()

    def run(model):
        model.train(mode == "train")
        if mode == "train":  # torch.func's documented way to train BatchNorm without running statistics
            replace_all_batch_norm_modules_(model)
        params = {name: p.detach() for name, p in model.named_parameters()}
        if transform == "grad":
            return grad(lambda p: functional_call(model, p, (x,)).sum())(params)
        if transform == "jacrev":
            return jacrev(lambda images: model(images)[0])(x[:2])
        if transform == "jvp":
            return jvp(lambda images: model(images), (x,), (torch.ones_like(x),))
        per_sample = vmap(grad(lambda p, image: functional_call(model, p, (image[None],)).sum()), in_dims=(None, 0))
        return per_sample(params, x)

    same_result_or_same_failure(run, ref, ours)


@pytest.mark.parametrize("k", [5, 8])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_mode_ad(k, mode, kernels):
    from torch.autograd import forward_ad

    ref, ours = _pair(k)
    x = _images()

    def run(model):
        model.train(mode == "train")
        with forward_ad.dual_level():
            out = model(forward_ad.make_dual(x, torch.ones_like(x)))
            return forward_ad.unpack_dual(out).primal, forward_ad.unpack_dual(out).tangent

    same_result_or_same_failure(run, ref, ours)


def test_gradgradcheck_float64_through_the_model(kernels):
    _, ours = _pair(4, dim=3, depth=1)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda images: ours.train()(images), (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda images: ours.train().blocks(images), (torch.randn(
        2, 3, 3, 3, dtype=torch.float64, requires_grad=True),), fast_mode=True)


# -- FX: symbolic_trace, torchvision's and timm's feature extractors ----------------------------------------------

@pytest.mark.parametrize("k", [5, 8])
@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_fx_symbolic_trace_runs_like_the_module_in_both_modes(k, traced_in):
    ref, ours = _pair(k)
    x = _images()

    def run(model):
        graph = torch.fx.symbolic_trace(model.train(traced_in == "train"))
        # A traced graph follows .train()/.eval() afterwards, as timm's (whose BatchNorms are leaf modules) does.
        return graph.train()(x), graph.eval()(x), graph.eval()(x.contiguous(memory_format=torch.channels_last))

    same_result_or_same_failure(run, ref, ours, layouts=True)


@pytest.mark.parametrize("k", [5, 8])
def test_torchvision_feature_extractor(k):
    from torchvision.models.feature_extraction import create_feature_extractor

    ref, ours = _pair(k)
    x = _images()

    def run(model):
        extractor = create_feature_extractor(model, return_nodes={"blocks.0": "first", "blocks.1": "last"})
        return extractor.train()(x), extractor.eval()(x)

    same_result_or_same_failure(run, ref, ours, layouts=True)


@pytest.mark.parametrize("k", [5, 8])
def test_timm_fx_feature_extractor(k):
    from timm.models._features_fx import FeatureGraphNet

    ref, ours = _pair(k)
    x = _images()
    for model in (ref, ours):
        model.feature_info = [dict(num_chs=8, reduction=2, module=f"blocks.{i}") for i in range(2)]

    def run(model):
        net = FeatureGraphNet(model, out_indices=(0, 1))
        return net.eval()(x), net.train()(x)

    same_result_or_same_failure(run, ref, ours, layouts=True)


# -- torch.compile, torch.export, TorchScript -------------------------------------------------------------------

def _graphs_and_breaks(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    return explanation.graph_count, explanation.graph_break_count


@pytest.mark.parametrize("k", [8])  # the even kernel: its crop is the one step odd kernels skip
@pytest.mark.slow
def test_torch_compile_fullgraph_training_step(k):
    ref, ours = _pair(k, torch.float32)
    x, target = _images(torch.float32), torch.arange(4) % 5

    def run(model):
        torch._dynamo.reset()
        model.train().zero_grad()
        compiled = torch.compile(model, fullgraph=True)
        loss = nn.functional.cross_entropy(compiled(x), target)
        loss.backward()
        buffers = [b.float() for b in model.buffers()]
        return loss, [p.grad for p in model.parameters()], buffers

    same_result_or_same_failure(run, ref, ours, rtol=1e-4)
    assert _graphs_and_breaks(ours.train(), x) == _graphs_and_breaks(ref.train(), x) == (1, 0)


@needs_kernels
@pytest.mark.slow  # an inductor compile
def test_compiled_training_graph_keeps_the_kernels_as_operators_and_the_allocator_alone(monkeypatch):
    _, ours = _pair(5, torch.float32)
    x = _images(torch.float32)
    # Asked for, the allocator setting still belongs to eager training only: never inside a compiled region.
    monkeypatch.setenv("CONVMIXER_TIMM_TUNE_MALLOC", "1")
    restore_cpu_allocator()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(ours.train(), fullgraph=True)
        compiled(x).sum().backward()
        with torch.profiler.profile() as profile:
            compiled(x).sum().backward()
        assert not allocator_tuned()
    finally:
        restore_cpu_allocator()
    ran = {event.name for event in profile.events()}
    assert {"convmixer_timm::act_batch_norm_train", "convmixer_timm::act_batch_norm_train_backward",
            "convmixer_timm::depthwise_conv_same",
            "convmixer_timm::depthwise_weight_grad"} <= ran


@pytest.mark.parametrize(("k", "channels_last"), [(8, False), (5, True)], ids=["nchw-8", "channels_last-5"])
@pytest.mark.slow
def test_torch_compile_fullgraph_eval(k, channels_last):
    ref, ours = _pair(k, torch.float32)
    x = _images(torch.float32, channels_last)

    def run(model):
        torch._dynamo.reset()
        return torch.compile(model.eval(), fullgraph=True)(x)

    same_result_or_same_failure(run, ref, ours, rtol=1e-4)
    assert _graphs_and_breaks(ours.eval(), x) == _graphs_and_breaks(ref.eval(), x)


@pytest.mark.parametrize("k", [5, 8])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_export(k, mode):
    ref, ours = _pair(k)
    x = _images()

    def run(model):
        model.train(mode == "train")
        program = torch.export.export(model, (x,))
        assert not any("convmixer_timm" in str(node.target) for node in program.graph.nodes)  # portable aten ops
        return program.module()(x)

    same_result_or_same_failure(run, ref, ours)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torchscript_and_jit_trace(mode):
    ref, ours = _pair(8)
    x = _images()

    def run(model):
        model.train(mode == "train")
        return torch.jit.script(model)(x), torch.jit.trace(model, (x,), check_trace=False)(x)

    same_result_or_same_failure(run, ref, ours)


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-W", "error::UserWarning:convmixer_timm", "-c", code],
                          capture_output=True, text=True, env=full_env, timeout=300, cwd=ROOT)


# -- the process as the user set it --------------------------------------------------------------------------------

_TRAIN_AND_REPORT = """
import timm, torch
from convmixer_timm.speed import allocator_tuned
model = timm.create_model("convmixer_256_8_ks5_p2", dim=8, depth=1)
model(torch.randn(4, 3, 16, 16)).sum().backward()
print("eager", allocator_tuned())
"""


@pytest.mark.slow
def test_an_allocator_setting_glibc_read_at_start_is_left_alone():
    # A real glibc variable, read when the process starts: asked for (CONVMIXER_TIMM_TUNE_MALLOC=1), training
    # still leaves the user's setting (test_speed_layer.py proves that without one it is applied).
    result = _python(_TRAIN_AND_REPORT, env={"CONVMIXER_TIMM_TUNE_MALLOC": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "eager False" in result.stdout


@pytest.mark.parametrize("setting", [{"MALLOC_TOP_PAD_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},
                                     {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}],
                         ids=["top-pad", "glibc-tunables", "jemalloc-preloaded"])
def test_every_allocator_setting_of_the_user_keeps_training_from_tuning(setting, monkeypatch):
    monkeypatch.setenv("CONVMIXER_TIMM_TUNE_MALLOC", "1")
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    restore_cpu_allocator()
    try:
        model = ConvMixer(8, 1, 5, 2, num_classes=3)
        model.train()(torch.randn(4, 3, 16, 16)).sum().backward()
        assert not allocator_tuned()
    finally:
        restore_cpu_allocator()

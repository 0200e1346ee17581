"""The training step's reused buffers (``speed/buffers.py``): reused only when free, the same numbers as fresh
tensors, bounded by one step's needs, and given back when no model trains."""
import gc

import pytest
import torch
import torch.nn.functional as F
from dispatched import OurOperatorCalls

from convmixer_timm import ConvMixer, speed
from convmixer_timm.speed import buffers

needs_kernels = pytest.mark.skipif(speed.load() is None, reason="kernels not built")

# 2 MiB activations (8 x 64 x 32 x 32 float32): above the pool's lower bound, small enough for a quick test.
BATCH, WIDTH = 8, 64


def _model(seed: int = 0) -> ConvMixer:
    torch.manual_seed(seed)
    return ConvMixer(WIDTH, 2, 5, 1, num_classes=3, act_layer="gelu").train()


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 32, 32, generator=generator), torch.randint(0, 3, (BATCH,), generator=generator)


def _train(model: ConvMixer, steps: int, between=lambda: None) -> list:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _batch()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        between()
    return losses


@pytest.fixture(autouse=True)
def _empty_pool():
    gc.collect()  # models of earlier tests, which would keep the pool serving
    buffers.release_training_buffers()
    yield
    buffers.release_training_buffers()


@needs_kernels
def test_steps_reuse_the_first_steps_buffers_and_leave_held_tensors_alone():
    model = _model()
    x, _ = _batch()
    _train(model, 2)
    after_two = buffers.pooled_bytes()
    assert after_two >= 4 * BATCH * WIDTH * 32 * 32 * 4  # the step's full-size tensors came from the pool
    held = model.forward_features(x).detach()  # a pooled output the caller keeps across later steps
    copy = held.clone()
    _train(model, 3)
    assert torch.equal(held, copy)  # never handed out again while referenced
    del held
    _train(model, 2)
    # A steady state: later steps take nothing new beyond the tensor the caller held for a while.
    assert buffers.pooled_bytes() <= after_two + BATCH * WIDTH * 32 * 32 * 4


@needs_kernels
def test_pooled_steps_give_the_same_numbers_as_fresh_tensors(monkeypatch):
    pooled_model, fresh_model = _model(), _model()
    pooled = _train(pooled_model, 3)
    assert buffers.pooled_bytes() > 0
    buffers.release_training_buffers()
    monkeypatch.setattr(buffers, "POOLED_MIN_BYTES", 1 << 62)  # every tensor a fresh allocation
    fresh = _train(fresh_model, 3)
    assert buffers.pooled_bytes() == 0
    assert all(torch.equal(a, b) for a, b in zip(pooled, fresh, strict=True))
    for a, b in zip(pooled_model.state_dict().values(), fresh_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@needs_kernels
def test_the_pool_is_emptied_when_no_model_trains():
    model = _model()
    _train(model, 1)
    assert buffers.pooled_bytes() > 0
    model.eval()
    assert buffers.pooled_bytes() == 0
    model.train()
    _train(model, 1)
    assert buffers.pooled_bytes() > 0
    del model
    gc.collect()
    assert buffers.pooled_bytes() == 0


@needs_kernels
def test_one_of_two_models_leaving_training_keeps_the_pool_for_the_other():
    first, second = _model(0), _model(1)
    _train(first, 1)
    _train(second, 1)
    first.eval()
    assert buffers.pooled_bytes() > 0
    second.eval()
    assert buffers.pooled_bytes() == 0


def test_outputs_follow_the_input_outside_training():
    # No model holds the pool: a plain allocation, channels_last, with the input's dtype and device.
    like = torch.empty(2, 3, 4, 5, dtype=torch.float64)
    with torch.device("meta"):
        out = buffers.empty_channels_last(like, (2, 7, 4, 5))
    assert out.device.type == "cpu" and out.dtype == torch.float64 and out.shape == (2, 7, 4, 5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert buffers.pooled_bytes() == 0


@needs_kernels
def test_large_pointwise_convolutions_train_as_matrix_products_with_the_same_gradients(monkeypatch):
    from convmixer_timm.speed import layers

    def gradients(min_bytes: int):
        monkeypatch.setattr(layers, "_POINTWISE_MIN_BYTES", min_bytes)
        model = _model()
        x, y = _batch()
        with OurOperatorCalls() as recorder:
            F.cross_entropy(model(x), y).backward()
        return recorder.called, [p.grad for p in model.parameters()]

    called_small, reference = gradients(1 << 62)  # every 1x1 convolution oneDNN's
    called_large, grads = gradients(0)
    assert "pointwise_conv" not in called_small
    # Only where BLAS runs the instruction set oneDNN does (not on AVX-512 CPUs, where MKL may run AVX2 code).
    assert ("pointwise_conv" in called_large) == layers._blas_matches_onednn()
    for got, want in zip(grads, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()))


@needs_kernels
def test_buffers_of_a_size_no_longer_used_are_dropped(monkeypatch):
    monkeypatch.setattr(buffers, "IDLE_REQUESTS", 8)
    model = _model()
    _train(model, 1)  # the pool holds buffers of this batch's size
    first_size = buffers.pooled_bytes()
    assert first_size > 0
    small = torch.empty(4, WIDTH, 32, 32)  # another batch size (1 MiB), as at the end of an epoch
    for _ in range(9):
        buffers.empty_channels_last(small)  # served by one buffer, again and again
    held = buffers.empty_channels_last(small)
    buffers.empty_channels_last(small)  # a request the pool cannot serve: idle buffers go first
    assert buffers.pooled_bytes() == 2 * small.numel() * 4
    del held


@needs_kernels
@pytest.mark.parametrize("kept", ["storage object", "shared memory"])
def test_a_buffer_still_reachable_is_never_handed_out_again(kept):
    model = _model()  # holds the pool while it trains
    _train(model, 1)
    like = torch.empty(BATCH, WIDTH, 32, 32)
    t = buffers.empty_channels_last(like)
    t.fill_(7.0)
    if kept == "storage object":
        reachable = t.untyped_storage()  # the pool's own storage object, kept by the caller
    else:
        t.share_memory_()  # as torch.multiprocessing does for a tensor sent to another process
        reachable = t.untyped_storage()._share_filename_cpu_()  # what the other process maps
    pointer = t.data_ptr()
    del t
    others = [buffers.empty_channels_last(like) for _ in range(4)]
    assert all(o.data_ptr() != pointer for o in others)
    del reachable

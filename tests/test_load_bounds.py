"""Which path carries which check when a checkpoint is loaded into a ConvMixer (that registration leaves timm's
attributes as they are is proven in tests/test_registration.py).

timm's loaders (``checkpoint_path=``, ``pretrained_cfg_overlay=dict(file=...)``, ``local-dir:``, ``hf-hub:``,
``load_checkpoint``, ``resume_checkpoint``) are never replaced: they read a file for a ConvMixer as for any timm
model. What the model itself adds on every path is its ``load_state_dict`` pre-hook: tensors that cannot stand for
the model's float weights (int, bool, complex) are refused, naming them, with the model untouched, and a checkpoint
of another shape is a ``RuntimeError`` naming the architecture. ``load_checkpoint_file`` and ``convert`` also bound
a zip's inflation before reading it (tests/test_convert_safety.py proves that, memory included).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from reference import randomize_batchnorm
from torch import nn

from convmixer_timm import load_checkpoint_file
from convmixer_timm.models.checkpoint import CheckpointError

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR = "convmixer_256_8_ks5_p2"
SMALL = dict(dim=32, depth=2)


def small_model(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(timm.create_model(CIFAR, **{**SMALL, **overrides}), seed).eval()


def deflated_copy(src: Path, dst: Path) -> Path:
    """The same torch.save checkpoint with its entries deflated: a valid file torch.load reads."""
    with zipfile.ZipFile(src) as plain, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as packed:
        for info in plain.infolist():
            packed.writestr(info.filename, plain.read(info))
    return dst


# ---------------------------------------------------------------------------------------------------- timm's loaders


def test_timm_loaders_read_a_convmixer_checkpoint_as_for_any_model(tmp_path):
    """A valid but highly compressed checkpoint: timm's loaders read it into a ConvMixer as into any model; our
    own reader keeps its inflation bound."""
    source = timm.create_model(CIFAR, dim=512, depth=2)
    with torch.no_grad():
        for tensor in source.state_dict().values():
            tensor.zero_()
    torch.save(source.state_dict(), tmp_path / "convmixer.pth")
    packed = deflated_copy(tmp_path / "convmixer.pth", tmp_path / "convmixer-deflated.pth")
    assert packed.stat().st_size * 100 < (tmp_path / "convmixer.pth").stat().st_size

    model = timm.create_model(CIFAR, dim=512, depth=2)
    timm.models.load_checkpoint(model, str(packed))
    expected = source.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())
    loaded = timm.create_model(CIFAR, dim=512, depth=2, checkpoint_path=str(packed))
    assert torch.equal(loaded.stem[0].weight, source.stem[0].weight)
    with pytest.raises(CheckpointError, match="would inflate to"):
        load_checkpoint_file(packed)


# ---------------------------------------------------------------------------------------------------- dtypes


def cast_floats(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v.clone() for k, v in state.items()}


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_weights_that_are_not_float_are_refused_on_every_path(tmp_path, dtype):
    source = small_model(1)
    state = cast_floats(source.state_dict(), dtype)
    kind = {torch.bool: "bool", torch.complex64: "complex"}.get(dtype, "integer")
    name = str(dtype).removeprefix("torch.")

    model = small_model(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        model.load_state_dict(state)
    message = str(info.value)
    assert "\n" not in message
    assert f"hold {kind} values where the model has floating-point ones" in message
    assert f"stem.0.weight ({name}, model float32)" in message and "(and " in message
    assert "No weights were changed" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    pth = tmp_path / "weights.pth"
    torch.save(state, pth)
    with pytest.raises(CheckpointError, match=f"hold {kind} values"):
        timm.create_model(CIFAR, checkpoint_path=str(pth), **SMALL)
    if dtype != torch.bool:  # safetensors holds any of these; bool weights are the pickle case above
        st = tmp_path / "weights.safetensors"
        safetensors.torch.save_file(state, st)
        with pytest.raises(CheckpointError, match=f"hold {kind} values"):
            timm.create_model(CIFAR, pretrained=True, pretrained_cfg_overlay=dict(file=str(st)), **SMALL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_float_weights_of_any_precision_still_load(dtype):
    source = small_model(3)
    state = cast_floats(source.state_dict(), dtype)
    assert state["blocks.0.3.num_batches_tracked"].dtype == torch.int64  # BatchNorm's counter stays an integer
    model = timm.create_model(CIFAR, **SMALL)
    model.load_state_dict(state)
    expected = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------- error types


def test_a_shape_mismatch_is_a_runtime_error_as_in_pytorch(tmp_path):
    other = small_model(4, kernel_size=9).state_dict()
    model = small_model(5)
    with pytest.raises(RuntimeError) as info:  # what fine-tuning code catches around load_state_dict
        model.load_state_dict(other)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)
    assert "checkpoint (32, 1, 9, 9) vs model (32, 1, 5, 5)" in str(info.value)

    path = tmp_path / "k9.pth"
    torch.save(other, path)
    try:
        timm.create_model(CIFAR, checkpoint_path=str(path), **SMALL)
    except RuntimeError as exc:
        caught = exc
    else:
        pytest.fail("a checkpoint of another kernel size loaded")
    assert isinstance(caught, CheckpointError) and "k=9" in str(caught)
    with pytest.raises(ValueError):  # callers written for earlier versions keep working
        timm.create_model(CIFAR, checkpoint_path=str(path), **SMALL)

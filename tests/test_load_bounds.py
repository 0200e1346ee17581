"""Every path that loads a checkpoint into a ConvMixer has ``convert``'s bounds (issue 13, item 2), and a mismatch is
catchable as PyTorch's ``RuntimeError`` (issue 12, item 5).

timm reads ``checkpoint_path=``, ``pretrained_cfg_overlay=dict(file=...)``, ``local-dir:``, ``hf-hub:`` (through the
Hub cache), ``load_checkpoint`` and ``resume_checkpoint`` with ``torch.load`` before any code of the model runs; a
zip whose entries would inflate far beyond its size is refused before that, and only for our models. Tensors that
cannot stand for the model's float weights (int, bool, complex) are refused by every path, naming them, with the
model untouched. The Hub is a real ``LocalHub`` on 127.0.0.1.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from hub_env import hub_environment
from hub_server import LocalHub
from reference import randomize_batchnorm, zip_bomb
from torch import nn

from convmixer_timm.hub import save_hub_folder
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


def hub_folder_with(weights: Path, name: str, tmp_path: Path) -> dict[str, bytes]:
    """A Hub folder's config.json (from a real ``save_hub_folder``) with ``weights`` as its only weights file,
    named as timm's fallback reads it: ``pytorch_model.bin``, through ``torch.load``."""
    folder = save_hub_folder(small_model(), tmp_path / f"{name}-source", CIFAR)
    return {"config.json": (folder / "config.json").read_bytes(), "pytorch_model.bin": weights.read_bytes()}


BOMB_MESSAGE = "would inflate to"


# ---------------------------------------------------------------------------------------------------- zip bombs


def test_zip_bomb_is_refused_on_every_local_path(tmp_path):
    bomb = zip_bomb(tmp_path / "bomb.pth", 16 << 20)
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    for name, content in hub_folder_with(bomb, "local", tmp_path).items():
        (local_dir / name).write_bytes(content)

    loads = {
        "checkpoint_path": lambda: timm.create_model(CIFAR, checkpoint_path=str(bomb), **SMALL),
        "pretrained_cfg_overlay": lambda: timm.create_model(CIFAR, pretrained=True, **SMALL,
                                                            pretrained_cfg_overlay=dict(file=str(bomb))),
        "load_checkpoint": lambda: timm.models.load_checkpoint(small_model(), str(bomb)),
        "resume_checkpoint": lambda: timm.models.resume_checkpoint(small_model(), str(bomb)),
        "load_checkpoint into torch.compile's wrapper": lambda: timm.models.load_checkpoint(
            torch.compile(small_model()), str(bomb)),
        "local-dir": lambda: timm.create_model(f"local-dir:{local_dir}", pretrained=True),
    }
    for name, load in loads.items():
        with pytest.raises(CheckpointError, match=BOMB_MESSAGE) as info:
            load()
        message = str(info.value)
        assert "\n" not in message and "'archive/data.pkl'" in message, (name, message)


def test_zip_bomb_from_the_hub_is_refused_when_downloaded_and_when_cached(tmp_path):
    bomb = zip_bomb(tmp_path / "bomb.pth", 16 << 20)
    with LocalHub(tmp_path / "hub") as hub, hub_environment(hub.endpoint, tmp_path / "home") as env:
        hub.add_files("me/bomb", hub_folder_with(bomb, "hub", tmp_path))
        for attempt in ("download", "cache"):
            with pytest.raises(CheckpointError, match=BOMB_MESSAGE):
                timm.create_model("hf-hub:me/bomb", pretrained=True)
            cached = list(env.repo_cache("me/bomb").rglob("pytorch_model.bin"))
            assert cached, attempt  # the second attempt reads the copy in the Hub cache


def test_zip_bomb_memory_stays_bounded_through_timm(tmp_path):
    """Peak memory in a fresh process, as the issue measured it: a 256 MiB inflation must not happen."""
    bomb = zip_bomb(tmp_path / "bomb.pth", 256 << 20)
    code = textwrap.dedent(f"""
        import resource, timm
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for kwargs in (dict(checkpoint_path={str(bomb)!r}),
                       dict(pretrained=True, pretrained_cfg_overlay=dict(file={str(bomb)!r}))):
            try:
                timm.create_model({CIFAR!r}, dim=32, depth=2, **kwargs)
            except RuntimeError as exc:
                print("refused:", type(exc).__name__, exc)
        print("grown_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("refused: CheckpointError") == 2 and BOMB_MESSAGE in result.stdout, result.stdout
    grown_kib = int(result.stdout.split("grown_kib")[1])
    assert grown_kib < 64 * 1024, f"peak memory grew by {grown_kib} KiB"


def test_the_bound_applies_only_to_convmixer_loads(tmp_path):
    """A deflated (so highly compressed) but valid checkpoint: another model loads it through timm as before."""
    linear = nn.Linear(1000, 1000)
    nn.init.zeros_(linear.weight)
    torch.save(linear.state_dict(), tmp_path / "linear.pth")
    deflated = deflated_copy(tmp_path / "linear.pth", tmp_path / "linear-deflated.pth")
    assert deflated.stat().st_size * 100 < (tmp_path / "linear.pth").stat().st_size
    other = nn.Linear(1000, 1000)
    timm.models.load_checkpoint(other, str(deflated))
    assert torch.equal(other.weight, linear.weight)

    # The same kind of file for a ConvMixer is refused: the bound does not depend on where the file came from.
    model = timm.create_model(CIFAR, dim=512, depth=2)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
    torch.save(model.state_dict(), tmp_path / "convmixer.pth")
    packed = deflated_copy(tmp_path / "convmixer.pth", tmp_path / "convmixer-deflated.pth")
    with pytest.raises(CheckpointError, match=BOMB_MESSAGE):
        timm.models.load_checkpoint(timm.create_model(CIFAR, dim=512, depth=2), str(packed))
    # The file torch.save wrote, stored as it stores it, loads: real checkpoints sit near 1x.
    timm.models.load_checkpoint(timm.create_model(CIFAR, dim=512, depth=2), str(tmp_path / "convmixer.pth"))


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

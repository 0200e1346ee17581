"""Checkpoints in every layout load everywhere; bad ones fail clearly and change nothing."""
from __future__ import annotations

import os
import pickle

import pytest
import safetensors.torch
import timm
import torch
from reference import LabmlConvMixer, paper_convmixer, randomize_batchnorm

from convmixer_timm import CheckpointError, load_checkpoint_file, to_timm_layout
from convmixer_timm.models import detect_layout

# Small but real: the CIFAR 256/8 k5 p2 entry point with h and d shrunk keeps tests fast.
H, D, K, P, N = 32, 3, 5, 2, 10
MODEL = "convmixer_256_8_ks5_p2"
MODEL_KW = dict(dim=H, depth=D, kernel_size=K, patch_size=P)


def paper_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return randomize_batchnorm(paper_convmixer(H, D, K, P, N)).eval()


def labml_model() -> torch.nn.Module:
    torch.manual_seed(2)
    return randomize_batchnorm(LabmlConvMixer(H, D, K, P, N)).eval()


def save(state, path):
    path = str(path)
    if path.endswith(".safetensors"):
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


def wrap(state, how):
    if how == "module.":
        return {"module." + k: v for k, v in state.items()}
    if how == "state_dict":
        return {"state_dict": state, "epoch": 3}
    if how == "model":
        return {"model": state, "optimizer": {"lr": 0.1}}
    return state


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(3)
    return torch.randn(2, 3, 32, 32)


# safetensors holds a flat tensor map, so wrappers exist only in pickled checkpoints.
FILE_FORMS = [(how, suffix) for suffix in (".safetensors", ".pth", ".pth.tar", ".bin")
              for how in ("plain", "module.", "state_dict", "model")
              if suffix != ".safetensors" or how in ("plain", "module.")]


@pytest.mark.parametrize("source", ["paper", "labml", "timm"])
@pytest.mark.parametrize(("how", "suffix"), FILE_FORMS)
def test_every_layout_loads_through_every_path(tmp_path, images, source, how, suffix):
    reference = {"paper": paper_model, "labml": labml_model}.get(source, lambda: randomize_batchnorm(
        timm.create_model(MODEL, **MODEL_KW)).eval())()
    state = reference.state_dict()
    path = save(wrap(state, how), tmp_path / f"ckpt{suffix}")
    with torch.no_grad():
        expected = reference(images)

    # model.load_state_dict, with the wrapper/prefix as saved
    model = timm.create_model(MODEL, **MODEL_KW).eval()
    model.load_state_dict(wrap(state, how))
    # create_model(checkpoint_path=...): train.py --initial-checkpoint, validate.py --checkpoint
    via_checkpoint = timm.create_model(MODEL, checkpoint_path=path, **MODEL_KW).eval()
    # pretrained_cfg_overlay=dict(file=...): train.py --pretrained-path
    via_pretrained = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=path),
                                       **MODEL_KW).eval()
    with torch.no_grad():
        for m in (model, via_checkpoint, via_pretrained):
            torch.testing.assert_close(m(images), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_authors_original_model_round_trip_is_identical(tmp_path, images):
    """The paper's own nn.Sequential, saved as the authors' release is, loads into the plugin bit for bit."""
    reference = paper_model()
    path = save(reference.state_dict(), tmp_path / "convmixer_release.pth.tar")
    model = timm.create_model(MODEL, checkpoint_path=path, **MODEL_KW).eval()
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))


def test_layout_detection_and_conversion_names():
    assert detect_layout(list(paper_model().state_dict())) == "original"
    assert detect_layout(list(labml_model().state_dict())) == "labml"
    converted = to_timm_layout(paper_model().state_dict())
    expected_keys = list(timm.create_model(MODEL, **MODEL_KW).state_dict())
    assert sorted(converted) == sorted(expected_keys)
    with pytest.raises(CheckpointError, match="not a ConvMixer checkpoint"):
        to_timm_layout({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)})


def test_shape_mismatch_names_keys_and_leaves_model_untouched():
    model = timm.create_model(MODEL, **MODEL_KW)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = timm.create_model(MODEL, dim=H, depth=D, kernel_size=9, patch_size=P).state_dict()
    with pytest.raises(CheckpointError) as info:
        model.load_state_dict(other)
    message = str(info.value)
    assert "blocks.0.0.fn.0.weight: checkpoint (32, 1, 9, 9) vs model (32, 1, 5, 5)" in message
    assert "k=9" in message and "No weights were changed" in message
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("key", ["stem.0.weight", "blocks.0.0.fn.0.weight", "head.weight"])
def test_a_weight_of_the_wrong_rank_is_a_checkpoint_error(key):
    model = timm.create_model(MODEL, **MODEL_KW)
    state = model.state_dict()
    state[key] = torch.tensor(1.0)
    with pytest.raises(CheckpointError, match=rf"{key}: checkpoint \(\) vs model"):
        model.load_state_dict(state)


def test_truncated_or_corrupt_files_say_so(tmp_path):
    state = timm.create_model(MODEL, **MODEL_KW).state_dict()
    for suffix in (".safetensors", ".pth"):
        path = save(state, tmp_path / f"whole{suffix}")
        data = open(path, "rb").read()
        truncated = tmp_path / f"truncated{suffix}"
        truncated.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_checkpoint_file(truncated)
    generator = torch.Generator().manual_seed(0)
    for i in range(30):  # random bytes trip the unpickler in many different ways; each must read as corrupt
        garbage = tmp_path / f"garbage{i}.bin"
        garbage.write_bytes(torch.randint(0, 256, (4096,), generator=generator, dtype=torch.uint8).numpy().tobytes())
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_checkpoint_file(garbage)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_checkpoint_file(tmp_path / "missing.pth")


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"stem.0.weight": _RunsCode(str(marker))}, f, protocol=2)
    torch.save({"state_dict": {"x": _RunsCode(str(marker))}}, tmp_path / "evil_zip.pth")
    for candidate in (path, tmp_path / "evil_zip.pth"):
        with pytest.raises(CheckpointError, match="could run code"):
            load_checkpoint_file(candidate)
        with pytest.raises((pickle.UnpicklingError, RuntimeError), match="weights_only"):  # timm's loader
            timm.create_model(MODEL, checkpoint_path=str(candidate), **MODEL_KW)
    assert not marker.exists()

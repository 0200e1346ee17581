"""``timm.create_model(name, inference_precision=...)``: how timm's validate.py and benchmark.py run
optimize_for_inference (``--model-kwargs inference_precision=bf16``), replayed with the calls those scripts make:
``create_model``, ``num_classes``, the parameter count, ``resolve_data_config``, ``load_checkpoint``, ``.to()``,
``.eval()``, then calls under ``torch.inference_mode``. The real scripts run in ``test_timm_scripts.py`` where
``TIMM_SCRIPTS_DIR`` is set. Tolerances: bf16 within 3% of the largest float32 logit (``test_low_precision.py``);
int8's accuracy is that file's subject, here only that it calibrated on the images given.
"""
from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from timm.data import resolve_data_config
from timm.models import load_checkpoint

from convmixer_timm.speed import AutotunedConvMixer
from convmixer_timm.speed.deferred import DeferredInference
from convmixer_timm.speed.lowp import LowPrecisionConvMixer

MODEL = "convmixer_256_8_ks5_p2"
SMALL = dict(dim=16, depth=2, num_classes=10)

pytestmark = pytest.mark.usefixtures("private_choice_cache")


@pytest.fixture
def trained_checkpoint(tmp_path):
    """A model with its own weights (BatchNorm statistics included) and its checkpoint file, as train.py saves."""
    torch.manual_seed(0)
    model = timm.create_model(MODEL, **SMALL)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))  # running statistics that differ from a fresh model's
    path = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": model.state_dict()}, path)
    return model.eval(), path


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_validate_py_calls_on_a_low_precision_model(trained_checkpoint, precision):
    reference, checkpoint = trained_checkpoint
    model = timm.create_model(MODEL, **SMALL, inference_precision=precision)
    assert isinstance(model, DeferredInference)
    # What validate.py and benchmark.py read before the first call: the model's own.
    assert model.num_classes == 10
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    assert list(model.state_dict()) == list(reference.state_dict())
    assert resolve_data_config({}, model=model) == resolve_data_config({}, model=reference)
    load_checkpoint(model, str(checkpoint))
    model = model.to("cpu").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        first, second = model(x), model(x[:2])
    optimized = model.optimized
    assert isinstance(optimized, AutotunedConvMixer) and model(x[:3]).shape == (3, 10)
    assert model.optimized is optimized, "the optimized module is built once and serves every later call"
    with torch.no_grad():
        want = reference(x)
    tolerance = 1e-5 if precision == "fp32" else 0.03 * float(want.abs().max())
    assert first.dtype == torch.float32 and (first - want).abs().max() <= tolerance
    assert (second - want[:2]).abs().max() <= tolerance


def test_weights_round_trip_through_a_parent_module(trained_checkpoint):
    # nn.Sequential, a user's wrapper, DataParallel: the parent saves and loads its children itself.
    reference, _ = trained_checkpoint
    parent = torch.nn.Sequential(timm.create_model(MODEL, **SMALL, inference_precision="fp32"))
    assert list(parent.state_dict()) == [f"0.{key}" for key in reference.state_dict()]
    parent.load_state_dict({f"0.{key}": value for key, value in reference.state_dict().items()})
    parent.load_state_dict(parent.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(parent.eval()(x), reference(x), rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"0.extra\""):
        parent.load_state_dict({**parent.state_dict(), "0.extra": torch.zeros(1)})
    state = parent.state_dict()
    del state["0.head.bias"]
    assert parent.load_state_dict(state, strict=False).missing_keys == ["0.head.bias"]  # the model's names


def test_new_weights_a_move_or_training_drop_the_optimized_module(trained_checkpoint):
    reference, checkpoint = trained_checkpoint
    model = timm.create_model(MODEL, **SMALL, inference_precision="fp32").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        before = model(x)  # built from the fresh model's random weights
    assert model.optimized is not None
    load_checkpoint(model, str(checkpoint))
    assert model.optimized is None
    with torch.inference_mode():
        after = model(x)
    with torch.no_grad():
        assert torch.allclose(after, reference(x), atol=1e-5) and not torch.allclose(before, after, atol=1e-3)
    model.to(torch.float32)
    assert model.optimized is None
    # Training mode and calls with autograd are the model's own: exact, with gradients.
    model.train()
    out = model(x)
    out.sum().backward()
    assert model.stem[0].weight.grad is not None and model.optimized is None


def test_int8_calibrates_on_the_images_in_calibration_dir(tmp_path):
    folder = tmp_path / "train" / "any"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(10):
        pixels = torch.randint(0, 256, (20, 20), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    torch.manual_seed(0)
    # A grey model, as validate.py --input-size 1 16 16 --mean 0.5 --std 0.5 would run it.
    model = timm.create_model(MODEL, **SMALL, in_chans=1, inference_precision="int8",
                              calibration_dir=str(tmp_path / "train"), calibration_images=7,
                              calibration_config={"input_size": (1, 16, 16), "mean": (0.5,), "std": (0.5,)}).eval()
    with torch.inference_mode():
        out = model(torch.randn(3, 1, 16, 16))
    assert out.shape == (3, 10) and out.dtype == torch.float32
    optimized = model.optimized
    assert isinstance(optimized, LowPrecisionConvMixer) and optimized.precision == "int8"
    batches = optimized.calibration
    assert sum(len(b) for b in batches) == 7 and all(b.shape[1:] == (1, 16, 16) for b in batches)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(inference_precision="int4"), "precision must be one of"),
    (dict(inference_precision="int8"), "needs calibration_dir"),
    (dict(inference_precision="int8", calibration_dir="/nonexistent/images"), "is not a folder"),
    (dict(calibration_dir="/tmp"), "apply only with inference_precision"),
    (dict(inference_precision="bf16", calibration_images=0), "calibration_images must be"),
    (dict(inference_precision="bf16", calibration_config=[1]), "calibration_config must be"),
])
def test_bad_inference_arguments_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model(MODEL, **SMALL, **kwargs)

"""ONNX export (opset 17) of odd and even kernels, GELU and ReLU, checked with onnxruntime to 1e-4 of scale."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from reference import randomize_batchnorm

from convmixer_timm import VARIANTS, ConvMixer
from convmixer_timm.export import check_onnx, export_onnx

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.mark.parametrize(("k", "act"), [(5, "gelu"), (8, "gelu"), (7, "relu"), (4, "relu")])
def test_export_matches_onnxruntime(tmp_path, k, act):
    import onnx

    torch.manual_seed(0)
    model = randomize_batchnorm(ConvMixer(16, 2, k, 2, num_classes=10, act_layer=act))
    path = export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32), opset=17)
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert check_onnx(model, path, torch.randn(3, 3, 32, 32)) < 1e-4  # batch 3: the batch axis is dynamic
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_failed_export_leaves_nothing(tmp_path):
    # Images of one channel for a model of three: the model refuses them while the exporter traces it.
    with pytest.raises(RuntimeError, match=r"but got \[1, 1, 16, 16\]; build the model with in_chans=1"):
        export_onnx(ConvMixer(8, 1, 3, 2, num_classes=4), tmp_path / "new" / "folders" / "m.onnx", (1, 16, 16))
    assert os.listdir(tmp_path) == []  # neither a temporary file nor the folders made for the file
    with pytest.raises(ValueError, match="opset"):
        export_onnx(ConvMixer(8, 1, 3, 2, num_classes=4), tmp_path / "m.onnx", (3, 16, 16), opset=13)


def test_the_default_input_is_the_models_channels_at_its_pretrained_size(tmp_path):
    model = timm.create_model("convmixer_256_8_ks5_p2", dim=8, depth=1, in_chans=1)  # pretrained size 32 x 32
    path = export_onnx(model, tmp_path / "grey.onnx", dynamic_batch=False)
    assert check_onnx(model, path, torch.randn(1, 1, 32, 32)) < 1e-4


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_every_registered_variant_exports(tmp_path, variant):
    # Each variant's own kernel, patch, activation and image size; width and depth cut to keep CI short.
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model(variant.name, dim=16, depth=2))
    size = (1, 3, variant.img_size, variant.img_size)
    path = export_onnx(model, tmp_path / "m.onnx", size, opset=17)
    assert check_onnx(model, path, torch.randn(2, *size[1:])) < 1e-4


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_file_has_the_permissions_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = export_onnx(ConvMixer(8, 1, 3, 2, num_classes=4), tmp_path / "m.onnx", (3, 16, 16))
        reference = tmp_path / "reference"
        reference.write_text("any new file")  # what open() gives a new file under this umask
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "reference"]


def test_export_to_a_255_byte_name(tmp_path):
    path = export_onnx(ConvMixer(8, 1, 3, 2, num_classes=4), tmp_path / ("m" * 250 + ".onnx"), (3, 16, 16))
    assert os.listdir(tmp_path) == [path.name] and len(path.name) == 255


def test_the_temporary_file_makes_the_folders_it_needs(tmp_path):
    # Another export's failure may remove a new folder between this export's check and its first file.
    from convmixer_timm.export import _create_temporary

    target = tmp_path / "removed" / "meanwhile" / "m.onnx"
    tmp = Path(_create_temporary(target))
    assert tmp.parent == target.parent and tmp.is_file() and tmp.stat().st_size == 0

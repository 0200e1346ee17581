"""Hub folders load in Hugging Face transformers (its timm wrapper) exactly as timm loads them, labels included.

Covers ``save_hub_folder`` and ``convert`` here (the demo's folder in test_demo.py, a pushed repo in test_hub.py):
AutoModelForImageClassification, AutoImageProcessor and pipeline("image-classification") against timm's
``local-dir:`` load; class names in transformers' id2label and in timm's pretrained config, as timm's
inference.py reads them; and a fresh process that imports only transformers, as a user's script does.
"""
from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from hf_checks import assert_transformers_matches_timm, random_images
from reference import randomize_batchnorm
from timm.data import CustomDatasetInfo, DatasetInfoLabelMapper, ImageNetInfo

from convmixer_timm import cli
from convmixer_timm.hub import save_hub_folder
from convmixer_timm.labels import CIFAR10_LABELS

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR = "convmixer_256_8_ks5_p2"
IMAGENET = "convmixer_768_32"


def small(name: str, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(timm.create_model(name, **{"dim": 32, "depth": 2, **kwargs}), seed).eval()


def timm_inference_labels(model: torch.nn.Module, label_type: str, indices: list[int]) -> list[str]:
    """What timm's inference.py prints for these class indices (its labelling code, from the model's config)."""
    cfg = model.pretrained_cfg
    info = CustomDatasetInfo(label_names=cfg["label_names"], label_descriptions=cfg.get("label_descriptions"))
    return [DatasetInfoLabelMapper(info, label_type=label_type)(i) for i in indices]


def test_cifar_folder_loads_in_transformers_with_cifar10_names(tmp_path):
    folder = save_hub_folder(small(CIFAR, 0), tmp_path / "cifar", CIFAR, dataset="cifar-10")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_args"] == {"dim": 32, "depth": 2}
    results = assert_transformers_matches_timm(folder, random_images(3, seed=0))
    assert {r["label"] for result in results for r in result} <= set(CIFAR10_LABELS)

    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(folder)
    assert [hf_config.id2label[i] for i in range(10)] == list(CIFAR10_LABELS)
    assert hf_config.label2id["truck"] == 9
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert timm_inference_labels(loaded, "name", [0, 9]) == ["airplane", "truck"]


def test_imagenet_folder_names_classes_like_timm_and_transformers_do(tmp_path):
    # 1000 classes at 224 px; h=16 keeps the forward cheap.
    folder = save_hub_folder(small(IMAGENET, 1, dim=16), tmp_path / "imagenet", IMAGENET, dataset="imagenet-1k")
    assert_transformers_matches_timm(folder, random_images(2, seed=1))

    info = ImageNetInfo("imagenet-1k")
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    # timm: the synsets as label names, the lemmas as descriptions (inference.py's --label-type name/description).
    assert loaded.pretrained_cfg["label_names"] == info.label_names()
    assert timm_inference_labels(loaded, "name", [0, 999]) == ["n01440764", "n15075141"]
    assert timm_inference_labels(loaded, "description", [0]) == ["tench, Tinca tinca"]
    # transformers: the readable descriptions, the same texts timm's inference.py prints by default.
    from transformers import AutoConfig

    id2label = AutoConfig.from_pretrained(folder).id2label
    assert [id2label[i] for i in range(1000)] == info.label_descriptions()


def test_converted_folder_with_overrides_and_given_labels_loads_in_transformers(tmp_path, capsys):
    model = small(CIFAR, 2, num_classes=4, act_layer="relu", kernel_size=3)
    src = tmp_path / "weights.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, src)
    labels = tmp_path / "labels.txt"
    labels.write_text("rock\npaper\nscissors\nlizard\n")
    out = tmp_path / "converted"
    assert cli.main(["convert", str(src), "--model", CIFAR, "--out", str(out), "--num-classes", "4", "--labels",
                     str(labels), "--model-kwargs", "dim=32", "depth=2", "act_layer=relu", "kernel_size=3"]) == 0, \
        capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"] == {"dim": 32, "depth": 2, "act_layer": "relu", "kernel_size": 3}
    assert config["num_classes"] == 4 and config["label_names"] == ["rock", "paper", "scissors", "lizard"]
    results = assert_transformers_matches_timm(out, random_images(2, seed=2))
    assert {r["label"] for result in results for r in result} <= {"rock", "paper", "scissors", "lizard"}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x), model(x))

"""convmixer-timm through the calls timm's train.py and validate.py make.

The scripts themselves are not installable, so CI replays their library calls in order: argument parsing of
``--model-kwargs``, ``create_model`` with train.py's keyword set (``--drop-path``, ``--pretrained-path``,
``--initial-checkpoint``), ``resolve_data_config``, the ImageFolder dataset and loader (prefetcher on, as train.py
defaults), optimizer and scheduler from a shipped recipe, one training step, ``CheckpointSaver``, then
validate.py's ``load_checkpoint`` and evaluation. With ``TIMM_SCRIPTS_DIR`` set to a folder holding timm's
train.py, validate.py and inference.py, the real scripts run too, as subprocesses.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.data import create_dataset, create_loader, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.models import create_model, load_checkpoint
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import CheckpointSaver, ParseKwargs

from convmixer_timm.configs import load_recipe, recipe_path
from convmixer_timm.training import write_digits_image_folder

MODEL = "convmixer_256_8_ks5_p2"
# What a user would type after --model-kwargs: a smaller model than the variant, and ReLU instead of GELU.
MODEL_KWARGS_ARGV = ["dim=32", "depth=2", "act_layer=relu"]
DATA_CONFIG_ARGS = dict(input_size=(1, 16, 16), mean=(0.5,), std=(0.5,), crop_pct=1.0)
CPU = torch.device("cpu")
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The models here are tiny: a second thread only waits, and on a busy 2-core CI machine it runs many times
    # slower. Restored afterwards so other test modules keep their setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_image_folder(tmp_path_factory.mktemp("digits"), seed=0)


@pytest.fixture(scope="module")
def model_kwargs():
    # The scripts' own parsing: `--model-kwargs nargs='*' action=ParseKwargs`, values through literal_eval.
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs)
    kwargs = parser.parse_args(["--model-kwargs", *MODEL_KWARGS_ARGV]).model_kwargs
    assert kwargs == {"dim": 32, "depth": 2, "act_layer": "relu"}
    return kwargs


def _train_py_model(model_kwargs, **overrides):
    """``create_model`` with the keyword set train.py passes (None values are dropped by timm)."""
    kwargs = dict(
        pretrained=False, in_chans=1, num_classes=10, drop_rate=0.0, drop_path_rate=0.1, drop_block_rate=None,
        global_pool=None, bn_momentum=None, bn_eps=None, scriptable=False, checkpoint_path="",
    )
    kwargs.update(overrides)
    return create_model(MODEL, **kwargs, **model_kwargs)


def _accuracy(model, loader) -> float:
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for images, targets in loader:
            correct += (model(images).argmax(1) == targets).sum().item()
            seen += targets.numel()
    return correct / seen


def _eval_loader(digits, data_config, use_prefetcher=True):
    dataset = create_dataset("", root=digits.root, split="validation", is_training=False, input_img_mode="L")
    return create_loader(
        dataset, input_size=data_config["input_size"], batch_size=128, is_training=False,
        interpolation=data_config["interpolation"], mean=data_config["mean"], std=data_config["std"],
        crop_pct=data_config["crop_pct"], num_workers=0, device=CPU, use_prefetcher=use_prefetcher,
    )


@pytest.fixture(scope="module")
def trained(digits, model_kwargs, tmp_path_factory):
    """Two epochs the way train.py runs them, ending in a CheckpointSaver checkpoint."""
    torch.manual_seed(0)
    model = _train_py_model(model_kwargs)
    data_config = resolve_data_config(dict(DATA_CONFIG_ARGS), model=model)
    train_set = create_dataset("", root=digits.root, split="train", is_training=True, input_img_mode="L")
    loader = create_loader(
        train_set, input_size=data_config["input_size"], batch_size=64, is_training=True, scale=(0.75, 1.0),
        ratio=(1.0, 1.0), hflip=0.0, interpolation="bilinear", mean=data_config["mean"], std=data_config["std"],
        num_workers=0, device=CPU, use_prefetcher=True,  # train.py's default: normalisation in the prefetcher
    )
    # Optimiser and schedule from the shipped CIFAR recipe, as train.py builds them from its parsed arguments.
    recipe = load_recipe("cifar10")
    # lr as train.py derives it from lr_base for batch 64; no warmup, so two epochs are enough to learn.
    args = argparse.Namespace(**{**recipe, "momentum": 0.9, "lr": 0.05 * 64 / 512, "warmup_epochs": 0})
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=False), updates_per_epoch=len(loader))
    assert num_epochs == recipe["epochs"]
    loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)
    model.train()
    updates = 0
    for epoch in range(2):
        for images, targets in loader:
            loss = loss_fn(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(num_updates=updates)
        scheduler.step(epoch + 1)
    accuracy = _accuracy(model, _eval_loader(digits, data_config))

    out = tmp_path_factory.mktemp("train-out")
    saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, checkpoint_dir=str(out),
                            recovery_dir=str(out), decreasing=False, max_history=2)
    saver.save_checkpoint(epoch=0, metric=accuracy)
    return dict(model=model, data_config=data_config, accuracy=accuracy, checkpoint=out / "model_best.pth.tar",
                loss=loss.item())


def test_model_kwargs_and_drop_path_reach_the_model(model_kwargs):
    model = _train_py_model(model_kwargs)
    assert model.num_features == 32 and len(model.blocks) == 2 and model.in_chans == 1
    assert model.act_name == "relu"
    assert any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    assert not any(isinstance(m, torch.nn.GELU) for m in model.modules())
    drop_paths = [m for m in model.modules() if type(m).__name__ == "DropPath"]
    assert drop_paths, "drop_path_rate=0.1 should add stochastic depth"


def test_resolve_data_config_and_eval_transform(model_kwargs):
    model = _train_py_model(model_kwargs)
    cfg = resolve_data_config(dict(DATA_CONFIG_ARGS), model=model)
    assert cfg["input_size"] == (1, 16, 16) and tuple(cfg["mean"]) == (0.5,)
    # Without overrides the CIFAR variant's own config applies (3 x 32 px, CIFAR statistics).
    default_cfg = resolve_data_config({}, model=create_model(MODEL))
    assert default_cfg["input_size"] == (3, 32, 32) and default_cfg["crop_pct"] == 1.0
    from PIL import Image

    tensor = create_transform(**cfg, is_training=False)(Image.new("L", (8, 8), 128))
    assert tensor.shape == (1, 16, 16)


def test_training_learns_and_checkpoint_is_written(trained):
    assert trained["checkpoint"].is_file()
    assert trained["accuracy"] > 0.5, "two epochs on digits should be far above chance (0.1)"


def test_validate_py_checkpoint_gives_the_same_accuracy(trained, digits, model_kwargs):
    # validate.py: create_model(pretrained=False, ...) then load_checkpoint(model, --checkpoint, --use-ema)
    model = create_model(MODEL, pretrained=False, num_classes=10, in_chans=1, global_pool=None, scriptable=False,
                         **model_kwargs)
    load_checkpoint(model, str(trained["checkpoint"]), use_ema=False)
    data_config = resolve_data_config(dict(DATA_CONFIG_ARGS), model=model, use_test_size=True)
    assert _accuracy(model, _eval_loader(digits, data_config)) == trained["accuracy"]


def test_initial_checkpoint_loads_exact_weights(trained, model_kwargs):
    # train.py --initial-checkpoint / create_model(checkpoint_path=...)
    model = _train_py_model(model_kwargs, checkpoint_path=str(trained["checkpoint"]))
    expected = trained["model"].state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_pretrained_path_adapts_the_head(trained, model_kwargs):
    # train.py --pretrained-path: the checkpoint becomes the pretrained file; num_classes=-1 forces head adaptation.
    overlay = dict(file=str(trained["checkpoint"]), num_classes=-1)
    model = _train_py_model(model_kwargs, pretrained=True, num_classes=4, pretrained_cfg_overlay=overlay)
    assert model.head.out_features == 4
    expected = trained["model"].state_dict()
    body = [k for k in model.state_dict() if not k.startswith("head.")]
    assert body and all(torch.equal(model.state_dict()[k], expected[k]) for k in body)


# --------------------------------------------------------------------------------------------------------------
# The real scripts, when available.

SCRIPTS_DIR = os.environ.get("TIMM_SCRIPTS_DIR")
needs_scripts = pytest.mark.skipif(
    not SCRIPTS_DIR, reason="TIMM_SCRIPTS_DIR not set: no timm train.py/validate.py to run (they are not installable)")


def _run_script(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    path = Path(SCRIPTS_DIR) / script
    assert path.is_file(), f"TIMM_SCRIPTS_DIR has no {script}: {path}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(path), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _result_json(stdout: str) -> dict:
    return json.loads(stdout.split("--result", 1)[1])


@needs_scripts
def test_real_train_py_and_validate_py(digits, tmp_path):
    common = ["--data-dir", str(digits.root), "--model", MODEL, "--input-size", "1", "16", "16",
              "--mean", "0.5", "--std", "0.5", "--device", "cpu", "--workers", "0", "--model-kwargs", "dim=32",
              "depth=2"]  # --model-kwargs last: a caller may add more
    train = _run_script("train.py", [
        "--config", str(recipe_path("cifar10")), *common,
        # the recipe names torchvision's CIFAR-10; an empty dataset name is an ImageFolder at --data-dir
        "--dataset", "", "--val-split", "validation", "--hflip", "0", "-b", "64", "--epochs", "2",
        "--warmup-epochs", "1", "--output", str(tmp_path), "--experiment", "run", "--log-interval", "100",
    ], cwd=tmp_path)
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "model_best.pth.tar"
    assert checkpoint.is_file(), train.stdout[-2000:]
    # The recipe's values reached train.py: lr scaled from lr_base 0.05 at batch 512 to batch 64.
    assert "Learning rate (0.00625) calculated from base learning rate (0.05)" in train.stdout + train.stderr
    best = max(float(line.split(",")[3]) for line in (run_dir / "summary.csv").read_text().splitlines()[1:])

    validate = _run_script("validate.py", [
        *common, "--split", "validation", "--num-classes", "10", "--crop-pct", "1.0",
        "--checkpoint", str(checkpoint), "-b", "128",
    ], cwd=tmp_path)
    result = _result_json(validate.stdout)
    assert result["model"] == MODEL
    assert result["top1"] == pytest.approx(best, abs=1e-3), "validate.py should reproduce train.py's best top-1"

    # optimize_for_inference through --model-kwargs (speed/deferred.py), int8 calibrated on the training split.
    low = _run_script("validate.py", [
        *common, "inference_precision=int8", f"calibration_dir={digits.root / 'train'}",
        "calibration_config={'input_size': (1, 16, 16), 'mean': (0.5,), 'std': (0.5,), 'crop_pct': 1.0}",
        "--split", "validation", "--num-classes", "10", "--crop-pct", "1.0", "--checkpoint", str(checkpoint),
        "-b", "128",
    ], cwd=tmp_path)
    assert _result_json(low.stdout)["top1"] == pytest.approx(best, abs=3.0), low.stdout[-2000:]
    bench = _run_script("benchmark.py", [
        "--model", MODEL, "--model-kwargs", "dim=32", "depth=2", "inference_precision=bf16",  # benchmark.py: RGB
        "--input-size", "3", "16", "16", "--device", "cpu", "-b", "4", "--bench", "inference",
        "--num-warm-iter", "1", "--num-bench-iter", "5",
    ], cwd=tmp_path)
    assert "infer_samples_per_sec" in bench.stdout, bench.stdout[-2000:]


@needs_scripts
def test_real_train_py_with_an_imagenet_recipe(digits, tmp_path):
    # The authors' ImageNet recipe end to end at toy size: mixup/cutmix (soft-target loss), RandAugment, random
    # erasing, lr scaled from lr_base 0.01 at batch 640. `mmax9` is the documented workaround for the posterize
    # crash of `inc1` with Pillow 13 (see the recipe's comments).
    proc = _run_script("train.py", [
        "--config", str(recipe_path("convmixer_768_32")), "--data-dir", str(digits.root), "--val-split", "validation",
        "--num-classes", "10", "--input-size", "3", "16", "16", "--model-kwargs", "dim=16", "depth=1", "patch_size=2",
        "--aa", "rand-m9-mstd0.5-inc1-mmax9", "-b", "64", "--epochs", "1", "--device", "cpu", "--workers", "0",
        "--output", str(tmp_path), "--experiment", "in1k", "--log-interval", "100",
    ], cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert "Model convmixer_768_32 created" in log
    assert "Learning rate (0.001) calculated from base learning rate (0.01)" in log  # 0.01 * 64 / 640
    assert "SoftTargetCrossEntropy" in log  # mixup/cutmix from the recipe are on
    assert (tmp_path / "in1k" / "last.pth.tar").is_file()


@needs_scripts
def test_real_inference_py_prints_the_class_names_of_a_hub_folder(digits, tmp_path):
    """inference.py reads label_names from the folder's config (it needs pandas: the [scripts] extra)."""
    from convmixer_timm.hub import save_hub_folder

    torch.manual_seed(0)
    names = [f"digit {d}" for d in range(10)]
    folder = save_hub_folder(create_model(MODEL, dim=32, depth=2).eval(), tmp_path / "folder", MODEL,
                             dataset="scikit-learn digits", labels=names)
    _run_script("inference.py", [
        "--data-dir", str(digits.root), "--split", "validation", "--model", f"local-dir:{folder}",
        "--device", "cpu", "--workers", "0", "--label-type", "name", "--topk", "2", "--results-dir", str(tmp_path),
        "--results-file", "predictions", "--results-format", "json", "--no-console-results",
    ], cwd=tmp_path)
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert len(predictions) == digits.num_val
    assert all(len(p["label"]) == 2 and set(p["label"]) <= set(names) for p in predictions.values())

"""The demo end to end: the full default run, its held-out claim, the saved folder and its reload."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch

from convmixer_timm import demo


def _args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One run with the demo's defaults (the documented claim), shared by the tests below."""
    base = tmp_path_factory.mktemp("demo")
    args = _args(out=str(base / "model"), results=str(base / "results.json"))
    threads = torch.get_num_threads()
    code = demo.run(args)
    assert torch.get_num_threads() == threads, "run() must restore the caller's thread setting"
    return code, args, json.loads((base / "results.json").read_text())


def test_default_run_reaches_the_claim_on_held_out_digits(default_run):
    code, _, results = default_run
    assert code == 0
    assert results["held_out_images"] == 360  # 20% of 1797, never trained on
    assert results["accuracy"] >= demo.ACCURACY_CLAIM
    assert results["world_size"] == 1
    assert results["epochs"] == demo.DEFAULT_EPOCHS


def test_saved_folder_reloads_through_local_dir_with_the_same_accuracy(default_run, tmp_path):
    _, args, results = default_run
    assert results["reloaded_accuracy"] == results["accuracy"]
    # Independently of the demo: rebuild the held-out split and score the saved folder.
    from timm.data import create_dataset, resolve_data_config

    from convmixer_timm.training import write_digits_image_folder

    write_digits_image_folder(tmp_path, seed=args.seed)
    model = timm.create_model(f"local-dir:{args.out}", pretrained=True)
    assert model.in_chans == 1 and model.num_classes == 10
    config = resolve_data_config(model=model)
    assert config["input_size"] == (1, demo.IMG_SIZE, demo.IMG_SIZE)
    val_set = create_dataset("", root=tmp_path, split="validation", input_img_mode="L")
    loader = demo.eval_loader(val_set, config, batch_size=128, workers=0, device=torch.device("cpu"))
    accuracy, seen = demo.evaluate(model, loader, torch.device("cpu"))
    assert seen == results["held_out_images"]
    assert accuracy == results["accuracy"]


def test_existing_output_is_kept_without_overwrite(default_run, capsys):
    _, args, _ = default_run
    before = sorted(p.name for p in Path(args.out).iterdir())
    assert demo.run(_args(out=args.out)) == 2  # refused before any training
    assert "pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in Path(args.out).iterdir()) == before


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(batch_size=0), dict(threads=0), dict(workers=-1)])
def test_bad_options_are_refused(bad, tmp_path, capsys):
    assert demo.run(_args(out=str(tmp_path / "m"), **bad)) == 2
    assert "error:" in capsys.readouterr().err

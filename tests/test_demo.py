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
    """One run with the demo's defaults (the documented claim, no --out), shared by the tests below.

    It runs in an empty working folder with the cache moved to a temporary one, as the README's command runs in
    a fresh checkout: the output must land in the cache, not in the working folder.
    """
    base = tmp_path_factory.mktemp("demo")
    workdir, cache = base / "checkout", base / "cache"
    workdir.mkdir()
    args = _args(results=str(base / "results.json"))
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        patch.setenv("CONVMIXER_TIMM_CACHE", str(cache))
        code = demo.run(args)
        out = demo.default_out()
    assert torch.get_num_threads() == threads, "run() must restore the caller's thread setting"
    assert list(workdir.iterdir()) == [], "the demo wrote into the working folder"
    args.out = str(out)
    return code, args, json.loads((base / "results.json").read_text())


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A one-epoch run into a folder of its own: what the saved folder must do does not depend on the accuracy."""
    base = tmp_path_factory.mktemp("demo-short")
    args = _args(epochs=1, out=str(base / "model"), results=str(base / "results.json"))
    demo.run(args)  # exit 1 below the accuracy claim; the folder is written either way
    return args, json.loads((base / "results.json").read_text())


@pytest.mark.slow
def test_default_run_reaches_the_claim_on_held_out_digits(default_run):
    code, args, results = default_run
    assert code == 0
    # Written under the cache folder, and the absolute path printed (and recorded) is where it is.
    assert Path(args.out).parent.name == "cache" and (Path(args.out) / "model.safetensors").is_file()
    assert results["out"] == args.out
    assert results["held_out_images"] == 360  # 20% of 1797, never trained on
    assert results["accuracy"] >= demo.ACCURACY_CLAIM
    assert results["world_size"] == 1
    assert results["epochs"] == demo.DEFAULT_EPOCHS


def test_saved_folder_reloads_through_local_dir_with_the_same_accuracy(short_run, tmp_path):
    args, results = short_run
    assert results["reloaded_accuracy"] == results["accuracy"]
    # Independently of the demo: rebuild the held-out split and score the saved folder.
    from timm.data import create_dataset, resolve_data_config

    from convmixer_timm.training import write_digits_image_folder

    write_digits_image_folder(tmp_path, seed=args.seed)
    model = timm.create_model(f"local-dir:{args.out}", pretrained=True)
    assert model.in_chans == 3 and model.num_classes == 10
    assert model.pretrained_cfg["label_names"] == [str(d) for d in range(10)]
    config = resolve_data_config(model=model)
    assert tuple(config["input_size"]) == (3, demo.IMG_SIZE, demo.IMG_SIZE)
    val_set = create_dataset("", root=tmp_path, split="validation")  # RGB, as every image tool reads files
    loader = demo.eval_loader(val_set, config, batch_size=128, workers=0, device=torch.device("cpu"))
    accuracy, seen = demo.evaluate(model, loader, torch.device("cpu"))
    assert seen == results["held_out_images"]
    assert accuracy == results["accuracy"]


def test_saved_folder_classifies_digit_files_in_transformers_pipeline(short_run, tmp_path):
    """The held-out PNGs through pipeline("image-classification"): labels are the digits, accuracy the demo's."""
    from hf_checks import assert_transformers_matches_timm
    from PIL import Image

    from convmixer_timm.training import write_digits_image_folder

    args, results = short_run
    split = write_digits_image_folder(tmp_path, seed=args.seed)
    files = sorted(split.val_dir.glob("*/*.png"))
    assert len(files) == results["held_out_images"]
    images = [Image.open(f) for f in files]  # 8x8 grey files, as a user would pass them
    predictions = assert_transformers_matches_timm(args.out, images)
    correct = sum(p[0]["label"] == f.parent.name for p, f in zip(predictions, files, strict=True))
    assert correct / len(files) == results["accuracy"]
    _, body = (Path(args.out) / "README.md").read_text().split("---\n", 2)[1:]
    assert "`0`, `1`, `2`" in body and "scikit-learn digits" in body


def test_default_folder_is_replaced_by_the_next_run(tmp_path, monkeypatch, capsys):
    """The default folder is the demo's own: a second run replaces it instead of refusing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONVMIXER_TIMM_CACHE", str(tmp_path / "cache"))
    out = demo.default_out()
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an earlier run")
    demo.run(_args(epochs=1))  # one epoch is below the accuracy claim (exit 1), but the folder is written
    printed = capsys.readouterr().out
    assert f"output folder: {out} (replaced if it exists)" in printed
    assert f"saved Hub-ready folder: {out}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_existing_output_is_kept_without_overwrite(short_run, capsys):
    args, _ = short_run
    before = sorted(p.name for p in Path(args.out).iterdir())
    assert demo.run(_args(out=args.out)) == 2  # refused before any training
    assert "pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in Path(args.out).iterdir()) == before


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(batch_size=0), dict(threads=0), dict(workers=-1),
                                 dict(batch_size=5000)])
def test_bad_options_are_refused(bad, tmp_path, capsys):
    assert demo.run(_args(out=str(tmp_path / "m"), **bad)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert not (tmp_path / "m").exists()

"""The ``convmixer-timm`` command line: list, convert (every checkpoint layout), failure safety, help.

Models are small (h=32, d=2) instances of the registered variants so the file runs in seconds; parity is checked
against independent implementations written from the authors' and labml.ai's code, with randomised BatchNorm
statistics so that a wrong mapping of any tensor shows up in the outputs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from reference import LabmlConvMixer, paper_convmixer, randomize_batchnorm
from torch import nn

from convmixer_timm import cli
from convmixer_timm.hub import HubFolderError, load_hub_folder, save_hub_folder
from convmixer_timm.models.variants import VARIANTS, VARIANTS_BY_NAME

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(dim=32, depth=2)
CIFAR = "convmixer_256_8_ks5_p2"  # k=5, p=2, GELU, 10 classes, 32 px


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random weights *and* BatchNorm statistics, so every tensor influences the output."""
    return randomize_batchnorm(model, seed).eval()


def small_timm(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return randomise(timm.create_model(CIFAR, **{**SMALL, **overrides}), seed)


def images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(123))


def run_cli(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


def load_dir(path: Path) -> nn.Module:
    return timm.create_model(f"local-dir:{path}", pretrained=True).eval()


def assert_nothing_left(parent: Path, expected: set[str]) -> None:
    """Only the entries we expect: no output folder from a failed run, no staging or backup folders."""
    assert {p.name for p in parent.iterdir()} == expected


# ---------------------------------------------------------------------------------------------------- list


def test_list_json_equals_variant_table(capsys):
    assert run_cli("list", "--json") == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in records] == [v.name for v in VARIANTS]
    for record, v in zip(records, VARIANTS, strict=True):
        assert (record["h"], record["d"], record["k"], record["p"], record["act"]) == (v.h, v.d, v.k, v.p, v.act)
        assert record["params"] == v.param_count()
        assert record["macs"] == v.macs()
        assert record["gmacs"] == pytest.approx(v.macs() / 1e9, abs=1e-3)
        assert record["img_size"] == v.img_size and record["num_classes"] == v.num_classes
        assert record["dataset"] == v.dataset
        assert record["top1"] == v.top1 and record["top1_source"] == v.top1_source
        assert record["weights"] == v.hf_hub_id


def test_list_table_shows_every_variant(capsys):
    assert run_cli("list") == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    for column in ("name", "h", "d", "k", "p", "act", "params", "GMACs", "top-1", "weights"):
        assert column in header
    for v in VARIANTS:
        row = next(line for line in lines if line.split()[:1] == [v.name])
        cells = row.split()
        assert cells[1:6] == [str(v.h), str(v.d), str(v.k), str(v.p), v.act]
        assert f"{v.param_count() / 1e6:.2f}M" in cells
        assert f"{v.macs() / 1e9:.2f}" in cells
        assert ("-" if v.top1 is None else f"{v.top1:.2f}") in cells
        assert cells[-1] == (v.hf_hub_id or "none")


# ---------------------------------------------------------------------------------------------------- convert


def _save(obj, path: Path) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in obj.items()}, path)
    else:
        torch.save(obj, path)
    return path


LAYOUT_CASES = {
    # name: (reference model factory, wrap the state dict, file name, --model, --model-kwargs)
    "timm-safetensors": (lambda: small_timm(1), lambda sd: sd, "w.safetensors", CIFAR, SMALL),
    "timm-module-prefix-wrapper-pth.tar": (
        lambda: small_timm(2), lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
        "ckpt.pth.tar", CIFAR, SMALL),
    "original-gelu-pth": (lambda: randomise(paper_convmixer(32, 2, 5, 2, 10), 3), lambda sd: sd, "orig.pth",
                          CIFAR, SMALL),
    "original-relu-model-wrapper-bin": (
        lambda: randomise(paper_convmixer(16, 2, 7, 7, 1000, nn.ReLU), 4), lambda sd: {"model": sd},
        "pytorch_model.bin", "convmixer_768_32", dict(dim=16, depth=2)),
    "original-even-kernel-module-prefix": (
        lambda: randomise(paper_convmixer(32, 2, 8, 7, 1000), 5), lambda sd: {f"module.{k}": v for k, v in sd.items()},
        "even.pth", "convmixer_512_16_ks8_p7", SMALL),
    "labml-safetensors": (lambda: randomise(LabmlConvMixer(32, 2, 5, 2, 10), 6), lambda sd: sd,
                          "labml.safetensors", CIFAR, SMALL),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_convert_every_layout_loads_with_identical_outputs(tmp_path, case, capsys):
    make, wrap, filename, model_name, kwargs = LAYOUT_CASES[case]
    reference = make()
    src = _save(wrap(reference.state_dict()), tmp_path / filename)
    out = tmp_path / "hub" / "converted"
    argv = ["convert", src, "--model", model_name, "--out", out, "--model-kwargs",
            *[f"{k}={v}" for k, v in kwargs.items()]]
    assert run_cli(*argv) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert_nothing_left(out.parent, {"converted"})

    loaded = load_dir(out)
    size = 32 if model_name == CIFAR else 56
    x = images(2, size)
    with torch.no_grad():
        expected, actual = reference(x), loaded(x)
    if case.startswith("timm"):
        assert torch.equal(actual, expected)
    else:  # other code, same arithmetic up to float reassociation
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)

    config = json.loads((out / "config.json").read_text())
    variant = VARIANTS_BY_NAME[model_name]
    assert config["architecture"] == model_name
    assert config["num_classes"] == variant.num_classes
    assert config["num_features"] == kwargs["dim"]
    # Only what differs from the registered variant (here the shrunk width and depth), never num_classes: the
    # variant supplies the rest, and transformers passes num_classes to timm.create_model itself.
    assert config["model_args"] == kwargs
    assert config["pretrained_cfg"]["num_classes"] == variant.num_classes


@pytest.mark.slow
def test_convert_as_real_subprocess(tmp_path):
    """``python -m convmixer_timm convert`` end to end, in a fresh interpreter (start-up hook included)."""
    reference = small_timm(7)
    src = _save(reference.state_dict(), tmp_path / "model.pth")
    out = tmp_path / "folder"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "convmixer_timm", "convert", str(src), "--model", CIFAR, "--out", str(out),
         "--model-kwargs", "dim=32", "depth=2"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "[3/3] writing and verifying" in result.stderr
    assert f'local-dir:{out}' in result.stdout
    x = images()
    with torch.no_grad():
        assert torch.equal(load_dir(out)(x), reference(x))


def card_parts(folder: Path) -> tuple[dict, str]:
    _, front, body = (folder / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(front), body


@pytest.mark.slow
def test_model_card_states_the_architecture_and_no_figures_for_unknown_weights(tmp_path):
    variant = VARIANTS_BY_NAME[CIFAR]
    # The published configuration (full size, 0.59M params) with random weights: the architecture's numbers are
    # facts, the published accuracy and training data set are not (they belong to other weights).
    full = randomise(timm.create_model(CIFAR), 8)
    out = save_hub_folder(full, tmp_path / "full", CIFAR)
    meta, body = card_parts(out)
    assert {"image-classification", "timm"} <= set(meta["tags"])
    assert meta["library_name"] == "timm" and meta["license"] == "mit"
    assert "datasets" not in meta and "model-index" not in meta
    for fact in (f"**Hidden dimension h:** {variant.h}", f"**Depth d:** {variant.d}", f"**Depthwise kernel k:** "
                 f"{variant.k}", f"**Patch size p:** {variant.p}", f"**Activation:** {variant.act}",
                 f"**Parameters:** {variant.param_count():,}", f"{variant.macs() / 1e9:.4g} GMACs",
                 f"{2 * variant.macs() / 1e9:.4g} GFLOPs", "**Training data set:** not stated", "MIT"):
        assert fact in body, fact
    assert sum(p.numel() for p in full.parameters()) == variant.param_count()
    assert f"{variant.top1:.2f}" not in body and "Published" not in body and "published top-1" not in body
    assert "cifar" not in body.lower()
    assert "No accuracy is stated for these weights" in body


@pytest.mark.slow
def test_model_card_quotes_the_published_figures_only_for_weights_with_the_published_digest(tmp_path, monkeypatch):
    """The variant table records the digest of published weights; none are on disk here, so one is made up."""
    from convmixer_timm.hub import weights_sha256
    from convmixer_timm.models import variants

    variant = VARIANTS_BY_NAME[CIFAR]
    published = randomise(timm.create_model(CIFAR), 10)
    digest = weights_sha256(published.state_dict())
    monkeypatch.setitem(variants.VARIANTS_BY_NAME, CIFAR, dataclasses.replace(variant, published_sha256=(digest,)))

    # The same tensors in the authors' nn.Sequential layout, as a DDP pickle: recognised through the conversion.
    original = paper_convmixer(variant.h, variant.d, variant.k, variant.p, variant.num_classes)
    # Both layouts list the tensors in the same order; the digest check below fails if any landed elsewhere.
    original.load_state_dict(dict(zip(original.state_dict(), published.state_dict().values(), strict=True)))
    src = _save({f"module.{k}": v for k, v in original.state_dict().items()}, tmp_path / "authors.pth.tar")
    assert run_cli("convert", src, "--model", CIFAR, "--out", tmp_path / "published") == 0
    meta, body = card_parts(tmp_path / "published")
    assert meta["datasets"] == ["cifar10"]
    assert "**Training data set:** cifar-10" in body
    assert f"{variant.top1:.2f} %" in body and variant.top1_source in body and "SHA-256" in body
    from convmixer_timm.labels import CIFAR10_LABELS  # the published weights' classes are known: CIFAR-10's

    assert read_config(tmp_path / "published")["label_names"] == list(CIFAR10_LABELS)

    # One value changed: other weights, so neither the figure nor the data set is claimed.
    with torch.no_grad():
        published.head.bias[0] += 1e-3
    assert weights_sha256(published.state_dict()) != digest
    meta, body = card_parts(save_hub_folder(published, tmp_path / "other", CIFAR))
    assert "datasets" not in meta and f"{variant.top1:.2f}" not in body and "cifar" not in body.lower()
    assert "label_names" not in read_config(tmp_path / "other")


def test_model_card_states_figures_given_for_these_weights(tmp_path, capsys):
    variant = VARIANTS_BY_NAME[CIFAR]
    # Measured by the caller (as the demo does): stated as measured, where it was measured.
    small = small_timm(9)
    out = save_hub_folder(small, tmp_path / "small", CIFAR, metrics={"top1": 98.6, "dataset": "sklearn digits"})
    meta, body = card_parts(out)
    assert "datasets" not in meta  # where the figure was measured is not what the weights were trained on
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"]["name"] == "sklearn digits"
    assert result["metrics"][0]["value"] == 98.6
    assert "| top1 | 98.6 |" in body and "measured for the weights in this repository" in body
    assert f"{variant.top1:.2f}" not in body
    assert "**Hidden dimension h:** 32" in body and "**Depth d:** 2" in body
    with pytest.raises(ValueError, match="data set they were measured on"):
        save_hub_folder(small, tmp_path / "nowhere", CIFAR, metrics={"top1": 98.6})
    assert not (tmp_path / "nowhere").exists()

    reloaded = load_hub_folder(out)  # the library's shortcut for local-dir: with weights, in eval mode
    assert not reloaded.training
    with torch.no_grad():
        assert torch.equal(reloaded(images()), small(images()))

    # Given on the command line: stated as the converter's figure, with the data set named.
    src = _save(small_timm(11).state_dict(), tmp_path / "w.safetensors")
    assert run_cli("convert", src, "--model", CIFAR, "--out", tmp_path / "given", "--model-kwargs", "dim=32",
                   "depth=2", "--top1", "92.6", "--dataset", "cifar-10") == 0
    meta, body = card_parts(tmp_path / "given")
    assert meta["datasets"] == ["cifar10"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 92.6
    assert "| top1 | 92.6 |" in body and "not re-measured" in body and "**Training data set:** cifar-10" in body

    capsys.readouterr()
    for argv, message in (([], "--top1 needs --dataset"), (["--dataset", "cifar-10"], "between 0 and 100")):
        top1 = "92.6" if not argv else "120"
        assert run_cli("convert", src, "--model", CIFAR, "--out", tmp_path / "refused", "--model-kwargs", "dim=32",
                       "depth=2", "--top1", top1, *argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_convert_labels_from_a_file_reach_config_and_card(tmp_path, capsys):
    src = _save(small_timm(12, num_classes=3).state_dict(), tmp_path / "w.safetensors")
    base = ["convert", src, "--model", CIFAR, "--model-kwargs", "dim=32", "depth=2", "--num-classes", "3"]
    names = ["cat", "dog", "guinea pig"]
    text, listed = tmp_path / "labels.txt", tmp_path / "labels.json"
    text.write_text("cat\ndog\n  guinea pig  \n\n")  # surrounding spaces and the final newlines are not names
    listed.write_text(json.dumps(names))
    # Saved with a byte-order mark, as Windows editors do: the mark is no part of the first name.
    marked_text, marked_list = tmp_path / "marked.txt", tmp_path / "marked.json"
    marked_text.write_text("cat\ndog\nguinea pig\n", encoding="utf-8-sig")
    marked_list.write_text(json.dumps(names), encoding="utf-8-sig")
    for labels in (text, listed, marked_text, marked_list):
        out = tmp_path / f"out-{labels.stem}-{labels.suffix[1:]}"
        assert run_cli(*base, "--out", out, "--labels", labels) == 0, capsys.readouterr().err
        config = read_config(out)
        assert config["label_names"] == names and config["num_classes"] == 3
        assert "num_classes" not in config.get("model_args", {})
        assert load_dir(out).pretrained_cfg["label_names"] == names  # what timm's inference.py prints
        _, body = card_parts(out)
        assert "`cat`, `dog`, `guinea pig`" in body

    # Three classes and no names given: the data set's names would be a false claim, so none are written.
    assert run_cli(*base, "--out", tmp_path / "unnamed") == 0
    assert "label_names" not in read_config(tmp_path / "unnamed")
    assert "**Class names:** not known" in card_parts(tmp_path / "unnamed")[1]


@pytest.mark.parametrize("content, message", [
    ("cat\ndog\n", "has 2 class names but the model has 3 classes"),
    ('["cat", "dog", "cat"]', "class names must be unique"),
    ("cat\n\ndog\nbird\n", "line 2 is blank"),
    ('["cat", 2, "dog"]', "entry 1 is int"),
    ('["cat", "dog"', "not valid JSON"),
])
def test_convert_refuses_bad_labels_naming_the_problem(tmp_path, capsys, content, message):
    src = _save(small_timm(13, num_classes=3).state_dict(), tmp_path / "w.safetensors")
    labels = tmp_path / "labels.txt"
    labels.write_text(content)
    assert run_cli("convert", src, "--model", CIFAR, "--out", tmp_path / "out", "--model-kwargs", "dim=32",
                   "depth=2", "--num-classes", "3", "--labels", labels) == 2
    err = capsys.readouterr().err
    assert message in err and str(labels) in err
    assert_nothing_left(tmp_path, {"w.safetensors", "labels.txt"})

    assert run_cli("convert", src, "--model", CIFAR, "--out", tmp_path / "out", "--model-kwargs", "dim=32",
                   "depth=2", "--num-classes", "3", "--labels", tmp_path / "missing.txt") == 2
    assert "cannot read --labels" in capsys.readouterr().err


@pytest.mark.slow
def test_class_names_only_where_they_are_known(tmp_path):
    from convmixer_timm.labels import CIFAR10_LABELS

    model = small_timm(14)
    # Ten outputs of a CIFAR variant, data set unknown: they may be digits, so CIFAR-10's names would be a claim.
    unnamed = save_hub_folder(model, tmp_path / "a", CIFAR)
    assert "label_names" not in read_config(unnamed)
    assert "**Class names:** not known" in card_parts(unnamed)[1]
    # The data set the caller names implies them, in any spelling.
    assert read_config(save_hub_folder(model, tmp_path / "b", CIFAR, dataset="CIFAR10"))["label_names"] == \
        list(CIFAR10_LABELS)
    # Ten outputs trained on something else: no names, unless the caller gives them.
    assert "label_names" not in read_config(save_hub_folder(model, tmp_path / "c", CIFAR, dataset="svhn"))
    digits = [str(d) for d in range(10)]
    saved = save_hub_folder(model, tmp_path / "d", CIFAR, dataset="svhn", labels=digits)
    assert read_config(saved)["label_names"] == digits
    # A folder loaded and saved again keeps its names.
    again = save_hub_folder(load_hub_folder(saved), tmp_path / "e", CIFAR)
    assert read_config(again)["label_names"] == digits
    with pytest.raises(ValueError, match="has 9 class names but the model has 10 classes"):
        save_hub_folder(model, tmp_path / "f", CIFAR, labels=digits[:9])
    assert not (tmp_path / "f").exists()


@pytest.mark.slow
def test_unknown_class_names_reach_transformers_as_its_generic_ones(tmp_path, capsys):
    """transformers names 1000 unnamed outputs as ImageNet's classes itself; a folder of unknown classes says
    LABEL_i instead, and given names (markdown, HTML and all) reach id2label unchanged."""
    from transformers import AutoConfig

    base = ["--model", CIFAR, "--model-kwargs", "dim=8", "depth=1", "-q"]
    ten = _save(small_timm(30, dim=8, depth=1).state_dict(), tmp_path / "ten.safetensors")
    thousand = _save(small_timm(31, dim=8, depth=1, num_classes=1000).state_dict(), tmp_path / "1k.safetensors")
    assert run_cli("convert", ten, "--out", tmp_path / "ten", *base) == 0, capsys.readouterr().err
    assert run_cli("convert", thousand, "--out", tmp_path / "1k", "--num-classes", "1000", *base) == 0
    assert AutoConfig.from_pretrained(tmp_path / "ten").id2label[0] == "LABEL_0"  # transformers' default
    id2label = AutoConfig.from_pretrained(tmp_path / "1k").id2label
    assert [id2label[i] for i in (0, 999)] == ["LABEL_0", "LABEL_999"]  # not 'tench, Tinca tinca'
    assert "**Class names:** not known" in card_parts(tmp_path / "1k")[1]

    names = HOSTILE_NAMES + [f"c{i}" for i in range(10 - len(HOSTILE_NAMES))]
    (tmp_path / "names.json").write_text(json.dumps(names))
    assert run_cli("convert", ten, "--out", tmp_path / "named", "--labels", tmp_path / "names.json", *base) == 0
    id2label = AutoConfig.from_pretrained(tmp_path / "named").id2label
    assert [id2label[i] for i in range(10)] == names


# Names that mean something to markdown, HTML or YAML: the card must show them as text.
HOSTILE_NAMES = ["<script>alert(1)</script>", "a|b", "`tick`", "**bold**", "[link](http://x)", 'q"uote: - x',
                 "$x$ & y"]


def test_model_card_escapes_names_and_data_sets(tmp_path):
    model = small_timm(32)
    names = HOSTILE_NAMES + [f"c{i}" for i in range(10 - len(HOSTILE_NAMES))]
    dataset = 'my: "set" # <b>|x|</b> \u2028 *'
    out = save_hub_folder(model, tmp_path / "<i>card", CIFAR, labels=names, dataset=dataset,
                          metrics={"top|1": 50.0})
    meta, body = card_parts(out)
    assert meta["datasets"] == [dataset]  # the YAML front matter reads back exactly
    assert meta["model-index"][0]["name"] == "<i>card"
    assert "<script>" not in body.replace("`<script>", "") and "<i>" not in body and "<b>" not in body
    assert "`` `tick` ``" in body  # a code span with a longer fence shows the backticks
    assert "`<script>alert(1)</script>`" in body  # verbatim inside a code span, where HTML is not parsed
    assert "| top\\|1 | 50 |" in body  # the pipe does not split the table row
    assert "# Model card for &lt;i&gt;card" in body
    assert 'hf-hub:ORG/NAME"' in body  # not a Hub repo name: the usage snippet gets a placeholder
    assert read_config(out)["label_names"] == names


@pytest.mark.parametrize("bad, what", [("a\x1b[31mred", "escape character"), ("two\nlines", "control character"),
                                       ("tab\there", "control character"), ("\ud800", "lone surrogate")])
def test_control_characters_in_names_are_refused_naming_the_label(tmp_path, capsys, bad, what):
    names = [f"c{i}" for i in range(10)]
    names[3] = bad
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(names))
    src = _save(small_timm(33).state_dict(), tmp_path / "w.safetensors")
    assert run_cli("convert", src, "--model", CIFAR, "--model-kwargs", "dim=32", "depth=2", "--out",
                   tmp_path / "out", "--labels", labels, "-q") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "\x1b" not in err, err
    assert "class 3's name" in err and what in err
    with pytest.raises(ValueError, match=f"class 3's name .*{what}"):
        save_hub_folder(small_timm(33), tmp_path / "api", CIFAR, labels=names)
    with pytest.raises(ValueError, match=f"dataset holds .*{what}"):
        save_hub_folder(small_timm(33), tmp_path / "api", CIFAR, dataset=bad)
    assert_nothing_left(tmp_path, {"w.safetensors", "labels.json"})


# ---------------------------------------------------------------------------------------------------- failures


def test_corrupt_checkpoint_leaves_nothing(tmp_path, capsys):
    good = _save(small_timm(10).state_dict(), tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    parent = tmp_path / "hub"
    parent.mkdir()
    assert run_cli("convert", bad, "--model", CIFAR, "--out", parent / "out", "--model-kwargs", "dim=32",
                   "depth=2") == 1
    assert "truncated or corrupt" in capsys.readouterr().err
    assert_nothing_left(parent, set())

    good_pth = _save(small_timm(10).state_dict(), tmp_path / "good.pth")
    bad_pth = tmp_path / "bad.pth"
    bad_pth.write_bytes(good_pth.read_bytes()[: good_pth.stat().st_size // 2])
    assert run_cli("convert", bad_pth, "--model", CIFAR, "--out", parent / "out") == 1
    err = capsys.readouterr().err
    assert "bad.pth is truncated or corrupt" in err
    assert_nothing_left(parent, set())


def test_checkpoint_of_another_shape_leaves_nothing(tmp_path, capsys):
    src = _save(small_timm(11, dim=48).state_dict(), tmp_path / "w48.safetensors")
    parent = tmp_path / "hub"
    parent.mkdir()
    assert run_cli("convert", src, "--model", CIFAR, "--out", parent / "out", "--model-kwargs", "dim=32",
                   "depth=2") == 1
    err = capsys.readouterr().err
    assert "do not fit" in err and "h=48" in err
    assert "pass --model-kwargs dim=48 depth=2 kernel_size=5 patch_size=2 --num-classes 10" in err
    assert_nothing_left(parent, set())

    # The classifier size alone differs: the message names the flag that fixes it.
    src10 = _save(small_timm(12).state_dict(), tmp_path / "w10.safetensors")
    assert run_cli("convert", src10, "--model", "convmixer_1536_20", "--out", parent / "out", "--model-kwargs",
                   "dim=32", "depth=2", "kernel_size=5", "patch_size=2") == 1
    assert "--num-classes 10" in capsys.readouterr().err
    assert_nothing_left(parent, set())


def test_a_known_variant_with_other_input_channels_is_told_the_flag_that_fits(tmp_path, capsys):
    torch.manual_seed(0)
    src = _save(timm.create_model(CIFAR, in_chans=1).state_dict(), tmp_path / "grey.safetensors")
    assert run_cli("convert", src, "--model", CIFAR, "--out", tmp_path / "out") == 1
    hint = f"pass --model {CIFAR} --model-kwargs in_chans=1 to convert these weights"
    assert hint in capsys.readouterr().err
    assert run_cli("convert", src, "--model", CIFAR, "--model-kwargs", "in_chans=1", "--out", tmp_path / "out") == 0


@pytest.mark.parametrize("key", ["stem.0.weight", "blocks.0.0.fn.0.weight", "head.weight"])
def test_a_weight_of_the_wrong_rank_is_one_line_and_leaves_nothing(tmp_path, capsys, key):
    state = small_timm(10).state_dict()
    state[key] = torch.tensor(1.0)
    src = _save(state, tmp_path / "damaged.safetensors")
    parent = tmp_path / "hub"
    parent.mkdir()
    assert run_cli("convert", src, "--model", CIFAR, "--out", parent / "out", "--model-kwargs", "dim=32",
                   "depth=2") == 1
    err = capsys.readouterr().err
    assert f"{key}: checkpoint () vs model" in err and "Traceback" not in err
    assert_nothing_left(parent, set())


def test_existing_folder_is_never_overwritten_silently(tmp_path, capsys):
    first, second = small_timm(13), small_timm(14)
    src1 = _save(first.state_dict(), tmp_path / "a.safetensors")
    src2 = _save(second.state_dict(), tmp_path / "b.safetensors")
    parent = tmp_path / "hub"
    out = parent / "out"
    kwargs = ["--model-kwargs", "dim=32", "depth=2"]
    assert run_cli("convert", src1, "--model", CIFAR, "--out", out, *kwargs) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    assert run_cli("convert", src2, "--model", CIFAR, "--out", out, *kwargs) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # --overwrite with an input that fails: the old folder stays as it was.
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert run_cli("convert", bad, "--model", CIFAR, "--out", out, "--overwrite", *kwargs) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert_nothing_left(parent, {"out"})

    # --overwrite that succeeds replaces it, and leaves no backup behind.
    assert run_cli("convert", src2, "--model", CIFAR, "--out", out, "--overwrite", *kwargs) == 0
    x = images()
    with torch.no_grad():
        assert torch.equal(load_dir(out)(x), second(x))
    assert_nothing_left(parent, {"out"})


def test_failure_while_writing_keeps_old_folder_and_removes_staging(tmp_path):
    """A real mid-write failure: timm writes the weights, then refuses a config it cannot serialise."""
    parent = tmp_path / "hub"
    old = save_hub_folder(small_timm(15), parent / "out", CIFAR)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(HubFolderError, match="not serializable"):
        save_hub_folder(small_timm(16), old, CIFAR, overwrite=True, model_args={"act_layer": nn.GELU})
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert_nothing_left(parent, {"out"})
    with pytest.raises(HubFolderError, match="not serializable"):
        save_hub_folder(small_timm(16), parent / "new", CIFAR, model_args={"act_layer": nn.GELU})
    assert_nothing_left(parent, {"out"})
    # Parent folders created for the output go too.
    with pytest.raises(HubFolderError, match="not serializable"):
        save_hub_folder(small_timm(16), parent / "a" / "b" / "new", CIFAR, model_args={"act_layer": nn.GELU})
    assert_nothing_left(parent, {"out"})


def test_unknown_model_names_the_nearest(tmp_path, capsys):
    src = _save(small_timm(17).state_dict(), tmp_path / "w.safetensors")
    assert run_cli("convert", src, "--model", "convmixer_768", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "unknown ConvMixer variant 'convmixer_768'" in err and "Did you mean convmixer_768_32" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [[], ["list"], ["convert"], ["push"], ["demo"]])
def test_help_everywhere_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: convmixer-timm" in out


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_saved_folder_has_the_permissions_the_umask_gives(tmp_path, umask):
    from convmixer_timm.hub.install import current_umask

    previous = os.umask(umask)
    try:
        assert current_umask() == umask and current_umask() == umask  # read, and left as it was
        out = save_hub_folder(small_timm(), tmp_path / "out", CIFAR)
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {path.stat().st_mode & 0o777 for path in out.iterdir()} == {0o666 & ~umask}


def test_reading_the_umask_leaves_other_threads_files_alone(tmp_path):
    # Setting the umask to 0 and back to read it (os.umask's only way) made files another thread created in between
    # world-writable: seen 17 times in 20,000 reads with the thread switch interval this short.
    from convmixer_timm.hub.install import current_umask

    previous, interval = os.umask(0o022), sys.getswitchinterval()
    stop, modes = threading.Event(), []

    def create_files() -> None:
        for i in range(10**6):
            if stop.is_set():
                return
            path = tmp_path / f"f{i}"
            path.write_text("")
            modes.append(path.stat().st_mode & 0o777)
            path.unlink()

    creator = threading.Thread(target=create_files)
    sys.setswitchinterval(1e-6)
    creator.start()
    try:
        for _ in range(20000):
            assert current_umask() == 0o022
    finally:
        stop.set()
        creator.join()
        sys.setswitchinterval(interval)
        os.umask(previous)
    assert modes and set(modes) == {0o644}

"""The shipped train.py recipes use train.py's real option names and value types, and match VARIANTS.

train.py is not installable, so its options are kept as data in ``convmixer_timm/configs/train_args.json``.
With ``TIMM_SCRIPTS_DIR`` pointing at a folder holding timm's train.py, the options are re-derived from it here
and the JSON must still match. To refresh the JSON after a timm update::

    python tests/test_recipes.py /path/to/pytorch-image-models/train.py <timm commit> <timm version>
"""
from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from convmixer_timm.configs import (
    CONFIG_DIR,
    list_recipes,
    load_recipe,
    recipe_for_model,
    recipe_path,
    train_args,
)
from convmixer_timm.models.variants import DATASET_CONFIGS, VARIANTS

# --------------------------------------------------------------------------------------------------------------
# Extraction of argparse options from train.py's source. Only ``ast``: nothing from timm's repository is imported
# or run, so this works on any checkout and cannot execute its code.


def _dotted(node: ast.AST) -> str:
    return ast.unparse(node)


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:  # e.g. ``[3. / 4., 4. / 3.]``: keep the source text, tests never need its value
        return {"expr": ast.unparse(node)}


def _option(call: ast.Call) -> dict[str, Any]:
    flags = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    kw = {k.arg: k.value for k in call.keywords if k.arg}
    if "dest" in kw:
        dest = ast.literal_eval(kw["dest"])
    elif flags[0].startswith("-"):
        long_flags = [f for f in flags if f.startswith("--")]
        dest = (long_flags or flags)[0].lstrip("-").replace("-", "_")
    else:
        dest = flags[0]
    action = kw.get("action")
    return {
        "dest": dest,
        "flags": flags,
        "type": _dotted(kw["type"]) if "type" in kw else None,
        "nargs": ast.literal_eval(kw["nargs"]) if "nargs" in kw else None,
        "choices": _literal(kw["choices"]) if "choices" in kw else None,
        "action": (ast.literal_eval(action) if isinstance(action, ast.Constant) else _dotted(action))
        if action is not None else None,
        "default": _literal(kw["default"]) if "default" in kw else None,
    }


def extract_train_options(source: str) -> dict[str, Any]:
    """Options of train.py's main parser, by dest, plus the dests of its ``--config`` pre-parser.

    Module-level statements are followed in order, tracking which variable names which parser (train.py rebinds
    ``parser`` after the config parser and adds options through argument groups).
    """
    tree = ast.parse(source)
    owner: dict[str, int] = {}  # variable -> parser number
    options: dict[int, dict[str, Any]] = {}
    count = 0
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call):
            func = stmt.value.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            parser_id = None
            if name == "ArgumentParser":
                parser_id, count = count, count + 1
                options[parser_id] = {}
            elif name in ("add_argument_group", "add_mutually_exclusive_group") and isinstance(func, ast.Attribute):
                parser_id = owner.get(_dotted(func.value))
            if parser_id is not None:
                for target in stmt.targets:
                    if isinstance(target, ast.Name):
                        owner[target.id] = parser_id
        for node in ast.walk(stmt):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_argument" and _dotted(node.func.value) in owner):
                opt = _option(node)
                options[owner[_dotted(node.func.value)]][opt["dest"]] = opt
    main = owner["parser"]
    pre = [d for pid, opts in options.items() if pid != main for d in opts]
    return {"options": dict(sorted(options[main].items())), "config_parser_dests": sorted(pre)}


def write_train_args(train_py: Path, commit: str, version: str, out: Path = CONFIG_DIR / "train_args.json") -> None:
    data = {
        "source": "huggingface/pytorch-image-models train.py",
        "timm_commit": commit,
        "timm_version": version,
        "generated_by": "python tests/test_recipes.py TRAIN_PY COMMIT VERSION (ast only, nothing of timm's is run)",
        **extract_train_options(train_py.read_text()),
    }
    out.write_text(json.dumps(data, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Checking a recipe value against an option, the way argparse would have produced it from the command line.

_SCALAR_TYPES = {"int": (int,), "float": (int, float), "str": (str,), None: (str,)}


def _scalar_ok(value: Any, type_name: str | None) -> bool:
    if isinstance(value, bool):  # bool is an int subclass; argparse never yields one for typed options
        return False
    return isinstance(value, _SCALAR_TYPES.get(type_name, (str,)))


def check_value(key: str, value: Any, opt: dict[str, Any]) -> list[str]:
    """Problems with ``key: value`` for train.py option ``opt``; empty when argparse could have produced it."""
    action, nargs, type_name, choices = opt["action"], opt["nargs"], opt["type"], opt["choices"]
    if action in ("store_true", "store_false"):
        return [] if isinstance(value, bool) else [f"{key}: flag wants true/false, got {value!r}"]
    if action is not None and action.endswith("ParseKwargs"):
        return [] if isinstance(value, dict) else [f"{key}: wants a mapping of keyword arguments, got {value!r}"]
    if action is not None:
        return [f"{key}: action {action!r} is not checked by this test; extend check_value"]
    if value is None:
        return [] if opt["default"] is None or nargs == "?" else [f"{key}: null, but the default is not"]
    if nargs in ("+", "*") or isinstance(nargs, int):
        if not isinstance(value, list):
            return [f"{key}: wants a list (nargs={nargs!r}), got {value!r}"]
        if isinstance(nargs, int) and len(value) != nargs:
            return [f"{key}: wants {nargs} values, got {len(value)}"]
        if nargs == "+" and not value:
            return [f"{key}: wants at least one value"]
        items = value
    else:
        items = [value]
    problems = [f"{key}: {item!r} is not of type {type_name or 'str'}" for item in items
                if not _scalar_ok(item, type_name)]
    if isinstance(choices, list | tuple):
        problems += [f"{key}: {item!r} not in {choices}" for item in items if item not in choices]
    return problems


# --------------------------------------------------------------------------------------------------------------
# Tests

IMAGENET_VARIANTS = [v for v in VARIANTS if v.dataset == "imagenet-1k"]
CIFAR_VARIANTS = [v for v in VARIANTS if v.dataset == "cifar-10"]
# The authors' schedule lengths (facts file, "Training recipes"); rows without a published run get 150.
AUTHORS_EPOCHS = {"convmixer_1536_20": 150, "convmixer_1024_20_ks9_p14": 150, "convmixer_768_32": 300}


def test_train_args_json_is_well_formed():
    data = train_args()
    assert len(data["timm_commit"]) == 40
    assert data["options"]["batch_size"]["type"] == "int"
    assert data["options"]["scale"]["nargs"] == "+"
    assert data["options"]["amp"]["action"] == "store_true"
    assert "config" in data["config_parser_dests"] and "config" not in data["options"]


@pytest.mark.parametrize("name", list_recipes())
def test_recipe_keys_and_values_match_train_py(name):
    options = train_args()["options"]
    recipe = load_recipe(name)
    unknown = sorted(set(recipe) - set(options))
    assert not unknown, f"{name}: not train.py options: {unknown}"
    problems = [p for key, value in recipe.items() for p in check_value(key, value, options[key])]
    assert not problems, f"{name}: " + "; ".join(problems)


def test_check_value_catches_what_argparse_would_reject():
    options = train_args()["options"]
    # PyYAML reads 1e-3 as a string (YAML 1.1 wants 1.0e-3); set_defaults would pass it on unconverted.
    assert check_value("opt_eps", "1e-3", options["opt_eps"])
    assert check_value("batch_size", 64.0, options["batch_size"])
    assert check_value("amp", "yes", options["amp"])
    assert check_value("scale", 0.75, options["scale"])
    assert check_value("input_size", [3, 224], options["input_size"])
    assert not check_value("input_size", [3, 224, 224], options["input_size"])
    assert not check_value("lr", 1, options["lr"])  # argparse's float() accepts integers too


@pytest.mark.parametrize("variant", IMAGENET_VARIANTS, ids=lambda v: v.name)
def test_every_imagenet_variant_has_the_authors_recipe(variant):
    recipe = load_recipe(recipe_for_model(variant.name))
    assert recipe["model"] == variant.name
    assert recipe["epochs"] == AUTHORS_EPOCHS.get(variant.name, 150)
    assert recipe["input_size"] == [3, variant.img_size, variant.img_size]
    # The authors' command line (10 x 64 = 640 global batch); lr is scaled by train.py from lr_base.
    expected = dict(batch_size=64, opt="adamw", opt_eps=1e-3, lr_base=0.01, lr_base_size=640, weight_decay=2e-5,
                    smoothing=0.1, aa="rand-m9-mstd0.5-inc1-mmax9", mixup=0.5, cutmix=0.5, reprob=0.25, remode="pixel",
                    clip_grad=1.0)
    assert {k: recipe.get(k) for k in expected} == expected
    assert "lr" not in recipe, "a fixed lr would stop train.py from scaling it with the world size"
    assert recipe["sched"] in {"cosine"}, "onecycle does not exist in today's timm"
    # store_true options cannot be switched off from the command line, so AMP (GPU only) is left to --amp.
    assert "amp" not in recipe


def test_imagenet_lr_scales_with_world_size_like_train_py():
    recipe = load_recipe("convmixer_1536_20")
    for world_size, expected in ((10, 0.01), (1, 0.001), (8, 0.008)):
        # train.py: lr = lr_base * (batch_size * world_size * grad_accum) / lr_base_size, linear scaling
        global_batch = recipe["batch_size"] * world_size
        lr = recipe["lr_base"] * global_batch / recipe["lr_base_size"]
        assert recipe["lr_base_scale"] == "linear"
        assert lr == pytest.approx(expected)


def test_cifar_recipe_covers_every_cifar_variant():
    recipe = load_recipe("cifar10")
    cfg = DATASET_CONFIGS["cifar-10"]
    assert recipe["model"] in {v.name for v in CIFAR_VARIANTS}
    for variant in CIFAR_VARIANTS:
        assert recipe_path(variant.name) == recipe_path("cifar10")
    assert recipe["dataset"] == "torch/cifar10"
    assert recipe["num_classes"] == cfg["num_classes"]
    assert recipe["input_size"] == list(cfg["input_size"])
    assert recipe["mean"] == list(cfg["mean"]) and recipe["std"] == list(cfg["std"])
    expected = dict(batch_size=512, opt="adamw", lr_base=0.05, lr_base_size=512, weight_decay=0.005,
                    aa="rand-m4-n2-inc1", epochs=25, scale=[0.75, 1.0])
    assert {k: recipe.get(k) for k in expected} == expected
    assert "clip_grad" not in recipe  # the authors' CIFAR command does not clip


def test_cifar_randaugment_has_the_strength_of_the_authors_torchvision_one():
    # The authors' CIFAR script: torchvision's RandAugment(num_ops=2, magnitude=12) on its 31-step scale.
    from timm.data.auto_augment import rand_augment_transform
    from torchvision.transforms import RandAugment

    ops = rand_augment_transform(load_recipe("cifar10")["aa"], {}).ops
    assert all(op.prob == 0.5 for op in ops) and len(ops) == 15  # timm's defaults; 2 drawn per image
    ours = {}
    for op in ops:
        if op.level_fn is not None:
            (arg,) = op.level_fn(op.magnitude, op.hparams)  # a random sign where the op has one
            name = op.name.replace("Increasing", "").replace("Rel", "")
            ours[name] = abs(arg - 1) if name in ("Brightness", "Color", "Contrast", "Sharpness") else abs(arg)
    space = RandAugment(num_ops=2, magnitude=12)._augmentation_space(31, (32, 32))
    authors = {name: float(steps[12]) for name, (steps, _) in space.items() if steps.ndim}
    authors["TranslateX"] /= 32  # pixels of a 32 px image, where timm's are relative
    authors["TranslateY"] /= 32
    for name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Brightness", "Color", "Contrast",
                 "Sharpness", "Solarize"):
        assert ours[name] == pytest.approx(authors[name], rel=0.01), name


def test_recipe_lookup_errors_are_clear():
    with pytest.raises(KeyError, match=r"recipes: .*cifar10"):
        recipe_path("resnet50")
    assert recipe_path("convmixer_768_32.in1k") == recipe_path("convmixer_768_32")


def test_recipes_are_package_data():
    # hatchling ships every file under convmixer_timm/ that git does not ignore, so living in the package folder
    # (and not matching .gitignore) is what puts them in the wheel.
    import convmixer_timm

    package_dir = Path(convmixer_timm.__file__).resolve().parent
    for name in list_recipes():
        assert recipe_path(name).parent == package_dir / "configs"
    assert (package_dir / "configs" / "train_args.json").is_file()
    assert len(list_recipes()) == len(IMAGENET_VARIANTS) + 1


@pytest.mark.skipif(not os.environ.get("TIMM_SCRIPTS_DIR"),
                    reason="TIMM_SCRIPTS_DIR not set: no timm train.py to re-derive the options from")
def test_train_args_json_is_current():
    train_py = Path(os.environ["TIMM_SCRIPTS_DIR"]) / "train.py"
    assert train_py.is_file(), f"TIMM_SCRIPTS_DIR has no train.py: {train_py}"
    fresh = json.loads(json.dumps(extract_train_options(train_py.read_text())))  # tuples -> lists, as stored
    recorded = train_args()
    assert fresh["config_parser_dests"] == recorded["config_parser_dests"]
    changed = sorted(k for k in fresh["options"].keys() | recorded["options"].keys()
                     if fresh["options"].get(k) != recorded["options"].get(k))
    assert not changed, (f"train.py options differ from train_args.json (timm {recorded['timm_commit']}): "
                         f"{changed}; regenerate with: python tests/test_recipes.py {train_py} <commit> <version>")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python tests/test_recipes.py PATH/TO/train.py TIMM_COMMIT TIMM_VERSION")
    write_train_args(Path(sys.argv[1]), sys.argv[2], sys.argv[3])


def test_imagenet_augmentation_runs_on_this_stack():
    """The recipes' RandAugment string never asks Pillow for an impossible posterize (see the recipe comment)."""
    import random

    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    aa = load_recipe(recipe_for_model("convmixer_1536_20"))["aa"]
    transform = rand_augment_transform(aa, dict(translate_const=100, img_mean=(124, 116, 104)))
    random.seed(0)
    image = Image.new("RGB", (8, 8), (120, 30, 200))
    for _ in range(4000):  # the unclamped string failed about 1 call in 750 here
        assert transform(image).size == (8, 8)

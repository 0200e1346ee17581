"""Training recipes for timm's ``train.py --config``, shipped as package data.

Each ``*.yaml`` here holds train.py options under their argparse dest names (``batch_size``, ``opt_eps``...):
train.py feeds the file to ``parser.set_defaults``, so anything on the command line still wins::

    RECIPE=$(python -c "from convmixer_timm.configs import recipe_path; print(recipe_path('convmixer_768_32'))")
    python train.py --config "$RECIPE" --data-dir /imagenet

``train_args.json`` lists train.py's options (dest, type, nargs, choices, action), extracted from the timm commit
it names; the tests check every recipe against it.
"""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_DIR", "list_recipes", "load_recipe", "recipe_for_model", "recipe_path", "train_args"]

CONFIG_DIR = Path(__file__).resolve().parent

# One recipe covers every CIFAR-10 variant: the authors trained all of them (the kernel and patch sweeps of the
# paper included) with the same settings, so a per-variant copy would differ in the model name only.
_SHARED_RECIPES = {"cifar-10": "cifar10"}


def list_recipes() -> list[str]:
    """Names of the shipped recipes (file names without ``.yaml``), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def recipe_for_model(model_name: str) -> str:
    """The recipe that trains ``model_name`` (a ``.tag`` suffix is ignored); unknown models raise ``KeyError``."""
    from ..models.variants import get_variant

    variant = get_variant(model_name)
    return _SHARED_RECIPES.get(variant.dataset, variant.name)


def recipe_path(name: str) -> Path:
    """Path of a recipe given its name or a model name, e.g. ``recipe_path("convmixer_1536_20")``.

    Raises:
        KeyError: neither a recipe nor a known ConvMixer variant; the message lists the recipes.
    """
    stem = name[:-5] if name.endswith(".yaml") else name
    path = CONFIG_DIR / f"{stem}.yaml"
    if path.is_file():
        return path
    try:
        path = CONFIG_DIR / f"{recipe_for_model(stem)}.yaml"
    except KeyError:
        path = None
    if path is None or not path.is_file():
        raise KeyError(f"no training recipe {name!r}; recipes: {', '.join(list_recipes())} "
                       "(a ConvMixer model name also works)")
    return path


def load_recipe(name: str) -> dict[str, Any]:
    """A recipe as the dict train.py would pass to ``set_defaults`` (needs PyYAML, which timm depends on)."""
    import yaml

    with recipe_path(name).open() as f:
        recipe = yaml.safe_load(f)
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {name!r} is not a mapping of train.py options")
    return recipe


@cache
def train_args() -> dict[str, Any]:
    """timm train.py's options as recorded in ``train_args.json`` (with the timm commit they came from)."""
    return json.loads((CONFIG_DIR / "train_args.json").read_text())

"""What a Hub folder holds: its file names, the constructor arguments and class names of ``config.json``, and the
digest that recognises published weights.

``config.json`` is timm's own format (written by ``timm.models._hub.save_for_hf``). It keeps only the constructor
arguments that differ from the registered variant, and never ``num_classes`` in ``model_args``, so that
transformers' timm wrapper (which passes ``num_classes`` itself) loads the folder too.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..activations import activation_name
from ..model_card import Architecture
from ..models.checkpoint import read_dimensions
from ..models.variants import Variant

__all__ = ["CARD_NAME", "CONFIG_NAME", "WEIGHTS_NAME", "HubFolderError", "architecture_of",
           "weights_sha256"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"



class HubFolderError(RuntimeError):
    """A Hub folder that cannot be written, or that does not load back as the model it should hold."""


def architecture_of(state_dict: Mapping[str, torch.Tensor], act: str) -> Architecture:
    """Read h, d, k, p, input channels and classes from timm-layout weights (the activation has no weights)."""
    h, d, k, p, in_chans, num_classes = read_dimensions(state_dict)
    return Architecture(h=h, d=d, k=k, p=p, act=act, in_chans=in_chans, num_classes=num_classes)


def activation_of(model: nn.Module, default: str) -> str:
    name = getattr(model, "act_name", None)
    if isinstance(name, str) and name:
        return name.lower()
    # A model that does not name its activation (e.g. the authors' nn.Sequential): its first activation module.
    return next((name for module in model.modules() if (name := activation_name(module))), default)


def _global_pool_of(model: nn.Module) -> str | None:
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    return pool if isinstance(pool, str) else None


def model_args_of(variant: Variant, model: nn.Module, arch: Architecture, overrides: Mapping[str, Any] | None
                ) -> dict[str, Any]:
    """Every constructor argument that fixes the architecture: what the staged folder is rebuilt and checked with."""
    args: dict[str, Any] = dict(dim=arch.h, depth=arch.d, kernel_size=arch.k, patch_size=arch.p,
                                act_layer=arch.act, in_chans=arch.in_chans, num_classes=arch.num_classes)
    pool = _global_pool_of(model)
    if pool is not None:
        args["global_pool"] = pool
    args.update(_batch_norm_args_of(model))
    args.update(overrides or {})
    return args


def _batch_norm_args_of(model: nn.Module) -> dict[str, float]:
    """``bn_momentum`` / ``bn_eps`` where every BatchNorm shares a value other than PyTorch's default: eps
    changes the outputs, so a folder without it would not reproduce the model."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    args: dict[str, float] = {}
    for arg, attribute, default in (("bn_momentum", "momentum", 0.1), ("bn_eps", "eps", 1e-5)):
        values = {getattr(m, attribute) for m in norms}
        if len(values) == 1 and isinstance(value := values.pop(), float) and value != default:
            args[arg] = value
    return args


# Never in config.json's model_args: num_classes has its own top-level field (transformers passes it to
# timm.create_model itself, so a second copy is a TypeError), and timm leaves out drop rates and placement.
_NOT_MODEL_ARGS = frozenset({"num_classes", "drop_rate", "drop_path_rate", "device", "dtype"})


def differing_args(variant: Variant, args: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of ``args`` that differ from what ``timm.create_model(variant.name)`` builds by default.

    Only these go into config.json: timm's ``local-dir:``/``hf-hub:`` loaders and transformers' timm wrapper
    call ``timm.create_model(architecture, **model_args)``, and the registered variant supplies the rest.
    """
    from ..models.convmixer import ConvMixer

    defaults = {name: p.default for name, p in inspect.signature(ConvMixer).parameters.items()
                if p.default is not inspect.Parameter.empty}
    defaults.update(variant.model_args())
    return {k: v for k, v in args.items() if k not in _NOT_MODEL_ARGS and (k not in defaults or defaults[k] != v)}


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of timm-layout weights: names, dtypes, shapes and values, independent of the file format.

    ``Variant.published_sha256`` holds this digest for published weights, so the authors' ``.pth.tar`` and the
    same tensors as ``model.safetensors`` are recognised alike. BatchNorm's ``num_batches_tracked`` counters are
    left out: they never change an output, and copies of the same weights disagree on them.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        if key.endswith("num_batches_tracked"):
            continue
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_transformers_config(folder: Path) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    model_args = config.get("model_args") or {}
    if "num_classes" in model_args:
        raise HubFolderError(
            f"{folder / CONFIG_NAME} repeats num_classes in model_args, so transformers cannot load it (its timm "
            "wrapper passes num_classes itself: TypeError 'got multiple values for keyword argument'); write the "
            f"folder again with `convmixer-timm convert {folder / WEIGHTS_NAME} --model {config.get('architecture')} "
            "--out NEW_DIR` (plus the --num-classes/--model-kwargs the weights need), or delete num_classes from "
            "model_args (the top-level num_classes holds it)")


def keep_differing_args(config_path: Path, model_args: dict[str, Any]) -> None:
    # timm's save_for_hf records every argument, num_classes included (a TypeError in transformers' timm wrapper,
    # which passes num_classes itself); replace them with the differing ones.
    written = json.loads(config_path.read_text(encoding="utf-8"))
    config = {}
    for key, value in written.items():
        if key == "pretrained_cfg" and model_args:  # where save_for_hf puts model_args
            config["model_args"] = model_args
        if key != "model_args":
            config[key] = value
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")

"""Activation names: the one table the model, the speed layer and the Hub folders read.

Models are built from timm's activation names ('gelu', 'relu', ...), config.json stores those names, and the fused
inference kernel computes two of them exactly. torch only: the speed layer imports this and never timm.
"""
from __future__ import annotations

from torch import nn

__all__ = ["KERNEL_ACTIVATIONS", "activation_name"]

# Exact classes only: a subclass may compute something else.
_NAMES_BY_CLASS = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Hardswish: "hard_swish", nn.Mish: "mish"}
# timm's own classes, by name, so that this module needs no timm import.
_TIMM_NAMES = {"GELU": "gelu", "GELUTanh": "gelu_tanh"}
# What convmixer_kernels.cpp's spatial-mixing kernel computes (GELU in its exact erf form).
KERNEL_ACTIVATIONS = ("gelu", "relu")


def activation_name(act: str | type | nn.Module) -> str | None:
    """timm's name of an activation given by name, class or module; None where it is not one we know."""
    if isinstance(act, str):
        return act.lower()
    cls = type(act) if isinstance(act, nn.Module) else act
    approximate = getattr(act, "approximate", "none") if isinstance(act, nn.Module) else "none"
    if cls is nn.GELU or (isinstance(cls, type) and cls.__module__.startswith("timm.") and cls.__name__ == "GELU"):
        return "gelu" if approximate == "none" else "gelu_tanh"
    if isinstance(cls, type) and cls.__module__.startswith("timm.") and cls.__name__ in _TIMM_NAMES:
        return _TIMM_NAMES[cls.__name__]
    return _NAMES_BY_CLASS.get(cls)

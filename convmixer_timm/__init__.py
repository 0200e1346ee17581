"""convmixer-timm: the ConvMixer family as a timm plugin.

Importing this package (or any of its modules) registers every model with timm: at once when timm is already
imported, otherwise the moment timm is (before any program can ask timm for a model). Programs that only
``import timm`` get them too, through the ``convmixer_timm.pth`` start-up hook installed beside the package, which
imports this package (standard library only) unless ``CONVMIXER_TIMM_AUTOLOAD=0``.

The public names below load on first use (PEP 562), so that importing a light submodule, such as
``convmixer_timm.configs`` (``recipe_path`` for train.py), does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _autoload

__version__ = "0.1.0"

_EXPORTS = {
    "export_onnx": ".export",
    "optimize_for_inference": ".speed",
    "restore_cpu_allocator": ".speed",
    **dict.fromkeys((
        "VARIANTS", "VARIANTS_BY_NAME", "CheckpointError", "ConvMixer", "Variant", "get_variant",
        "load_checkpoint_file", "to_timm_layout",
    ), ".models"),
}

__all__ = [
    "VARIANTS",
    "VARIANTS_BY_NAME",
    "CheckpointError",
    "ConvMixer",
    "Variant",
    "__version__",
    "export_onnx",
    "get_variant",
    "load_checkpoint_file",
    "optimize_for_inference",
    "restore_cpu_allocator",
    "to_timm_layout",
]

if TYPE_CHECKING:
    from .export import export_onnx
    from .models import (
        VARIANTS,
        VARIANTS_BY_NAME,
        CheckpointError,
        ConvMixer,
        Variant,
        get_variant,
        load_checkpoint_file,
        to_timm_layout,
    )
    from .speed import optimize_for_inference, restore_cpu_allocator


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # AttributeError also lets `from convmixer_timm import cli` fall through to the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


# One mechanism for every import order (_autoload.py): register now if timm is imported, else when it is.
_autoload.install()

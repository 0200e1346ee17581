"""convmixer-timm: the ConvMixer family as a timm plugin.

Importing this package registers every model with timm: at once when timm is already imported, otherwise the
moment timm is (before any program can ask timm for a model). Programs that only ``import timm`` get them too,
through the ``convmixer_timm.pth`` start-up hook installed beside the package.

The public names below load on first use (PEP 562), so that importing a light submodule, such as
``convmixer_timm.configs`` (``recipe_path`` for train.py), does not import torch.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from typing import TYPE_CHECKING, Any

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


def _register() -> None:
    try:
        importlib.import_module(".models", __name__)
    except Exception as exc:  # never break ``import timm`` because of the plugin
        warnings.warn(f"convmixer-timm could not register its models: {exc!r}", stacklevel=2)


class _RegisterWhenTimmLoads:
    """One-shot meta-path finder: registers the models right after timm's own import finishes."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding this finder again
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if "timm" in sys.modules:
    importlib.import_module(".models", __name__)
elif not any(isinstance(f, _RegisterWhenTimmLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTimmLoads())

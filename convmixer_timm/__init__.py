"""convmixer-timm: the ConvMixer family as a timm plugin.

Importing this package registers every model with timm. Programs that only ``import timm`` get them too,
through the ``convmixer_timm.pth`` start-up hook installed beside the package.
"""
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

__version__ = "0.1.0"

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

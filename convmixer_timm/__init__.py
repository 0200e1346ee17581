"""convmixer-timm: the ConvMixer family as a timm plugin.

Importing this package registers every model with timm. Programs that only ``import timm`` get them too,
through the ``convmixer_timm.pth`` start-up hook installed beside the package.
"""
from .export import export_onnx
from .inference import optimize_for_inference
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
    "to_timm_layout",
]

"""ConvMixer architecture, variants and checkpoint conversion; importing this registers the models with timm."""
from .checkpoint import CheckpointError, detect_layout, load_checkpoint_file, to_timm_layout
from .convmixer import ConvMixer, ConvMixerBlock, ConvMixerStem, DepthwiseMixing, SamePaddingDepthwiseConv
from .variants import VARIANTS, VARIANTS_BY_NAME, Variant, get_variant

__all__ = [
    "VARIANTS", "VARIANTS_BY_NAME", "CheckpointError", "ConvMixer", "ConvMixerBlock", "ConvMixerStem",
    "DepthwiseMixing", "SamePaddingDepthwiseConv", "Variant", "detect_layout", "get_variant",
    "load_checkpoint_file", "to_timm_layout",
]

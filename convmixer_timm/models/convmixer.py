"""ConvMixer, "Patches Are All You Need?" (Trockman & Kolter, TMLR 2023, arXiv 2201.09792).

    stem : patch embedding, Conv(p x p, stride p) -> act -> BN
    block: x = x + BN(act(DepthwiseConv_k(x)))    (spatial mixing, residual)
           x = BN(act(PointwiseConv(x)))           (channel mixing)
    head : global pool -> dropout -> Linear

State-dict keys are those of timm's built-in ``timm.models.convmixer`` (``stem.0``, ``blocks.{i}.0.fn.0``, ...),
so the published ``timm/convmixer_*.in1k`` weights load unchanged; checkpoints in the authors' original
``nn.Sequential`` layout and the labml.ai layout are converted on load (see ``checkpoint.py``).
"""

import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    SelectAdaptivePool2d,
    get_act_layer,
    get_device_dtype,
    register_notrace_module,
)
from timm.models import build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

# The one seam to the speed layer (convmixer_timm/speed): names imported as globals, which FX wraps as leaves.
from ..activations import activation_name
from ..speed.layers import (
    BatchNorm2d,
    DeferredInference,
    add_in_place_pays,
    conv_same,
    depthwise_conv_for_training,
    has_hooks,
    layout_for_cpu_training,
    match_memory_format,
    run_layers,
)
from .checkpoint import check_shapes_before_load, checkpoint_filter_fn
from .pretrained import check_pretrained_available
from .variants import DATASET_CONFIGS, VARIANTS, Variant

__all__ = ["ConvMixer", "ConvMixerBlock", "ConvMixerStem", "DepthwiseMixing", "SamePaddingDepthwiseConv"]

ActLayer = Union[str, Type[nn.Module]]


def _create_act(act_layer: ActLayer) -> nn.Module:
    try:
        layer = get_act_layer(act_layer)
    except KeyError:
        layer = None
    if layer is None:
        raise ValueError(f"unknown activation {act_layer!r}: use a timm activation name such as 'gelu' or 'relu'")
    return layer()


def _act_name(act_layer: ActLayer) -> str:
    return activation_name(act_layer) or getattr(act_layer, "__name__", str(act_layer)).lower()


# PyTorch's BatchNorm defaults, which timm's train.py keeps unless --bn-momentum / --bn-eps are given.
BN_MOMENTUM = 0.1
BN_EPS = 1e-5


def _batch_norm_args(bn_momentum: Optional[float], bn_eps: Optional[float]) -> Dict[str, float]:
    """Every BatchNorm's momentum and eps; None keeps PyTorch's default (timm's ``resolve_bn_args`` convention)."""
    momentum = BN_MOMENTUM if bn_momentum is None else bn_momentum
    eps = BN_EPS if bn_eps is None else bn_eps
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"bn_momentum must be a number in [0, 1] (PyTorch's default is 0.1), got {bn_momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < float("inf"):
        raise ValueError(f"bn_eps must be a positive number (PyTorch's default is 1e-5), got {bn_eps!r}")
    return {"bn_momentum": float(momentum), "bn_eps": float(eps)}


def check_input_channels(x: torch.Tensor, in_chans: int) -> None:
    """Fail early, naming the expected channels, instead of deep inside the stem convolution.

    The error types are those timm's built-in raises for the same input: ``ValueError`` for an unbatched 3-d
    image (its BatchNorm's), ``RuntimeError`` for any other shape (its convolution's).
    """
    if x.dim() != 4 or x.shape[1] != in_chans:
        shape = [int(size) for size in x.shape]  # numbers, also while tracing (where sizes are tensors)
        if x.dim() == 3:
            fix = "add the batch dimension (x.unsqueeze(0))"
        else:
            fix = "build the model with in_chans=" + str(shape[1] if x.dim() == 4 else 3) + " or convert the input"
        message = ("ConvMixer expects images of shape (N, " + str(in_chans) + ", H, W) but got " + str(shape)
                   + "; " + fix)
        if x.dim() == 3:
            raise ValueError(message)
        raise RuntimeError(message)


class ConvMixerStem(nn.Sequential):
    """Patch embedding: a p x p convolution with stride p, then activation and BatchNorm."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, act_layer: ActLayer,
                 bn_momentum: float = BN_MOMENTUM, bn_eps: float = BN_EPS, device=None, dtype=None):
        super().__init__(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, device=device, dtype=dtype),
            _create_act(act_layer),
            BatchNorm2d(dim, eps=bn_eps, momentum=bn_momentum, device=device, dtype=dtype),
        )
        self.in_chans = in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_channels(x, self.in_chans)
        if not torch.jit.is_scripting():
            return _run_layers(self, layout_for_cpu_training(self, x))
        for module in self:
            x = module(x)
        return x


class SamePaddingDepthwiseConv(nn.Conv2d):
    """Depthwise k x k convolution that keeps the grid size for odd and even k.

    For even k PyTorch's ``padding="same"`` pads (k-1)//2 before and k//2 after; ONNX export uses an explicit pad
    with the same result instead, because ``"same"`` has a history of export failures.
    """

    def __init__(self, dim: int, kernel_size: int, device=None, dtype=None):
        super().__init__(dim, dim, kernel_size, groups=dim, padding=kernel_size // 2 if kernel_size % 2 else 0,
                         device=device, dtype=dtype)
        before, after = (kernel_size - 1) // 2, kernel_size // 2
        self.explicit_pad: Tuple[int, int, int, int] = (before, after, before, after)
        self.needs_explicit_pad = kernel_size % 2 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.conv_same(x)
        return same_padding_depthwise_conv(self, x)

    def conv_same(self, x: torch.Tensor) -> torch.Tensor:
        return conv_same(x, self.weight, self.bias)


@torch.jit.unused
def same_padding_depthwise_conv(conv: SamePaddingDepthwiseConv, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; one FX node that reads ``conv.training`` when it runs, like the call of a leaf module."""
    if conv.training:
        return depthwise_conv_for_training(x, conv.weight, conv.bias)
    if torch.onnx.is_in_onnx_export():
        return F.conv2d(F.pad(x, conv.explicit_pad), conv.weight, conv.bias, groups=conv.groups)
    return conv.conv_same(x)


@torch.jit.unused
def _run_layers(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)``, an activation and the BatchNorm after it as one operator where the speed layer's
    ``run_layers`` finds that exact (a CPU training step, no hooks, no FX tracing); else module by module."""
    return run_layers(layers, x)[0]


class _ActBatchNormSequential(nn.Sequential):
    """An ``nn.Sequential`` whose activation-BatchNorm pairs may run as one operator (:func:`_run_layers`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            return _run_layers(self, x)
        for module in self:
            x = module(x)
        return x


class DepthwiseMixing(_ActBatchNormSequential):
    """Spatial mixing inside a block: depthwise conv -> act -> BN."""

    def __init__(self, dim: int, kernel_size: int, act_layer: ActLayer, bn_momentum: float = BN_MOMENTUM,
                 bn_eps: float = BN_EPS, device=None, dtype=None):
        super().__init__(
            SamePaddingDepthwiseConv(dim, kernel_size, device=device, dtype=dtype),
            _create_act(act_layer),
            BatchNorm2d(dim, eps=bn_eps, momentum=bn_momentum, device=device, dtype=dtype),
        )


class Residual(nn.Module):
    """``x + drop_path(fn(x))``; the attribute name ``fn`` keeps timm's and the authors' weight keys."""

    def __init__(self, fn: nn.Module, drop_path: float = 0.0):
        super().__init__()
        self.fn = fn
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            return _residual(self, x)
        return x + self.drop_path(self.fn(x))


@torch.jit.unused
def _residual(residual: Residual, x: torch.Tensor) -> torch.Tensor:
    """``x + drop_path(fn(x))``. In eager training where ``fn`` ended in the fused activation-BatchNorm operator,
    whose output no backward saves, ``x`` is added into that output instead of a fresh tensor where that saves a
    mapping of its own (the same sum, bit for bit). Anywhere something could see ``fn``'s output (hooks, FX,
    compiled graphs), as written."""
    fn, drop_path = residual.fn, residual.drop_path
    if (type(fn) is DepthwiseMixing and type(drop_path) is nn.Identity and not isinstance(x, torch.fx.Proxy)
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not has_hooks(fn, drop_path)):
        out, fused = run_layers(fn, x)
        if fused and out.shape == x.shape and out.dtype == x.dtype and add_in_place_pays(out):
            return out.add_(x)
        return x + out
    return x + drop_path(fn(x))


class ConvMixerBlock(_ActBatchNormSequential):
    """One ConvMixer layer: residual depthwise (spatial) mixing, then pointwise (channel) mixing, no residual."""

    def __init__(self, dim: int, kernel_size: int, act_layer: ActLayer, drop_path: float = 0.0,
                 bn_momentum: float = BN_MOMENTUM, bn_eps: float = BN_EPS, device=None, dtype=None):
        bn = {"bn_momentum": bn_momentum, "bn_eps": bn_eps}
        super().__init__(
            Residual(DepthwiseMixing(dim, kernel_size, act_layer, **bn, device=device, dtype=dtype), drop_path),
            nn.Conv2d(dim, dim, kernel_size=1, device=device, dtype=dtype),
            _create_act(act_layer),
            BatchNorm2d(dim, eps=bn_eps, momentum=bn_momentum, device=device, dtype=dtype),
        )


class ConvMixer(nn.Module):
    """ConvMixer-h/d with kernel k and patch p, following timm's model interface."""

    def __init__(
            self,
            dim: int,
            depth: int,
            kernel_size: int = 9,
            patch_size: int = 7,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            act_layer: ActLayer = "gelu",
            bn_momentum: Optional[float] = None,
            bn_eps: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Hidden dimension h (channels after the stem, constant through the network).
            depth: Number of ConvMixer blocks d.
            kernel_size: Depthwise kernel k; odd or even (even keeps the grid like ``padding="same"``).
            patch_size: Patch size p of the stem; the grid is ``img_size // p`` everywhere after it.
            in_chans: Input image channels.
            num_classes: Classifier outputs; 0 for a feature extractor with no head.
            global_pool: timm pooling type ('avg', 'max', 'avgmax', 'catavgmax', '' for none).
            drop_rate: Dropout before the classifier.
            drop_path_rate: Stochastic depth on the residual branch, rising linearly to this value over depth.
            act_layer: Activation by timm name ('gelu', 'relu', ...) or class; names keep config.json serialisable.
            bn_momentum: Momentum of every BatchNorm's running statistics (train.py ``--bn-momentum``); None for
                PyTorch's 0.1.
            bn_eps: Epsilon of every BatchNorm (train.py ``--bn-eps``); None for PyTorch's 1e-5.
        """
        super().__init__()
        for arg, value in (("dim", dim), ("depth", depth), ("kernel_size", kernel_size), ("patch_size", patch_size),
                           ("in_chans", in_chans)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ConvMixer {arg} must be a positive integer, got {value!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        bn = _batch_norm_args(bn_momentum, bn_eps)
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = dim
        self.kernel_size = kernel_size
        self.patch_size = patch_size
        self.act_name = _act_name(act_layer)
        self.grad_checkpointing = False

        self.stem = ConvMixerStem(in_chans, dim, patch_size, act_layer, **bn, **dd)
        drop_path_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            ConvMixerBlock(dim, kernel_size, act_layer, drop_path=dpr, **bn, **dd) for dpr in drop_path_rates
        ])
        self.feature_info = [dict(num_chs=dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        # Runs before any parameter is copied, so a checkpoint of another layout is converted and one of another
        # shape is refused with the model untouched (PyTorch would otherwise copy the matching part first).
        self._register_load_state_dict_pre_hook(check_shapes_before_load, with_module=True)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^stem", blocks=r"^blocks\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
            self.global_pool.train(self.training)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns block outputs.

        Args:
            x: Input images.
            indices: Take the last n blocks if int, all if None, these block indices if a sequence.
            norm: Unused; ConvMixer has no final norm.
            stop_early: Stop after the last requested block.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediates.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        images = x
        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:  # TorchScript cannot slice a Sequential
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x)
            else:
                x = block(x)
            if i in take_indices:
                intermediates.append(self._caller_format(x, images))
        if intermediates_only:
            return intermediates
        return self._caller_format(x, images), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last requested intermediate (and the head, if asked)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        images = x
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self._caller_format(x, images)

    def _caller_format(self, x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        # CPU training runs channels_last inside (the stem's layout_for_cpu_training); what leaves the model is
        # in the caller's format, as with timm's built-in (train.py --channels-last is how a timm user asks).
        if torch.jit.is_scripting():
            return x
        return match_memory_format(x, images)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


# FX cannot branch on a traced tensor's shape, device or a module's mode: each of these is one call in a traced
# graph (torch.fx.symbolic_trace, torchvision's and timm's feature extractors), evaluated when the graph runs.
# timm's own tracer (its FX feature extraction, then often TorchScript) keeps these as leaf modules, like
# nn.BatchNorm2d and nn.Conv2d in timm's built-in; their forwards script.
register_notrace_module(BatchNorm2d)
register_notrace_module(SamePaddingDepthwiseConv)
_FX_LEAVES = ("check_input_channels", "match_memory_format", "same_padding_depthwise_conv")
for _fx_leaf in _FX_LEAVES:
    torch.fx.wrap(_fx_leaf)
del _fx_leaf


def _create_convmixer(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    out_indices = kwargs.pop("out_indices", 3)
    # timm's validate.py / benchmark.py ask for optimize_for_inference with --model-kwargs (speed/deferred.py).
    precision = kwargs.pop("inference_precision", None)
    calibration = {key: kwargs.pop(key) for key in ("calibration_dir", "calibration_images", "calibration_config")
                   if key in kwargs}
    if pretrained:  # without the network: a clear error in seconds instead of huggingface_hub's retries
        check_pretrained_available(variant, kwargs)
    model = build_model_with_cfg(
        ConvMixer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )
    if precision is None:
        if calibration:
            raise ValueError(f"{sorted(calibration)} apply only with inference_precision='fp32', 'bf16' or 'int8'")
        return model
    return DeferredInference(model, precision, **calibration)


def _cfg(variant: Variant) -> Dict[str, Any]:
    cfg: Dict[str, Any] = dict(
        url="", classifier="head", first_conv="stem.0", license="mit", **DATASET_CONFIGS[variant.dataset],
        paper_ids="arXiv:2201.09792", paper_name="Patches Are All You Need?",
        origin_url="https://github.com/locuslab/convmixer",
    )
    if variant.weights_tag:
        cfg["hf_hub_id"] = "timm/"
    return cfg


default_cfgs = generate_default_cfgs({
    f"{v.name}.{v.weights_tag}" if v.weights_tag else v.name: _cfg(v) for v in VARIANTS
})


def _make_entrypoint(variant: Variant) -> Callable[..., ConvMixer]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> ConvMixer:
        model_args = {**variant.model_args(), **kwargs}
        return _create_convmixer(variant.name, pretrained, **model_args)

    entrypoint.__name__ = entrypoint.__qualname__ = variant.name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (
        f"ConvMixer-{variant.h}/{variant.d}, kernel {variant.k}, patch {variant.p}, {variant.act.upper()}, "
        f"{variant.dataset} ({variant.img_size} px)."
    )
    return entrypoint


def _register_all() -> None:
    """Register every variant through timm's public ``register_model``, superseding timm's three built-in names.

    timm's ``register_model`` replaces an existing name together with its pretrained configs, with a warning that
    is expected here and so silenced. If a registration fails part-way, timm's own entry points are registered
    again before the error propagates, so timm keeps working models under its names.
    """
    import sys

    from timm.models import is_model

    entrypoints = [_make_entrypoint(variant) for variant in VARIANTS]
    superseded = [entrypoint.__name__ for entrypoint in entrypoints if is_model(entrypoint.__name__)]
    try:
        for entrypoint in entrypoints:
            globals()[entrypoint.__name__] = entrypoint
            _register_quietly(entrypoint)
    except BaseException:
        timm_convmixer = sys.modules.get("timm.models.convmixer")
        for name in superseded:
            builtin = getattr(timm_convmixer, name, None)
            if builtin is not None:
                _register_quietly(builtin)
        raise


def _register_quietly(entrypoint: Callable[..., Any]) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f"Overwriting {entrypoint.__name__} in registry")
        register_model(entrypoint)


_register_all()

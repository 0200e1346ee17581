"""The fused eval-only ConvMixer: BatchNorm folded, oneDNN's fused convolutions and the spatial-mixing kernel.

What it does differently from the eval-mode model, all exact up to float32 rounding:

* channels_last everywhere, with oneDNN's fused convolution + activation (``mkldnn._convolution_pointwise``) for
  the stem, the depthwise and (where measured faster) the pointwise convolutions, so activations never take a
  pass of their own;
* the BatchNorm after the depthwise branch is ``x + s1 * act(.) + t1``: the shift ``t1`` is constant across
  space, so it folds into the next 1x1 convolution's bias (``W @ t1``), and the scale goes into one in-place
  ``addcmul`` that also does the residual add;
* the BatchNorm after each pointwise convolution cannot fold into the next depthwise convolution, because that
  convolution zero-pads its input and ``s * 0 + t != 0`` on the border; it is one in-place affine pass instead.
  The last one folds into the classifier, since global average pooling commutes with a per-channel affine map;
* even kernels (k=8) use the symmetric padding k//2 and drop the first output row and column, which equals
  PyTorch's ``padding="same"`` (3 before, 4 after) without an ``F.pad`` copy;
* intermediate results are written into tensors the module already holds where an op allows it: on CPU a fresh
  large tensor costs page faults that, for the CIFAR shapes, take as long as the arithmetic.

``precision="bf16"`` runs the blocks in bf16: the 1x1 convolutions with bf16 weights (oneDNN's bf16 convolution or
``addmm``), the spatial mixing on the kernel's bf16 copy (float32 sums and BatchNorm affines, the result rounded
once to bf16). The patch embedding, its BatchNorm (applied by the first block's kernel as it reads the float32
embedding) and the classifier stay float32: rounding the embedding before its BatchNorm flipped answers.

:func:`supported` says whether a model can take this path; :mod:`.autotune` decides whether it should.
"""
from __future__ import annotations

import functools
from collections.abc import Collection, Sequence

import torch
from torch import nn

from ..activations import KERNEL_ACTIVATIONS, activation_name
from .depthwise import crop_to_same
from .loader import load
from .mixing import spatial_mixing, spatial_mixing_bf16

__all__ = ["FusedConvMixerInference", "act_kind", "bf16_convolutions", "supported"]

@functools.cache
def bf16_convolutions() -> bool:
    """Whether oneDNN runs bf16 convolutions on this CPU (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; it refuses elsewhere)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def act_kind(module: nn.Module) -> str | None:
    """The activation's name where the spatial-mixing kernel computes it exactly, else None."""
    name = activation_name(module)
    return name if name in KERNEL_ACTIVATIONS else None


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    # Folding in float64 keeps the folded weights as close to the unfolded arithmetic as float32 allows.
    var = bn.running_var.double()
    scale = bn.weight.double() / torch.sqrt(var + bn.eps) if bn.affine else 1.0 / torch.sqrt(var + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        shift = shift + bn.bias.double()
    return scale, shift


def supported(model: nn.Module) -> bool:
    """Whether :class:`FusedConvMixerInference` can run ``model`` exactly (a float32 CPU ConvMixer with GELU or
    ReLU, BatchNorm with running statistics, average pooling); anything else runs as the plain eval model."""
    try:
        stem, blocks = model.stem, model.blocks
        acts = [act_kind(stem[1])]
        for blk in blocks:
            acts += [act_kind(blk[0].fn[1]), act_kind(blk[2])]
            if not isinstance(getattr(blk[0], "drop_path", nn.Identity()), nn.Identity) and model.training:
                return False
        bns = [stem[2]] + [m for blk in blocks for m in (blk[0].fn[2], blk[3])]
        pool_ok = getattr(model.global_pool, "pool_type", None) == "avg" and model.global_pool.flatten is not None
    except (AttributeError, IndexError, TypeError):
        return False
    param = next(model.parameters(), None)
    return (
        param is not None and param.device.type == "cpu" and param.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and len(set(acts)) == 1 and acts[0] in KERNEL_ACTIVATIONS
        and all(isinstance(b, nn.BatchNorm2d) and b.track_running_stats and b.running_var is not None for b in bns)
        and pool_ok and isinstance(model.head, (nn.Linear, nn.Identity))
    )


class _Block(nn.Module):
    def __init__(self, blk: nn.Module, dtype: torch.dtype):
        super().__init__()
        dw, pw = blk[0].fn[0], blk[1]
        s1, t1 = _bn_affine(blk[0].fn[2])
        s2, t2 = _bn_affine(blk[3])
        dim = pw.weight.shape[0]
        self.kernel_size = int(dw.weight.shape[-1])
        w = pw.weight.detach().double().reshape(dim, dim)
        b = pw.bias.detach().double() if pw.bias is not None else torch.zeros(dim, dtype=torch.float64)
        self.register_buffer("dw_w", dw.weight.detach().float().contiguous())
        self.register_buffer("dw_w_kkc", dw.weight.detach().float()[:, 0].permute(1, 2, 0).contiguous())
        self.register_buffer("dw_b", dw.bias.detach().float().clone() if dw.bias is not None else torch.zeros(dim))
        self.register_buffer("s1", s1.float().view(1, dim, 1, 1))
        self.register_buffer("pw_w", w.to(dtype).view(dim, dim, 1, 1).contiguous())
        self.register_buffer("pw_wt", w.t().to(dtype).contiguous())
        self.register_buffer("pw_b", (b + w @ t1).to(dtype))
        self.register_buffer("s2", s2.float().view(1, dim, 1, 1))
        self.register_buffer("t2", t2.float().view(1, dim, 1, 1))


class FusedConvMixerInference(nn.Module):
    """Eval-only ConvMixer with BatchNorm folded and fused kernels; build it with :func:`optimize_for_inference`.

    ``pointwise`` is ``"conv"`` (oneDNN 1x1 convolution with the activation fused) or ``"mm"`` (``addmm`` written
    straight into a held tensor, then the activation in place). ``depthwise`` is ``"kernel"`` (the compiled
    spatial-mixing kernel: depthwise conv, activation, both BatchNorm affines and the residual in one pass,
    ``convmixer_timm.speed.spatial_mixing``) or ``"onednn"`` (oneDNN's depthwise conv with the activation fused,
    then the affine passes); ``None`` takes the kernel where it is built. ``precision`` is ``"fp32"`` (exact up to
    float32 rounding) or ``"bf16"`` (the blocks in bf16, see the module docstring; needs the kernel, and
    ``pointwise="conv"`` needs :func:`bf16_convolutions`); input and output are float32 either way."""

    def __init__(self, model: nn.Module, pointwise: str = "conv", depthwise: str | None = None,
                 precision: str = "fp32"):
        super().__init__()
        if pointwise not in ("conv", "mm"):
            raise ValueError(f"pointwise must be 'conv' or 'mm', got {pointwise!r}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if precision == "bf16" and load() is None:
            raise RuntimeError("precision='bf16' runs the spatial mixing on the compiled kernels, which are not "
                               "loaded here (see convmixer_timm.speed.kernel_info()); use precision='fp32'")
        if depthwise is None:
            depthwise = "kernel" if load() is not None else "onednn"
        if depthwise not in ("kernel", "onednn"):
            raise ValueError(f"depthwise must be 'kernel' or 'onednn', got {depthwise!r}")
        if depthwise == "kernel" and load() is None:
            raise RuntimeError("depthwise='kernel' needs the compiled kernels (a C++ compiler); use 'onednn'")
        self._check_implementations(pointwise, depthwise, precision)
        self.pointwise = pointwise
        self.depthwise = depthwise
        self.precision = precision
        self.block_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.act = act_kind(model.stem[1])
        stem_conv = model.stem[0]
        self.patch_size = int(stem_conv.stride[0])
        self.in_chans = int(stem_conv.weight.shape[1])
        self.register_buffer("stem_w", stem_conv.weight.detach().float().contiguous())
        self.register_buffer("stem_b", stem_conv.bias.detach().float().clone())
        s0, t0 = _bn_affine(model.stem[2])
        dim = stem_conv.weight.shape[0]
        self.register_buffer("stem_s", s0.float().view(1, dim, 1, 1))
        self.register_buffer("stem_t", t0.float().view(1, dim, 1, 1))
        self.blocks = nn.ModuleList(_Block(blk, self.block_dtype) for blk in model.blocks)
        # avg-pool(s * u + t) = s * avg-pool(u) + t, so the last BatchNorm folds into the classifier.
        head = model.head
        if len(self.blocks):
            s_last, t_last = _bn_affine(model.blocks[-1][3])
        else:
            s_last, t_last = s0, t0
        self.has_head = isinstance(head, nn.Linear)
        if self.has_head:
            hw = head.weight.detach().double()
            hb = head.bias.detach().double() if head.bias is not None else torch.zeros(hw.shape[0], dtype=hw.dtype)
            self.register_buffer("head_w", (hw * s_last).float())
            self.register_buffer("head_b", (hb + hw @ t_last).float())
        else:
            self.register_buffer("head_w", s_last.float())
            self.register_buffer("head_b", t_last.float())
        # oneDNN wants weights in a blocked layout that depends on the input shape; reordering them once per
        # shape instead of on every call saves 10-25% of each convolution (measured on the 1x1 convolutions).
        self._packed: dict[tuple, list[torch.Tensor | None]] = {}
        self.eval()

    @staticmethod
    def _check_implementations(pointwise: str, depthwise: str, precision: str) -> None:
        if precision == "bf16" and depthwise != "kernel":
            raise ValueError("precision='bf16' runs the spatial mixing on the kernel: use depthwise='kernel'")
        if precision == "bf16" and pointwise == "conv" and not bf16_convolutions():
            raise RuntimeError("oneDNN runs no bf16 convolution on this CPU (it needs AVX-512 BW/VL/DQ or "
                               "AVX-NE-CONVERT): use pointwise='mm'")

    def _packed_weights(self, x: torch.Tensor, grid: tuple[int, int], depthwise: str) -> list[torch.Tensor | None]:
        # [stem, then per block: depthwise (None where the compiled kernel reads dw_w_kkc instead), pointwise]
        key = (*x.shape, depthwise)
        packed = self._packed.get(key)
        if packed is None:
            if len(self._packed) >= 8:  # many input shapes: keep memory bounded
                self._packed.clear()
            reorder = torch.ops.mkldnn._reorder_convolution_weight
            n = x.shape[0]
            dim = self.stem_w.shape[0]
            p = self.patch_size
            inner = [n, dim, *grid]
            packed: list[torch.Tensor | None] = [reorder(self.stem_w, [0, 0], [p, p], [1, 1], 1, list(x.shape))]
            pack_pointwise = self.block_dtype == torch.float32 or bf16_convolutions()
            for blk in self.blocks:
                k = blk.kernel_size
                onednn = depthwise == "onednn"
                packed.append(reorder(blk.dw_w, [k // 2, k // 2], [1, 1], [1, 1], dim, inner) if onednn else None)
                packed.append(reorder(blk.pw_w, [0, 0], [1, 1], [1, 1], 1, inner) if pack_pointwise else None)
            self._packed[key] = packed
        return packed

    def release(self, image: Sequence[int], batches: Collection[int] | None = None) -> None:
        """Drop the weights packed for inputs of image size ``image`` (C, H, W) whose batch size is in
        ``batches`` (every batch size where ``None``), for every depthwise implementation."""
        if len(image) != 3:  # no 4-d input of this image size ran, so nothing was packed for it
            return
        image = self._cropped(image)  # the weights are packed for the cropped input
        for key in list(self._packed):  # list(): other threads may add shapes meanwhile
            if tuple(key[1:-1]) == image and (batches is None or key[0] in batches):
                self._packed.pop(key, None)

    def _cropped(self, image: Sequence[int]) -> tuple[int, ...]:
        """(C, H, W) with H and W cut down to multiples of the patch size: what the stem reads."""
        channels, height, width = image
        p = self.patch_size
        return (int(channels), int(height) // p * p, int(width) // p * p)

    def _apply(self, fn, recurse=True):  # .to()/.float() etc. invalidate the packed copies
        self._packed = {}
        return super()._apply(fn, recurse)

    def _conv_act(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, padding: int, stride: int,
                  groups: int) -> torch.Tensor:
        scalars: list = [None] if self.act == "gelu" else []
        algorithm = "none" if self.act == "gelu" else ""
        return torch.ops.mkldnn._convolution_pointwise(
            x, w, b, [padding, padding], [stride, stride], [1, 1], groups, self.act, scalars, algorithm)

    def _pointwise(self, z: torch.Tensor, y: torch.Tensor, blk: _Block, packed_w: torch.Tensor,
                   pointwise: str) -> torch.Tensor:
        if pointwise == "mm":
            # y is dead once z exists, so the matmul writes into its memory (where the dtypes agree): no fresh tensor.
            dim = y.shape[1]
            z2 = z.permute(0, 2, 3, 1).reshape(-1, dim)
            if y.dtype == z.dtype:
                torch.addmm(blk.pw_b, z2, blk.pw_wt, out=y.permute(0, 2, 3, 1).reshape(-1, dim))
            else:
                y = torch.addmm(blk.pw_b, z2, blk.pw_wt).view(z.shape[0], *z.shape[2:], dim).permute(0, 3, 1, 2)
            return y.relu_() if self.act == "relu" else torch._C._nn.gelu_(y)
        return self._conv_act(z, packed_w, blk.pw_b, 0, 1, 1)

    def _blocks_with_onednn(self, y: torch.Tensor, packed: list[torch.Tensor | None], pointwise: str) -> torch.Tensor:
        if not self.blocks:  # the stem's BatchNorm is folded into the head, as the last block's would be
            return y
        torch.addcmul(self.stem_t, y, self.stem_s, out=y)
        dim = y.shape[1]
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            k = blk.kernel_size
            g = self._conv_act(y, packed[2 * i + 1], blk.dw_b, k // 2, 1, dim)
            if k % 2:
                z = torch.addcmul(y, g, blk.s1, out=g)
            else:
                z = torch.addcmul(y, crop_to_same(g, k), blk.s1).contiguous(memory_format=torch.channels_last)
            u = self._pointwise(z, y, blk, packed[2 * i + 2], pointwise)
            y = u if i == last else torch.addcmul(blk.t2, u, blk.s2, out=u)
        return y

    def _blocks_with_mixing_kernel(self, u: torch.Tensor, packed: list[torch.Tensor | None],
                                   pointwise: str) -> torch.Tensor:
        # u is each layer's activation before its BatchNorm: the kernel applies that affine as it reads u.
        s_in, t_in = self.stem_s.view(-1), self.stem_t.view(-1)
        mixing = spatial_mixing_bf16 if self.precision == "bf16" else spatial_mixing
        for i, blk in enumerate(self.blocks):
            z = mixing(u, s_in, t_in, blk.dw_w_kkc, blk.dw_b, blk.s1.view(-1), self.act)
            u = self._pointwise(z, u, blk, packed[2 * i + 2], pointwise)
            s_in, t_in = blk.s2.view(-1), blk.t2.view(-1)
        return u  # the last BatchNorm is folded into the head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, self.pointwise, self.depthwise)

    def run(self, x: torch.Tensor, pointwise: str, depthwise: str) -> torch.Tensor:
        """The forward pass with the given implementations (see the class docstring)."""
        self._check_implementations(pointwise, depthwise, self.precision)
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (N, {self.in_chans}, H, W), got {list(x.shape)}")
        with torch.no_grad():
            x = x.float().contiguous(memory_format=torch.channels_last)
            p = self.patch_size
            _, height, width = self._cropped(x.shape[1:])
            if (height, width) != tuple(x.shape[2:]):
                # A stride-p convolution ignores the remainder; cropping keeps oneDNN on its fast path.
                x = x[..., :height, :width].contiguous(memory_format=torch.channels_last)
            packed = self._packed_weights(x, (x.shape[-2] // p, x.shape[-1] // p), depthwise)
            y = self._conv_act(x, packed[0], self.stem_b, 0, p, 1)
            if depthwise == "kernel":
                y = self._blocks_with_mixing_kernel(y, packed, pointwise)
            else:
                y = self._blocks_with_onednn(y, packed, pointwise)
            pooled = y.mean((2, 3), dtype=torch.float32)
            if self.has_head:
                return torch.addmm(self.head_b, pooled, self.head_w.t())
            return torch.addcmul(self.head_b, pooled, self.head_w.view(1, -1))


"""CPU kernels that PyTorch's own CPU backend runs far below the machine's rate, built on first use.

The C++ source ships with the package and is compiled once per machine with the system C++ compiler into a cache
folder (``$CONVMIXER_TIMM_CACHE``, else ``~/.cache/convmixer_timm``). Where no compiler is found or the build
fails, ``load()`` returns None, warns once, and callers keep PyTorch's own ops: slower, same numbers.
``CONVMIXER_TIMM_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "DepthwiseConvSame", "cache_dir", "conv_same", "depthwise_weight_grad", "enabled", "load", "use_fast_backward",
]

_SOURCE = Path(__file__).with_name("depthwise_weight_grad.cpp")
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC", "-pthread"]
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    return os.environ.get("CONVMIXER_TIMM_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("CONVMIXER_TIMM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "convmixer_timm"


def _cpu_signature() -> str:
    # -march=native binds the binary to this CPU; a cache shared between machines must not mix them.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _build(compiler: str) -> Path:
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *_FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"depthwise_weight_grad-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes (torchrun) never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip()[-2000:] or f"{compiler} exited with {result.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first call; None where kernels are off or cannot be built."""
    global _library, _tried
    if not enabled():
        return None
    if _tried:
        return _library
    with _lock:
        if _tried:
            return _library
        try:
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C++ compiler found (looked for $CXX, g++, c++, clang++)")
            library = ctypes.CDLL(str(_build(compiler)))
            for name in ("depthwise_weight_grad_f32", "depthwise_weight_grad_f64"):
                fn = getattr(library, name)
                fn.restype = None
                fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int] * 3
            _library = library
        except (OSError, RuntimeError) as error:
            warnings.warn(
                f"convmixer_timm: CPU training kernels unavailable ({error}); using PyTorch's depthwise backward "
                "(same results, slower). Install a C++ compiler (g++) to enable them, or set "
                "CONVMIXER_TIMM_KERNELS=0 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
        _tried = True
        return _library


def depthwise_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, kernel_size: int, pad: int) -> torch.Tensor:
    """Weight gradient (C, 1, k, k) of a stride-1 'same' depthwise convolution from channels_last NCHW tensors.

    ``pad`` is the zero padding before the first row and column (k // 2 for odd k, (k - 1) // 2 for even k).
    """
    library = load()
    if library is None:
        raise RuntimeError("convmixer_timm kernels are not available; check convmixer_timm.kernels.load()")
    if x.dtype not in (torch.float32, torch.float64) or grad_out.dtype != x.dtype:
        raise TypeError(f"depthwise_weight_grad needs float32 or float64 tensors, got {x.dtype}, {grad_out.dtype}")
    if x.device.type != "cpu" or x.shape != grad_out.shape or x.dim() != 4:
        raise ValueError(f"depthwise_weight_grad needs equal 4-d CPU tensors, got {list(x.shape)} and "
                         f"{list(grad_out.shape)} on {x.device}")
    batch, channels, height, width = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    sums = torch.empty(kernel_size, kernel_size, channels, dtype=x.dtype)
    fn = library.depthwise_weight_grad_f32 if x.dtype == torch.float32 else library.depthwise_weight_grad_f64
    fn(grad_out.data_ptr(), x.data_ptr(), sums.data_ptr(), batch, height, width, channels, kernel_size, pad,
       torch.get_num_threads())
    return sums.permute(2, 0, 1).unsqueeze(1).contiguous()


def conv_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Stride-1 depthwise convolution that keeps the grid, with PyTorch's own autograd."""
    # "same" gives (k-1)//2 before and k//2 after for even k, as timm's built-in pads; odd k is symmetric.
    k = weight.shape[-1]
    padding = k // 2 if k % 2 else "same"
    return F.conv2d(x, weight, bias, 1, padding, 1, x.shape[1])


class DepthwiseConvSame(torch.autograd.Function):
    """Stride-1 'same' depthwise convolution whose backward avoids oneDNN's slow depthwise backward on CPU.

    Forward is PyTorch's own convolution. Backward: the input gradient is the forward convolution of grad_out
    with the flipped kernel (padding mirrored), the weight gradient comes from ``depthwise_weight_grad`` and
    the bias gradient is a sum. Tested against autograd on the plain op with ``torch.autograd.gradcheck``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return conv_same(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        k = weight.shape[-1]
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(2, 3)
            grad_input = F.conv2d(grad_out, flipped, None, 1, k // 2, 1, x.shape[1])
            if k % 2 == 0:  # mirrored padding is k//2 before, k//2 - 1 after: drop the extra last row and column
                grad_input = grad_input[:, :, : x.shape[2], : x.shape[3]].contiguous(memory_format=torch.channels_last)
        if ctx.needs_input_grad[1]:
            grad_weight = depthwise_weight_grad(grad_out, x, k, (k - 1) // 2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_input, grad_weight, grad_bias


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def use_fast_backward(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``DepthwiseConvSame`` applies: a CPU autograd step in float32/64 with the kernels built."""
    return (
        torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and weight.dtype == x.dtype
        and not _autocast_on()
        and not torch.compiler.is_compiling()
        and load() is not None
    )

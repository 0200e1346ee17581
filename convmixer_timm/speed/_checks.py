"""Argument checks of the native operators, made before any pointer reaches C++, as ATen's ``TORCH_CHECK``s are.

The kernels in ``convmixer_kernels.cpp`` read and write raw memory with the sizes they are handed: a short vector,
another dtype, a tensor on another device or a number that does not fit its C type would make them read or write
outside a buffer. Every operator, and its fake kernel (so that compiled and exported graphs fail the same way),
checks its arguments with these functions first; :func:`dense` then gives the exact layout the C++ reads, and
:func:`kernel_threads` how many threads to hand a kernel so that its per-thread scratch stays bounded.

Errors follow PyTorch's own kinds: ``TypeError`` for a dtype or a tensor type, ``ValueError`` for a shape or a
number, ``RuntimeError`` for a device mismatch.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["KERNEL_SIZE_LIMIT", "check_4d", "check_cpu", "check_kernel", "check_same_shape", "check_tensors",
           "check_vector", "dense", "kernel_threads", "like_parameter", "require_kernels", "ring_scratch_bytes"]

# The kernels take k and pad as C ints and index a k x k window with int arithmetic: k * k must fit in an int.
KERNEL_SIZE_LIMIT = 46340
# Per-thread scratch of a kernel may take up to this much, or the size of its operands where that is larger.
_SCRATCH_FLOOR_BYTES = 16 << 20


def require_kernels(library):
    if library is None:
        raise RuntimeError("convmixer_timm kernels are not available; see convmixer_timm.speed.kernel_info()")
    return library


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensors(op: str, tensors: Mapping[str, Tensor | None], dtypes: Sequence[torch.dtype]) -> None:
    """Every tensor given (None skipped) is a dense tensor on one device, all of one dtype among ``dtypes``."""
    present = [(name, t) for name, t in tensors.items() if t is not None]
    for name, t in present:
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}; call "
                            f".to_dense() first")
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise RuntimeError(f"{op}: expected all tensors on one device, got {first_name} on {first.device} and "
                               f"{name} on {t.device}; move them with .to({str(first.device)!r})")
    if first.dtype not in dtypes:
        raise TypeError(f"{op} is implemented for {_dtype_names(dtypes)} tensors, got {first_name} of dtype "
                        f"{first.dtype}; convert with .to({dtypes[0]}) or use PyTorch's own operator")
    for name, t in present[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: expected all tensors of dtype {first.dtype} (the dtype of {first_name}), got "
                            f"{name} of dtype {t.dtype}")


def check_cpu(op: str, t: Tensor) -> None:
    """The kernel itself: ``t`` (and, after :func:`check_tensors`, every tensor) is in CPU memory."""
    if t.device.type != "cpu":
        raise RuntimeError(f"{op}: the compiled kernels run on CPU tensors only, got {t.device}")


def check_4d(op: str, name: str, t: Tensor) -> None:
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-d (N, C, H, W), got shape {list(t.shape)}")


def check_same_shape(op: str, name: str, t: Tensor, like_name: str, like: Tensor) -> None:
    if t.shape != like.shape:
        raise ValueError(f"{op}: {name} must have the shape of {like_name}, {list(like.shape)}, got "
                         f"{list(t.shape)}")


def check_vector(op: str, name: str, t: Tensor, channels: int) -> None:
    """``t`` holds one value per channel: shape (channels,)."""
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{op}: {name} should contain {channels} elements (one per channel), a 1-d tensor, got "
                         f"shape {list(t.shape)}")


def check_kernel(op: str, kernel_size: int, pad: int) -> None:
    """A k x k window (1 <= k <= KERNEL_SIZE_LIMIT) with 0 <= pad <= k - 1 rows and columns of padding before."""
    for name, value in (("kernel_size", kernel_size), ("pad", pad)):
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
            raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if not 1 <= kernel_size <= KERNEL_SIZE_LIMIT:
        raise ValueError(f"{op}: kernel_size must be in 1..{KERNEL_SIZE_LIMIT}, got {kernel_size}")
    if not 0 <= pad <= kernel_size - 1:
        raise ValueError(f"{op}: pad must be in 0..kernel_size - 1 = {kernel_size - 1}, got {pad}")


def dense(t: Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """``t`` laid out exactly as the C++ reads it: contiguous in ``memory_format``, no pending negation view."""
    return t.resolve_neg().contiguous(memory_format=memory_format)


def like_parameter(grad: Tensor, parameter: Tensor) -> Tensor:
    """A weight's gradient with the weight's own strides, size-1 dimensions included: DistributedDataParallel
    copies it into a bucket laid out like the parameter and warns where any stride differs."""
    return grad if grad.stride() == parameter.stride() else torch.empty_like(parameter).copy_(grad)


def ring_scratch_bytes(x: Tensor, kernel_size: int) -> int:
    """Per-thread scratch of the spatial-mixing kernel (and the depthwise convolution built on it): a ring of k + 1
    zero-padded float32 rows as wide as ``x``'s, whatever ``x``'s dtype (spatial_mixing in kernels_body.inc)."""
    _, channels, _, width = x.shape
    return (kernel_size + 1) * (width + kernel_size) * channels * 4 + 64 * kernel_size


def kernel_threads(rows: int, scratch_bytes_per_thread: int, *operands: Tensor) -> int:
    """Threads to give a kernel that splits ``rows`` among them and allocates scratch for each thread it is given.

    No more threads than rows, and no more than keep the scratch within the operands' size (or 16 MiB): a wide
    tensor with few rows (a million channels, one pixel) must not make every thread allocate a copy of it.
    """
    budget = max(sum(t.numel() * t.element_size() for t in operands), _SCRATCH_FLOOR_BYTES)
    return max(1, min(torch.get_num_threads(), rows, budget // max(1, scratch_bytes_per_thread)))

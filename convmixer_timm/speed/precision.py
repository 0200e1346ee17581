"""What a low-precision request of :func:`optimize_for_inference` needs besides the race: the precision names,
whether this CPU computes them natively, the calibration inputs, and the accuracy measured on them.

A CPU computes bf16 natively where it has ``avx512_bf16`` or ``amx_bf16`` and int8 where it has VNNI
(``avx512_vnni``, ``avx_vnni``) or ``amx_int8``, and only where ``ONEDNN_MAX_CPU_ISA`` does not cap oneDNN below
that instruction set. Without them a low-precision path is usually slower than float32, which is why the fp32
paths always race beside it and why keeping one is said in a log line.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["PRECISIONS", "CalibrationReport", "calibration_batches", "check_precision", "cpu_flags", "measure",
           "native"]

PRECISIONS = ("fp32", "bf16", "int8")

# The CPU flags that make each precision's arithmetic native, and the oneDNN ISA names (ONEDNN_MAX_CPU_ISA) at or
# above which oneDNN may use them. An ISA name not listed here caps at or below AVX-512 without them.
_NATIVE_FLAGS = {"bf16": {"avx512_bf16", "amx_bf16"}, "int8": {"avx512_vnni", "avx_vnni", "amx_int8"}}
_ISA_CAPS = {
    "bf16": ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10_1_512", "AVX10_2_512"),
    "int8": ("AVX2_VNNI", "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
             "AVX10_1_512", "AVX10_2_512"),
}


def check_precision(precision: str, calibration: object) -> None:
    """Raise ValueError naming the fix where ``precision`` or its ``calibration`` cannot be used."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8" and calibration is None:
        raise ValueError("precision='int8' needs calibration=...: an iterable of input batches (N, C, H, W) or a "
                         "DataLoader yielding images or (images, labels), e.g. a few hundred training images")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native(precision: str, flags: Iterable[str] | None = None, max_isa: str | None = None) -> bool:
    """Whether this CPU computes ``precision`` natively: its flags (``flags``, default :func:`cpu_flags`) have
    the instructions, and oneDNN is not capped below them (``max_isa``, default ``$ONEDNN_MAX_CPU_ISA``). fp32 is
    always native."""
    if precision == "fp32":
        return True
    flags = cpu_flags() if flags is None else frozenset(flags)
    if not flags & _NATIVE_FLAGS[precision]:
        return False
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA", "") if max_isa is None else max_isa).strip().upper()
    return cap in ("", "ALL", "DEFAULT") or cap.startswith(_ISA_CAPS[precision])


def _images(item: object) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]  # (images, labels) as a DataLoader of a labelled data set yields them
    raise TypeError(f"calibration must yield tensors or (images, labels) pairs, got {type(item).__name__}")


def calibration_batches(calibration: Iterable[object], in_chans: int) -> list[torch.Tensor]:
    """The calibration inputs as CPU float32 (N, C, H, W) batches, read once. Batches may have any size (the
    last one short); a single image (C, H, W) is a batch of one. Every batch must have the model's ``in_chans``
    channels and one image size."""
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]  # one batch, not an iterable of images
    try:
        items = iter(calibration)
    except TypeError:
        raise TypeError(f"calibration must be an iterable of input batches or a DataLoader, got "
                        f"{type(calibration).__name__}") from None
    batches: list[torch.Tensor] = []
    for item in items:
        images = _images(item)
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != in_chans or images.shape[0] == 0:
            raise ValueError(f"calibration batches must be (N, {in_chans}, H, W) images for this model, got "
                             f"{list(images.shape)}: pass the inputs the model sees, after its preprocessing")
        if not images.is_floating_point():
            raise ValueError(f"calibration images must be floating point (after normalization), got {images.dtype}")
        if batches and images.shape[2:] != batches[0].shape[2:]:
            raise ValueError(f"calibration images must share one size: {list(batches[0].shape[2:])} then "
                             f"{list(images.shape[2:])}; resize them as the model's inputs are")
        batches.append(images.detach().to("cpu", torch.float32))
    if not batches:
        raise ValueError("calibration yielded no tensor: pass a non-empty iterable of input batches or a DataLoader")
    return batches


@dataclasses.dataclass(frozen=True)
class CalibrationReport:
    """One low-precision path against the float32 model on the calibration inputs: the share of images whose
    top-1 class agrees, and the largest absolute logit difference (``max_abs_logit`` gives its scale)."""

    path: str
    precision: str
    images: int
    top1_agreement: float
    max_abs_logit_error: float
    max_abs_logit: float

    def __str__(self) -> str:
        return (f"{self.path}: top-1 agreement {100 * self.top1_agreement:.2f}% with fp32 on {self.images} "
                f"calibration images, largest logit error {self.max_abs_logit_error:.4g} "
                f"(largest logit {self.max_abs_logit:.4g})")


def measure(path: str, precision: str, reference: nn.Module, candidate: nn.Module | object,
            batches: Sequence[torch.Tensor]) -> CalibrationReport:
    """``candidate`` (a callable taking and returning float32) against ``reference`` on ``batches``."""
    agree = images = 0
    error = largest = 0.0
    with torch.no_grad():
        for x in batches:
            want, got = reference(x).float(), candidate(x).float()
            agree += int((want.argmax(-1) == got.argmax(-1)).sum())
            images += x.shape[0]
            error = max(error, float((want - got).abs().max()))
            largest = max(largest, float(want.abs().max()))
    return CalibrationReport(path, precision, images, agree / images, error, largest)

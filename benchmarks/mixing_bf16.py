"""The spatial-mixing kernel in bf16 against its float32 self and PyTorch's bf16 ops, one step, side by side.

    python benchmarks/mixing_bf16.py                       # CIFAR and ImageNet block shapes
    CONVMIXER_TIMM_CPU_ISA=avx512 python benchmarks/mixing_bf16.py   # the AVX-512 copy on an AVX512_BF16 CPU

One ConvMixer spatial-mixing step, ``z = y + s1 * GELU(depthwise_k(y) + b)`` with ``y = u * s_in + t_in``, on
channels_last tensors of the same values, timed interleaved (``--repeats`` rounds, medians):

* ``kernel fp32``: ``convmixer_timm::spatial_mixing``, float32 in and out (what the float32 fused module runs);
* ``kernel bf16``: ``convmixer_timm::spatial_mixing_bf16``, bf16 in and out (the bf16 fused module's step);
* ``kernel fp32->bf16``: the same operator from a float32 input (the first block, after the patch embedding);
* ``pytorch bf16``: PyTorch's ops on bf16 tensors (affine, depthwise convolution, GELU, residual), as the
  ``bf16 channels_last`` path runs them.

The kernel's sums are float32 in every case: bf16 halves the bytes read and written, not the arithmetic.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from convmixer_timm.speed import kernel_info, spatial_mixing, spatial_mixing_bf16

SHAPES = {"256/8 k9, batch 32 (CIFAR)": (32, 256, 32, 32, 9), "768/32 k7, batch 4 (ImageNet)": (4, 768, 32, 32, 7),
          "1536/20 k9, batch 2 (ImageNet)": (2, 1536, 32, 32, 9)}


def candidates(batch: int, channels: int, height: int, width: int, k: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(batch, channels, height, width, generator=generator).contiguous(memory_format=torch.channels_last)
    s_in, t_in, bias, s1 = (torch.randn(channels, generator=generator) for _ in range(4))
    weight = torch.randn(k, k, channels, generator=generator) * 0.1
    u_bf16 = u.bfloat16()
    conv_weight = weight.permute(2, 0, 1).unsqueeze(1).bfloat16().contiguous()
    vectors = [t.bfloat16().view(1, -1, 1, 1) for t in (s_in, t_in, bias, s1)]

    def pytorch_bf16() -> torch.Tensor:
        y = u_bf16 * vectors[0] + vectors[1]
        mixed = F.conv2d(y, conv_weight, vectors[2].flatten(), padding=k // 2, groups=channels)
        return y + vectors[3] * F.gelu(mixed)

    return {
        "kernel fp32": lambda: spatial_mixing(u, s_in, t_in, weight, bias, s1, "gelu"),
        "kernel bf16": lambda: spatial_mixing_bf16(u_bf16, s_in, t_in, weight, bias, s1, "gelu"),
        "kernel fp32->bf16": lambda: spatial_mixing_bf16(u, s_in, t_in, weight, bias, s1, "gelu"),
        "pytorch bf16": pytorch_bf16,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    print(f"kernels: {kernel_info()['isa']}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| step | " + " | ".join(["kernel fp32", "kernel bf16", "kernel fp32->bf16", "pytorch bf16"]) + " |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for label, shape in SHAPES.items():
            fns = candidates(*shape)
            times: dict[str, list[float]] = {name: [] for name in fns}
            for fn in fns.values():
                fn()
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    time.sleep(0.02)  # the previous call's OpenMP workers stop spinning
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            medians = {name: statistics.median(values) for name, values in times.items()}
            base = medians["kernel fp32"]
            print(f"| {label} | " + " | ".join(f"{1e3 * m:.2f} ms ({base / m:.2f}x)" for m in medians.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

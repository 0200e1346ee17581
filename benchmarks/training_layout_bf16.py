"""One bf16 CPU training step of convmixer-timm's ConvMixer against timm's built-in, same weights, side by side.

    python benchmarks/training_layout_bf16.py                 # ConvMixer-256/4 k5 p2, batch 64, 32 px
    python benchmarks/training_layout_bf16.py --dim 768 --depth 4 --kernel 7 --patch 7 --size 224 --batch 8

Float32 training runs channels_last inside (``speed.layers.layout_for_cpu_training``: oneDNN and the kernels are
faster there); in bf16, under ``torch.autocast("cpu", dtype=torch.bfloat16)`` as train.py's ``--amp
--amp-dtype bfloat16`` runs it, the model keeps the caller's layout instead. This times that step (forward,
cross-entropy, backward) for timm's built-in, for ours, and for ours with a channels_last input (the float32
layout: what ours did in bf16 before), interleaved, ``--repeats`` rounds after one warm-up call each; it prints the
best time of each and the ratios to timm's.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from timm.models.convmixer import ConvMixer as TimmConvMixer

from convmixer_timm import ConvMixer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("dim", 256), ("depth", 4), ("kernel", 5), ("patch", 2), ("size", 32), ("batch", 64),
                          ("repeats", 5), ("threads", torch.get_num_threads())):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    timm_model = TimmConvMixer(args.dim, args.depth, args.kernel, args.patch, num_classes=10).train()
    ours = ConvMixer(args.dim, args.depth, args.kernel, args.patch, num_classes=10)
    ours.load_state_dict(timm_model.state_dict())
    ours_channels_last = copy.deepcopy(ours)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    y = torch.randint(0, 10, (args.batch,), generator=generator)
    runs = {"timm built-in": (timm_model.train(), x), "ours": (ours.train(), x),
            "ours, channels_last input": (ours_channels_last.train(), x.contiguous(memory_format=torch.channels_last))}

    def step(model: torch.nn.Module, images: torch.Tensor) -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), y)
        loss.backward()

    for model, images in runs.values():
        step(model, images)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (model, images) in runs.items():
            start = time.perf_counter()
            step(model, images)
            times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    print(f"ConvMixer-{args.dim}/{args.depth} k{args.kernel} p{args.patch}, batch {args.batch}, {args.size} px, bf16 "
          f"autocast, {args.threads} threads, best of {args.repeats}:")
    for name, seconds in best.items():
        print(f"  {name:28s} {seconds * 1e3:9.1f} ms  {seconds / best['timm built-in']:.2f}x timm's")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bf16 and int8 inference speed side by side with float32: every path of ``optimize_for_inference(precision=...)``.

    python benchmarks/low_precision_speed.py --variant convmixer_768_32 --batch 4
    python benchmarks/low_precision_speed.py --variant convmixer_256_8_ks5_p2 --batch 64 --precisions int8 \\
        --json int8.json --markdown int8.md

One process, the same weights for every candidate (``bench.py``'s: timm's ConvMixer with randomised BatchNorm
statistics), the same input. Candidates:

* ``fp32 default``: ``optimize_for_inference(model, input_size=...)``, the race's float32 choice (the baseline);
* ``<precision> race``: ``optimize_for_inference(model, input_size=..., precision=...)``, what a user gets;
* every path of that precision on its own, as the race sees it: PyTorch's (``bf16 channels_last``, ``bf16
  autocast``, the fused ``bf16 conv+kernel`` / ``bf16 mm+kernel``, ``int8 fx``, ``int8 pt2e``) and the foreign
  runtimes' (OpenVINO's bf16 hint, onnxruntime's and OpenVINO's int8 QDQ model, OpenVINO on the NNCF model),
  where installed. The fused bf16 paths and OpenVINO's bf16 hint are built on every CPU here
  (``native_precision=True``), not only where the race would offer them, so that a CPU without native bf16 shows
  why they are left out there.

int8 is calibrated on ``--calibration-images`` random normal images (the scales change what is computed, not how
fast; accuracy is ``low_precision_accuracy.py``'s job). Each candidate is called once untimed (builds, compiles),
then once timed: one more than ``--drop`` times slower than the baseline is reported and left out of the rounds.
The rest are timed interleaved, one call each per round with a pause before each call (``bench.SETTLE_S``), for
``--repeats`` rounds; the median is reported as ms per batch, images/s and the ratio to ``fp32 default``, and each
precision's best PyTorch path against its best foreign one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from bench import ENV_VARS, _cpu_features, _cpu_name, _version, build_models, input_shape, interleave  # noqa: E402
from low_precision_accuracy import runners  # noqa: E402

from convmixer_timm import VARIANTS_BY_NAME  # noqa: E402
from convmixer_timm.speed import RUNTIMES, kernel_info, optimize_for_inference  # noqa: E402
from convmixer_timm.speed.precision import native  # noqa: E402

Runner = Callable[[torch.Tensor], torch.Tensor]


def candidates(model: torch.nn.Module, shape: tuple[int, ...], precisions: list[str],
               calibration: list[torch.Tensor]) -> dict[str, Runner]:
    found: dict[str, Runner] = {"fp32 default": optimize_for_inference(model, input_size=shape, cache=False)}
    for precision in precisions:
        found[f"{precision} race"] = optimize_for_inference(model, input_size=shape, cache=False,
                                                            precision=precision, calibration=calibration)
        paths, _ = runners(model, precision, calibration, shape, native_precision=True, throughput=True)
        found.update(paths)
    return found


def measure(found: dict[str, Runner], x: torch.Tensor, repeats: int, drop: float) -> tuple[dict, dict]:
    """(median seconds per candidate timed in rounds, {candidate: why it was left out})."""
    first: dict[str, float] = {}
    left_out: dict[str, str] = {}
    with torch.no_grad():
        for name, run in found.items():
            try:
                run(x)  # builds, compiles, packs
                start = time.perf_counter()
                run(x)
                first[name] = time.perf_counter() - start
            except Exception as error:  # one candidate fewer, said in the report
                left_out[name] = f"failed: {type(error).__name__}: {str(error)[:120]}"
        base = first["fp32 default"]
        for name, seconds in first.items():
            if seconds > drop * base:
                left_out[name] = f"{seconds / base:.1f}x the baseline's time on its first timed call"
        timed = {name: (lambda run=found[name]: run(x)) for name in first if name not in left_out}
        times = interleave(timed, repeats, warmup=0)
    return {name: statistics.median(values) for name, values in times.items()}, left_out


def report(args: argparse.Namespace, shape: tuple[int, ...], medians: dict[str, float],
           left_out: dict[str, str]) -> tuple[str, dict]:
    base = medians["fp32 default"]
    rows = [{"path": name, "ms": 1e3 * seconds, "images_per_s": shape[0] / seconds, "vs_fp32": base / seconds}
            for name, seconds in sorted(medians.items(), key=lambda item: item[1])]
    lines = [f"## {args.variant}, batch {shape[0]}, input {list(shape)}", "",
             "| path | ms / batch | images/s | speed vs fp32 default |", "|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['ms']:.1f} | {r['images_per_s']:.1f} | {r['vs_fp32']:.2f}x |" for r in rows]
    lines += [f"| {name} | left out: {why} | | |" for name, why in left_out.items()]
    versus = {}
    for precision in args.precisions:
        own = [n for n in medians if n.startswith(precision) and n != f"{precision} race"
               and not n.startswith(RUNTIMES)]
        foreign = [n for n in medians if precision in n and n.startswith(RUNTIMES)]
        if own and foreign:
            best_own, best_foreign = min(own, key=medians.get), min(foreign, key=medians.get)
            versus[precision] = {"ours": best_own, "foreign": best_foreign,
                                 "ratio": medians[best_foreign] / medians[best_own]}
            lines.append(f"\n{precision}: our best path ({best_own}) is {versus[precision]['ratio']:.2f}x the speed "
                         f"of the best foreign runtime ({best_foreign}).")
    if "bf16" in args.precisions and not native("bf16"):
        lines.append("\nThis CPU has no native bf16: OpenVINO runs its bf16 hint in float32 here, and PyTorch's "
                     "bf16 is emulated.")
    return "\n".join(lines), {"rows": rows, "left_out": left_out, "versus_foreign": versus}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="convmixer_256_8_ks5_p2", choices=list(VARIANTS_BY_NAME))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "int8"], choices=["bf16", "int8"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--drop", type=float, default=3.0, help="leave out a path this many times slower than "
                        "fp32 default on its first timed call (bf16 emulated without native bf16 runs 10-30x)")
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variant = VARIANTS_BY_NAME[args.variant]
    shape = input_shape(variant, args.batch)
    _, model = build_models(variant)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    calibration = list(torch.randn(args.calibration_images, *shape[1:], generator=generator).split(args.batch))
    x = torch.randn(shape, generator=generator)
    found = candidates(model, shape, args.precisions, calibration)
    medians, left_out = measure(found, x, args.repeats, args.drop)
    table, results = report(args, shape, medians, left_out)
    env = {name: value for name in ENV_VARS if (value := os.environ.get(name))}
    header = (f"{datetime.date.today()}, {_cpu_name()} ({_cpu_features()}), {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}, timm {_version('timm')}, onnxruntime {_version('onnxruntime')}, "
              f"openvino {_version('openvino')}, torchao {_version('torchao')}, kernels "
              f"{kernel_info()['isa']}, {platform.python_version()}" + (f", {env}" if env else ""))
    command = " ".join(sys.argv[1:] if argv is None else argv)
    text = f"{header}\n\n`python benchmarks/low_precision_speed.py {command}`\n\n{table}\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "shape": shape, **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

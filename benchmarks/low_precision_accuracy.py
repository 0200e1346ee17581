"""Top-1 of every low-precision path of ``optimize_for_inference`` on held-out data, beside float32.

    python benchmarks/low_precision_accuracy.py --model convmixer_256_8_ks5_p2 --checkpoint model.pth.tar \\
        --data-dir DIR --num-classes 10 --json accuracy.json

``DIR`` holds timm ImageFolder splits (``--train-split``, default ``train``; ``--val-split``, default
``validation``), or the files of the timm dataset ``--dataset`` names (``torch/fashion_mnist`` with ``--val-split
test``; give the ``--input-size``, ``--mean`` and ``--std`` train.py was given). Calibration images are drawn from
the training split only (``--calibration-images``, a seeded random subset), top-1 is measured on the whole
held-out split. Both go through the model's own eval preprocessing (timm's ``resolve_data_config``). Every path is
evaluated, not only the one the race would choose on this CPU: float32 (the eval model), each precision's PyTorch
paths, and where installed onnxruntime's int8 and OpenVINO's int8 on the quantized ONNX export (built for the batch
size and image size here). A Markdown table goes to stdout: top-1, its change against float32 in points, top-1
agreement with float32, and the largest absolute logit difference. No timing: speed is ``benchmarks/bench.py``'s
job.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

Runner = Callable[[torch.Tensor], torch.Tensor]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a timm model name (convmixer-timm's or timm's)")
    parser.add_argument("--checkpoint", default="", help="timm checkpoint to load (train.py's model_best.pth.tar)")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                        help="passed to timm.create_model, values read as Python literals (as timm's scripts do)")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--dataset", default="", help="timm dataset name, e.g. torch/fashion_mnist (default: an "
                        "ImageFolder under --data-dir)")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="validation")
    parser.add_argument("--calibration-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "int8"], choices=["bf16", "int8"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-images", type=int, default=None,
                        help="only the first N held-out images (the same for every path): bf16 emulated on a CPU "
                        "without native bf16 runs about 10x slower than float32")
    parser.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                        help="as train.py was given (default: the model's pretrained config)")
    parser.add_argument("--mean", type=float, nargs="+", default=None, help="as train.py was given")
    parser.add_argument("--std", type=float, nargs="+", default=None, help="as train.py was given")
    parser.add_argument("--crop-pct", type=float, default=None, help="as train.py was given")
    parser.add_argument("--all-paths", action="store_true", help="also the paths offered only on a CPU with native "
                        "bf16 (the fused bf16 module, OpenVINO's bf16 hint), whatever this CPU has")
    parser.add_argument("--json", default="", help="also write the results here")
    return parser.parse_args(argv)


def loaders(args: argparse.Namespace, model: nn.Module) -> tuple[list[torch.Tensor], object]:
    """(calibration batches from the training split, the held-out loader), with the model's eval transforms."""
    from timm.data import create_dataset, create_transform, resolve_data_config

    from convmixer_timm.speed.deferred import calibration_images

    given = {key: value for key in ("input_size", "mean", "std", "crop_pct")
             if (value := getattr(args, key)) is not None}
    calibration = calibration_images(model, args.data_dir, args.calibration_images, given, dataset=args.dataset,
                                     split=args.train_split, seed=args.seed, batch_size=args.batch_size)
    config = resolve_data_config(given, model=model)
    held_out = create_dataset(args.dataset, root=args.data_dir, split=args.val_split, transform=create_transform(
        **config, is_training=False), input_img_mode="RGB" if config["input_size"][0] == 3 else "L")
    if args.max_images is not None:
        held_out = torch.utils.data.Subset(held_out, range(min(args.max_images, len(held_out))))
    return calibration, torch.utils.data.DataLoader(held_out, batch_size=args.batch_size)


def runners(model: nn.Module, precision: str, calibration: list[torch.Tensor], shape: tuple[int, ...],
            native_precision: bool | None = None, throughput: bool = False) -> tuple[dict[str, Runner], object]:
    """Every path of ``precision`` by name, built for inputs of ``shape``, and the module that holds them.
    ``native_precision=True`` builds the paths offered only where the CPU computes ``precision`` natively;
    ``throughput`` adds OpenVINO's THROUGHPUT hint (the same numbers as its LATENCY one)."""
    from convmixer_timm.speed.lowp import LowPrecisionConvMixer, _Batched
    from convmixer_timm.speed.runtimes import OpenVinoConvMixer, installed_runtimes

    tuned = LowPrecisionConvMixer(model, precision, calibration, runtimes=installed_runtimes(),
                                  native_precision=native_precision)
    paths: dict[str, Runner] = {name: tuned.lowp_torch[name] for name in tuned.lowp_torch}
    for name, build in tuned._foreign_builders().items():
        if name not in tuned.fp32_paths() and (throughput or not name.endswith("throughput")):
            runner = build(tuned.plain, shape, True)
            paths[name] = _Batched(runner) if isinstance(runner, OpenVinoConvMixer) else runner
    return paths, tuned


def evaluate(model: nn.Module, paths: dict[str, Runner], loader: object) -> dict[str, dict[str, float]]:
    counts = {name: {"correct": 0, "agree": 0, "error": 0.0} for name in ("fp32", *paths)}
    total = 0
    with torch.no_grad():
        for images, labels in loader:
            reference = model(images)
            total += len(labels)
            for name in counts:
                logits = reference if name == "fp32" else paths[name](images)
                counts[name]["correct"] += int((logits.argmax(-1) == labels).sum())
                counts[name]["agree"] += int((logits.argmax(-1) == reference.argmax(-1)).sum())
                counts[name]["error"] = max(counts[name]["error"], float((logits - reference).abs().max()))
    return {name: {"top1": 100 * c["correct"] / total, "agreement": 100 * c["agree"] / total,
                   "max_abs_logit_error": c["error"], "images": total} for name, c in counts.items()}


def table(results: dict[str, dict[str, float]]) -> str:
    base = results["fp32"]["top1"]
    lines = ["| path | top-1 (%) | vs fp32 (points) | agreement with fp32 (%) | largest logit error |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['top1']:.2f} | {r['top1'] - base:+.2f} | {r['agreement']:.2f} | "
                     f"{r['max_abs_logit_error']:.4g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import timm

    import convmixer_timm  # noqa: F401  (registers the variants)

    kwargs = {"num_classes": args.num_classes} if args.num_classes is not None else {}
    for item in args.model_kwargs:
        key, _, value = item.partition("=")
        kwargs[key] = ast.literal_eval(value)
    model = timm.create_model(args.model, checkpoint_path=args.checkpoint, **kwargs).eval()
    calibration, held_out = loaders(args, model)
    shape = (args.batch_size, *calibration[0].shape[1:])
    results: dict[str, dict[str, float]] = {}
    for precision in args.precisions:
        paths, _tuned = runners(model, precision, calibration, shape, native_precision=True if args.all_paths else None)
        found = evaluate(model, paths, held_out)
        results.setdefault("fp32", found.pop("fp32"))
        results.update(found)
    print(f"{args.model}: {results['fp32']['images']} held-out images, "
          f"{sum(len(b) for b in calibration)} calibration images from {args.train_split!r}\n")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU throughput of ConvMixer: timm's built-in vs convmixer-timm, inference and training, one command.

    python benchmarks/bench.py                      # every variant, inference + training, Markdown on stdout
    python benchmarks/bench.py --variants convmixer_256_8_ks5_p2 --json results.json --markdown results.md

Every candidate gets the same weights (timm's built-in ``ConvMixer`` with randomised BatchNorm statistics,
loaded into the others) and the same input. Candidates are timed *interleaved* in one process (one call of each
per round, ``--repeats`` rounds), so load from other processes hits all of them alike; the median per candidate
is reported as images/s, as a ratio to timm's best memory format, and as a fraction of a 2048^3 sgemm rate that
is timed in the same rounds. Model FLOPs are 2 x analytic MACs (``Variant.macs``), x3 for a training step
(forward, backward, SGD). Peak memory is the largest amount of tensor memory allocated above the weights during
one call, from the PyTorch profiler's allocation events.

Inference candidates: timm NCHW, timm channels_last, convmixer-timm's model (NCHW, eval), its
``optimize_for_inference`` module, and onnxruntime on the exported ONNX file (``--no-onnx`` to skip).
Training candidates: timm NCHW / channels_last and convmixer-timm's default model NCHW / channels_last, one
step of forward + cross-entropy + backward + SGD.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Benchmark the checkout this file is in, not an installed copy (timm's start-up hook may import one early).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from timm.models.convmixer import ConvMixer as TimmConvMixer
from torch import nn

from convmixer_timm import VARIANTS_BY_NAME, ConvMixer, Variant, kernels
from convmixer_timm.allocator import tune_cpu_allocator
from convmixer_timm.inference import FusedConvMixerInference, optimize_for_inference

# The batch sizes: CIFAR 64 (k5, k7) / 32 (k9), 512/16 batch 8, 768/32 batch 4, 1536/20 batch 2.
DEFAULT_BATCH = {
    "convmixer_256_8_ks5_p2": 64, "convmixer_256_8_ks7_p2": 64, "convmixer_256_8_ks9_p1": 32,
    "convmixer_256_16_ks9_p1": 32, "convmixer_512_16_ks8_p7": 8, "convmixer_1024_12_ks8_p7": 4,
    "convmixer_768_32": 4, "convmixer_1024_20_ks9_p14": 8, "convmixer_1536_20": 2,
}


def sgemm(n: int = 2048) -> Callable[[], None]:
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)

    def run() -> None:
        torch.mm(a, b, out=c)

    return run


def build_models(variant: Variant, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    act = nn.GELU if variant.act == "gelu" else nn.ReLU
    ref = TimmConvMixer(variant.h, variant.d, variant.k, variant.p, num_classes=variant.num_classes, act_layer=act)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    ours = ConvMixer(variant.h, variant.d, variant.k, variant.p, num_classes=variant.num_classes,
                     act_layer=variant.act)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def peak_memory(fn: Callable[[], object]) -> int:
    """Largest sum of live tensor allocations made during ``fn()``, in bytes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Self (not inclusive) usage, so nested ops are counted once; frees are the negative entries.
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def interleave(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def bench_inference(variant: Variant, batch: int, repeats: int, warmup: int, onnx: bool) -> dict:
    ref, ours = build_models(variant)
    ref.eval()
    ours.eval()
    s = variant.img_size
    x = torch.randn(batch, 3, s, s)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    fast = optimize_for_inference(ours, input_size=tuple(x.shape))
    opt_seconds = time.perf_counter() - t0
    cands: dict[str, Callable[[], torch.Tensor]] = {
        "timm NCHW": lambda: ref(x),
        "timm channels_last": lambda: ref_cl(x_cl),
        "convmixer-timm": lambda: ours(x),
        "optimize_for_inference": lambda: fast(x),
    }
    with torch.no_grad():
        expected = ref(x)
        errors = {k: rel_err(expected, fn()) for k, fn in cands.items()}
        times = interleave({**cands, "sgemm 2048^3": sgemm()}, repeats, warmup)
        memory = {k: peak_memory(fn) for k, fn in cands.items()}
        onnx_note, ort_fn, session = None, None, None
        if onnx:
            try:
                import onnxruntime as ort

                from convmixer_timm.export import export_onnx

                tmp = Path(tempfile.mkdtemp()) / "model.onnx"
                export_onnx(ours, tmp, tuple(x.shape))
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = torch.get_num_threads()
                # onnxruntime's idle threads spin by default and would steal the cores from PyTorch's.
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
                session = ort.InferenceSession(str(tmp), opts, providers=["CPUExecutionProvider"])
                x_np = x.numpy()
                ort_fn = lambda: torch.from_numpy(session.run(None, {"input": x_np})[0])  # noqa: E731
            except Exception as e:  # the PyTorch numbers are still worth having
                onnx_note = f"onnxruntime skipped: {e!r}"
                ort_fn = None

        if ort_fn is not None:
            # Its own rounds, session created after PyTorch's: two thread pools interleaved fight over the cores
            # (measured: the PyTorch candidates ran 2-3x slower beside a live session). Both rounds time timm
            # channels_last, and onnxruntime's time is scaled by that candidate's ratio between the two.
            errors["onnxruntime"] = rel_err(expected, ort_fn())
            own = interleave({"onnxruntime": ort_fn, "timm channels_last": cands["timm channels_last"]},
                             repeats, warmup)
            scale = statistics.median(times["timm channels_last"]) / statistics.median(own["timm channels_last"])
            times["onnxruntime"] = [t * scale for t in own["onnxruntime"]]
            del session
    flops = 2 * variant.macs() * batch
    fused = isinstance(fast, FusedConvMixerInference)
    extra = {"pointwise": fast.pointwise if fused else "plain eval model",
             "depthwise": fast.depthwise if fused else "plain eval model",
             "optimize_seconds": opt_seconds}
    if onnx_note:
        extra["note"] = onnx_note
    return summarise(variant, "inference", batch, flops, times, errors, memory, extra)


def bench_training(variant: Variant, batch: int, repeats: int, warmup: int) -> dict:
    ref, ours = build_models(variant)
    s = variant.img_size
    x = torch.randn(batch, 3, s, s)
    target = torch.randint(0, variant.num_classes, (batch,))
    models = {
        "timm NCHW": (copy.deepcopy(ref), x),
        "timm channels_last": (copy.deepcopy(ref).to(memory_format=torch.channels_last),
                               x.contiguous(memory_format=torch.channels_last)),
        "convmixer-timm NCHW": (copy.deepcopy(ours), x),
        "convmixer-timm channels_last": (copy.deepcopy(ours).to(memory_format=torch.channels_last),
                                         x.contiguous(memory_format=torch.channels_last)),
    }
    # Gradients of one step from identical weights, against timm NCHW.
    grads = {}
    for name, (model, inp) in models.items():
        model.train()
        model.zero_grad()
        F.cross_entropy(model(inp), target).backward()
        grads[name] = [p.grad.clone() for p in model.parameters()]
    errors = {name: max(rel_err(a, b) for a, b in zip(grads["timm NCHW"], g, strict=True))
              for name, g in grads.items()}

    def step_fn(model: nn.Module, inp: torch.Tensor) -> Callable[[], None]:
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(inp), target).backward()
            opt.step()

        return step

    cands = {name: step_fn(model, inp) for name, (model, inp) in models.items()}
    times = interleave({**cands, "sgemm 2048^3": sgemm()}, repeats, warmup)
    memory = {k: peak_memory(fn) for k, fn in cands.items()}
    flops = 3 * 2 * variant.macs() * batch
    return summarise(variant, "training", batch, flops, times, errors, memory, {})


def summarise(variant: Variant, mode: str, batch: int, flops: int, times: dict[str, list[float]],
              errors: dict[str, float], memory: dict[str, int], extra: dict) -> dict:
    sg = statistics.median(times.pop("sgemm 2048^3"))
    sgemm_rate = 2 * 2048 ** 3 / sg
    med = {k: statistics.median(v) for k, v in times.items()}
    timm_best = min(med["timm NCHW"], med["timm channels_last"])
    rows = []
    for name, t in med.items():
        rate = flops / t
        rows.append(dict(
            candidate=name, images_per_s=batch / t, ms=1e3 * t, speedup_vs_timm_best=timm_best / t,
            gflops=rate / 1e9, fraction_of_sgemm=rate / sgemm_rate, max_rel_err=errors.get(name),
            peak_mib=memory.get(name, 0) / 2 ** 20, times_ms=[1e3 * v for v in times[name]],
        ))
    return dict(variant=variant.name, mode=mode, batch=batch, img_size=variant.img_size,
                gflop_per_call=flops / 1e9, sgemm_gflops=sgemm_rate / 1e9, rows=rows, **extra)


def markdown(results: list[dict], header: dict) -> str:
    out = [
        "# ConvMixer CPU benchmark", "",
        f"torch {header['torch']}, timm {header['timm']}, {header['threads']} threads, {header['cpu']}; "
        f"{header['repeats']} interleaved repeats, medians. Command: `{header['command']}`", "",
        f"Process settings, shared by every candidate: glibc allocator thresholds {header['allocator']}; "
        f"convmixer-timm training kernels {header['kernels']}.", "",
    ]
    for r in results:
        extra = f", optimize_for_inference picked pointwise={r['pointwise']}" if r.get("pointwise") else ""
        extra += f", depthwise={r['depthwise']}" if r.get("depthwise") else ""
        out += [
            f"## {r['variant']} {r['mode']}, batch {r['batch']} ({r['img_size']} px)",
            f"sgemm 2048^3 in the same rounds: {r['sgemm_gflops']:.1f} GFLOP/s; "
            f"{r['gflop_per_call']:.2f} GFLOP per call{extra}", "",
            "| candidate | img/s | ms | x timm best | GFLOP/s | of sgemm | peak MiB | max rel err |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            err = "-" if row["max_rel_err"] is None else f"{row['max_rel_err']:.1e}"
            out.append(
                f"| {row['candidate']} | {row['images_per_s']:.1f} | {row['ms']:.1f} | "
                f"{row['speedup_vs_timm_best']:.2f} | {row['gflops']:.1f} | {100 * row['fraction_of_sgemm']:.0f}% | "
                f"{row['peak_mib']:.0f} | {err} |")
        if r.get("note"):
            out.append(f"\n{r['note']}")
        out.append("")
    return "\n".join(out)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_BATCH), choices=list(VARIANTS_BY_NAME))
    parser.add_argument("--modes", nargs="+", default=["inference", "training"], choices=["inference", "training"])
    parser.add_argument("--batch", type=int, default=None, help="one batch size for all variants (default: the "
                        "issue's per-variant sizes)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime candidate")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the Markdown report here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    # Building a ConvMixer applies these anyway; done first so the header states them (the allocator setting is
    # process-wide, so timm's built-in runs with it too: CONVMIXER_TIMM_TUNE_MALLOC=0 for glibc's defaults).
    allocator = "raised (convmixer_timm.allocator)" if tune_cpu_allocator() else "glibc defaults"
    built = "built" if kernels.load() is not None else "off (PyTorch ops)"
    header = dict(torch=torch.__version__, timm=timm.__version__, threads=torch.get_num_threads(),
                  cpu=_cpu_name(), repeats=args.repeats, allocator=allocator, kernels=built,
                  command="python " + " ".join([os.path.relpath(__file__), *(argv if argv is not None
                                                                             else sys.argv[1:])]))
    results = []
    for name in args.variants:
        variant = VARIANTS_BY_NAME[name]
        batch = args.batch or DEFAULT_BATCH.get(name, 1)
        for mode in args.modes:
            if mode == "inference":
                r = bench_inference(variant, batch, args.repeats, args.warmup, not args.no_onnx)
            else:
                r = bench_training(variant, batch, args.repeats, args.warmup)
            results.append(r)
            print(markdown([r], header).split("\n", 4)[-1], flush=True, file=sys.stderr)
    md = markdown(results, header)
    if args.markdown:
        args.markdown.write_text(md + "\n")
    if args.json:
        args.json.write_text(json.dumps(dict(header=header, results=results), indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

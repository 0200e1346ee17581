"""CPU throughput of ConvMixer: timm's built-in vs convmixer-timm vs ONNX Runtime and OpenVINO, one command.

    python benchmarks/bench.py                      # every variant, inference + training, Markdown on stdout
    python benchmarks/bench.py --variants convmixer_256_8_ks5_p2 --json results.json --markdown results.md
    python benchmarks/bench.py --batch 1            # batch 1, inference and training

Every candidate gets the same weights (timm's built-in ``ConvMixer`` with randomised BatchNorm statistics,
loaded into the others) and the same input. Candidates are timed *interleaved* in one process (one call of each
per round, ``--repeats`` rounds), so load from other processes hits all of them alike; the median per candidate
is reported as images/s, as a ratio to timm's best memory format, and as a fraction of a 2048^3 sgemm rate that
is timed in the same rounds. Model FLOPs are 2 x analytic MACs (``Variant.macs``), x3 for a training step
(forward, backward, SGD). Peak memory is the largest amount of tensor memory allocated above the weights during
one call, from the PyTorch profiler's allocation events (it cannot see a foreign runtime's allocations).

Inference candidates: timm NCHW, timm channels_last, convmixer-timm's model (NCHW, eval), and two of its
``optimize_for_inference`` modules: the default (no ``input_size``; called once on the input before the rounds, so
any first-call tuning is reported apart, as its first-call seconds) and ``input_size=`` the benchmark's shape.
Then the foreign runtimes on the project's own ONNX export (``convmixer_timm.export.export_onnx``): onnxruntime
(``--no-onnx`` skips it) and OpenVINO FP32 (``--no-openvino``), each skipped with a note where not installed.
OpenVINO runs under both PERFORMANCE_HINTs, LATENCY (one request of the whole batch on all threads) and THROUGHPUT
(the batch split over its streams' infer requests); the faster counts as OpenVINO (``--openvino-hint`` times one).

A foreign runtime is timed in rounds of its own, after the PyTorch rounds, interleaved with timm channels_last,
and its times are scaled by that candidate's per-round ratio between the two sets of rounds. It is created after
the PyTorch rounds and released (and garbage-collected) before the next variant's, so its thread pool never
runs beside the rounds the PyTorch candidates are judged in (onnxruntime's spinning workers made them 2-3x
slower). Checked (2 cores, torch 2.14, onnxruntime 1.32, OpenVINO 2026.4): with spinning off, an idle session
or compiled model burns 0.1-0.9 ms of CPU after a call, so it does not slow timm channels_last in its rounds;
PyTorch's OpenMP workers burn 8-9 ms after each call, which the foreign call after it would pay for; hence the
untimed pause before every timed call (``SETTLE_S``). Each variant's report states how far timm channels_last
moved between the two sets of rounds (1.00x where the load did not change), and warns beyond 10%.

Training candidates: timm NCHW / channels_last and convmixer-timm's default model fed NCHW (what timm's
``train.py`` runs: the training default) / channels_last, one step of forward + cross-entropy + backward + SGD.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

# Benchmark the checkout this file is in, not an installed copy (timm's start-up hook may import one early).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from timm.models.convmixer import ConvMixer as TimmConvMixer
from torch import nn

from convmixer_timm import VARIANTS_BY_NAME, ConvMixer, Variant
from convmixer_timm.export import export_onnx
from convmixer_timm.speed import kernel_info, optimize_for_inference

# Default batch sizes: CIFAR 64 (k5, k7) / 32 (k9), 512/16 batch 8, 768/32 batch 4, 1536/20 batch 2.
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


# The input every candidate gets: --in-chans / --img-size (None: the variant's own size).
INPUT: dict[str, int | None] = {"in_chans": 3, "img_size": None}


def input_shape(variant: Variant, batch: int) -> tuple[int, int, int, int]:
    size = INPUT["img_size"] or variant.img_size
    return batch, INPUT["in_chans"], size, size


def input_macs(variant: Variant) -> int:
    return variant.macs(INPUT["img_size"] or variant.img_size, in_chans=INPUT["in_chans"])


def build_models(variant: Variant, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    act = nn.GELU if variant.act == "gelu" else nn.ReLU
    ref = TimmConvMixer(variant.h, variant.d, variant.k, variant.p, in_chans=INPUT["in_chans"],
                        num_classes=variant.num_classes, act_layer=act)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    ours = ConvMixer(variant.h, variant.d, variant.k, variant.p, in_chans=INPUT["in_chans"],
                     num_classes=variant.num_classes, act_layer=variant.act)
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


# After a call, PyTorch's OpenMP workers spin before they sleep (libgomp's GOMP_SPINCOUNT): measured here, 8-9 ms
# of CPU time burnt in the 20 ms after a timm or sgemm call, against 0.1 ms for onnxruntime (spinning off) and
# 0.1-0.9 ms for OpenVINO. A foreign runtime's call timed right after a PyTorch one would share the cores with
# that spinning, so every timed call starts after this pause (untimed), with the previous call's threads asleep.
SETTLE_S = 0.05


def interleave(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def picked(module: nn.Module) -> dict:
    """Which path an ``optimize_for_inference`` module chose, per input shape it has seen."""
    choices = getattr(module, "choices", None)
    if isinstance(choices, dict):
        return {"paths": {"x".join(map(str, key[0])): name for key, name in choices.items()}}
    return {"module": type(module).__name__}


# Foreign runtimes: a builder takes (ONNX path, input, threads, options) and returns ({row name: fn}, details).
# The fns hold the only references to the session / compiled model, so dropping them releases it.
def onnxruntime_candidates(path: Path, x: torch.Tensor, threads: int, options: dict) -> tuple[dict, dict]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # onnxruntime's idle threads spin by default and would steal the cores from PyTorch's.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x_np = x.numpy()
    return {"onnxruntime": lambda: torch.from_numpy(session.run(None, {"input": x_np})[0])}, {}


def openvino_candidates(path: Path, x: torch.Tensor, threads: int, options: dict) -> tuple[dict, dict]:
    """OpenVINO FP32 on the CPU under each requested PERFORMANCE_HINT.

    LATENCY: one stream on all threads, one synchronous request for the whole batch (static input shape).
    THROUGHPUT: OpenVINO's streams (threads split among them), the batch split over its optimal number of infer
    requests, run through an ``AsyncInferQueue``: how OpenVINO is meant to be fed a batch for throughput.
    """
    import numpy as np
    import openvino as ov

    core = ov.Core()
    x_np = x.numpy()
    batch = x.shape[0]
    out: dict[str, Callable[[], torch.Tensor]] = {}
    details: dict[str, str] = {}
    for hint in options["hints"]:
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads}
        model = core.read_model(str(path))
        if hint == "LATENCY":
            model.reshape({model.inputs[0]: list(x.shape)})
            compiled = core.compile_model(model, "CPU", config)
            request = compiled.create_infer_request()

            def run(request=request) -> torch.Tensor:
                request.infer({0: x_np}, share_inputs=True)
                return torch.from_numpy(request.get_output_tensor(0).data.copy())
        else:
            probe = core.compile_model(model, "CPU", config)
            jobs = max(1, min(batch, int(probe.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))))
            del probe
            chunks = [np.ascontiguousarray(c) for c in np.array_split(x_np, jobs)]
            if batch % jobs == 0:  # equal chunks: a static shape, as for LATENCY
                model.reshape({model.inputs[0]: list(chunks[0].shape)})
            compiled = core.compile_model(model, "CPU", config)
            queue = ov.AsyncInferQueue(compiled, jobs)
            results: list = [None] * jobs

            def keep(request, i: int, results=results) -> None:
                results[i] = request.get_output_tensor(0).data.copy()

            queue.set_callback(keep)

            def run(queue=queue, chunks=chunks, results=results) -> torch.Tensor:
                for i, chunk in enumerate(chunks):
                    queue.start_async({0: chunk}, i, share_inputs=True)
                queue.wait_all()
                return torch.from_numpy(np.concatenate(results))
        precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        if "f32" not in precision and "float32" not in precision:
            raise RuntimeError(f"OpenVINO compiled for {precision}, not f32")
        details[hint] = f"{int(compiled.get_property('NUM_STREAMS'))} stream(s)" + (
            "" if hint == "LATENCY" else f", {len(chunks)} request(s)")
        out[f"OpenVINO {hint}"] = run
    return out, details


FOREIGN = {"onnxruntime": onnxruntime_candidates, "openvino": openvino_candidates}


def time_foreign(runtime: str, build: Callable[..., tuple[dict, dict]], path: Path, x: torch.Tensor, options: dict,
                 bridge: Callable[[], torch.Tensor], expected: torch.Tensor, repeats: int, warmup: int,
                 times: dict[str, list[float]], errors: dict[str, float], info: dict) -> None:
    """Time one foreign runtime in rounds of its own against ``bridge`` (timm channels_last), scaled into ``times``.

    Skipped with a note in ``info`` where the runtime is missing or fails; the runtime is released on return.
    """
    try:
        fns, details = build(path, x, torch.get_num_threads(), options)
        for name, fn in fns.items():
            errors[name] = rel_err(expected, fn())
        own = interleave({**fns, "bridge": bridge}, repeats, warmup)
    except ImportError as e:
        info["notes"].append(f"{runtime} skipped: not installed ({e.name or e}); `pip install -e .[bench]`")
        return
    except Exception as e:  # the other numbers are still worth having
        info["notes"].append(f"{runtime} skipped: {e!r}")
        return
    finally:
        fns = None
        gc.collect()
    # Scaled per round: a load change during the foreign rounds hits both of a round's calls alike.
    main = statistics.median(times["timm channels_last"])
    for name, values in own.items():
        if name != "bridge":
            times[name] = [t * main / b for t, b in zip(values, own["bridge"], strict=True)]
    info["foreign"] += [name for name in own if name != "bridge"]
    info["foreign_scale"][runtime] = scale = statistics.median(own["bridge"]) / main
    if abs(scale - 1.0) > 0.1:
        info["notes"].append(f"Warning: timm channels_last ran {scale:.2f}x its main-round time beside {runtime}: "
                             "the machine's load changed, so that runtime's scaled times are uncertain.")
    if details:
        info.setdefault("foreign_details", {})[runtime] = details


TORCH_ONLY = "optimize_for_inference(backend='torch')"
COMPILED_TRAINING = "convmixer-timm compiled NCHW"


def bench_inference(variant: Variant, batch: int, repeats: int, warmup: int, runtimes: dict[str, dict]) -> dict:
    ref, ours = build_models(variant)
    ref.eval()
    ours.eval()
    x = torch.randn(input_shape(variant, batch))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    info: dict = {"notes": [], "foreign": [], "foreign_scale": {}, "picked": {}, "seconds": {}}
    with torch.no_grad():
        # The default: no input_size. Its first call may tune for the shape it sees; that is timed on its own.
        # cache=False: each module races for itself, instead of reusing a choice remembered by an earlier module
        # or run (benchmarks/first_call.py measures the remembered case).
        t0 = time.perf_counter()
        fast = optimize_for_inference(ours, cache=False)
        t1 = time.perf_counter()
        fast(x)
        info["seconds"]["optimize_for_inference"] = dict(build=t1 - t0, first_call=time.perf_counter() - t1)
        t0 = time.perf_counter()
        fast_sized = optimize_for_inference(ours, input_size=tuple(x.shape), cache=False)
        t1 = time.perf_counter()
        fast_sized(x)
        info["seconds"]["optimize_for_inference(input_size)"] = dict(build=t1 - t0, first_call=time.perf_counter() - t1)
        # PyTorch's paths alone: what the default gives where neither onnxruntime nor OpenVINO is installed.
        t0 = time.perf_counter()
        fast_torch = optimize_for_inference(ours, backend="torch", cache=False)
        t1 = time.perf_counter()
        fast_torch(x)
        info["seconds"][TORCH_ONLY] = dict(build=t1 - t0, first_call=time.perf_counter() - t1)
    info["picked"] = {"optimize_for_inference": picked(fast), "optimize_for_inference(input_size)": picked(fast_sized),
                      TORCH_ONLY: picked(fast_torch)}
    cands: dict[str, Callable[[], torch.Tensor]] = {
        "timm NCHW": lambda: ref(x),
        "timm channels_last": lambda: ref_cl(x_cl),
        "convmixer-timm": lambda: ours(x),
        "optimize_for_inference": lambda: fast(x),
        "optimize_for_inference(input_size)": lambda: fast_sized(x),
        TORCH_ONLY: lambda: fast_torch(x),
    }
    with torch.no_grad():
        expected = ref(x)
        errors = {k: rel_err(expected, fn()) for k, fn in cands.items()}
        times = interleave({**cands, "sgemm 2048^3": sgemm()}, repeats, warmup)
        memory = {k: peak_memory(fn) for k, fn in cands.items()}
        if runtimes:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    path = export_onnx(ours, Path(tmp) / "model.onnx", tuple(x.shape))
                except Exception as e:
                    info["notes"].append(f"ONNX export failed, no foreign runtime timed: {e!r}")
                else:
                    for runtime, options in runtimes.items():
                        time_foreign(runtime, FOREIGN[runtime], path, x, options, cands["timm channels_last"],
                                     expected, repeats, warmup, times, errors, info)
    flops = 2 * input_macs(variant) * batch
    return summarise(variant, "inference", batch, flops, times, errors, memory, info)


def bench_training(variant: Variant, batch: int, repeats: int, warmup: int, compiled: bool = True) -> dict:
    ref, ours = build_models(variant)
    x = torch.randn(input_shape(variant, batch))
    target = torch.randint(0, variant.num_classes, (batch,))
    models = {
        "timm NCHW": (copy.deepcopy(ref), x),
        "timm channels_last": (copy.deepcopy(ref).to(memory_format=torch.channels_last),
                               x.contiguous(memory_format=torch.channels_last)),
        "convmixer-timm NCHW": (copy.deepcopy(ours), x),
        "convmixer-timm channels_last": (copy.deepcopy(ours).to(memory_format=torch.channels_last),
                                         x.contiguous(memory_format=torch.channels_last)),
    }
    if compiled:  # torch.compile (inductor, train.py --torchcompile), each model in its best and the default layout
        models.update({
            "timm compiled NCHW": (torch.compile(copy.deepcopy(ref)), x),
            "timm compiled channels_last": (torch.compile(copy.deepcopy(ref).to(memory_format=torch.channels_last)),
                                            x.contiguous(memory_format=torch.channels_last)),
            COMPILED_TRAINING: (torch.compile(copy.deepcopy(ours)), x),
        })
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
    flops = 3 * 2 * input_macs(variant) * batch
    return summarise(variant, "training", batch, flops, times, errors, memory, {})


def summarise(variant: Variant, mode: str, batch: int, flops: int, times: dict[str, list[float]],
              errors: dict[str, float], memory: dict[str, int], extra: dict) -> dict:
    sg = statistics.median(times.pop("sgemm 2048^3"))
    sgemm_rate = 2 * 2048 ** 3 / sg
    med = {k: statistics.median(v) for k, v in times.items()}
    timm_best = min(med["timm NCHW"], med["timm channels_last"])  # eager, as every earlier result file
    timm_best_any = min(t for k, t in med.items() if k.startswith("timm "))  # torch.compile included
    foreign = extra.get("foreign", [])
    fastest_foreign = min(foreign, key=med.get) if foreign else None
    rows = []
    for name, t in med.items():
        rate = flops / t
        rows.append(dict(
            candidate=name, images_per_s=batch / t, ms=1e3 * t, speedup_vs_timm_best=timm_best / t,
            speedup_vs_timm_best_any=timm_best_any / t,
            speedup_vs_fastest_foreign=med[fastest_foreign] / t if fastest_foreign else None,
            gflops=rate / 1e9, fraction_of_sgemm=rate / sgemm_rate, max_rel_err=errors.get(name),
            peak_mib=memory[name] / 2 ** 20 if name in memory else None, times_ms=[1e3 * v for v in times[name]],
        ))
    return dict(variant=variant.name, mode=mode, batch=batch, img_size=input_shape(variant, 1)[2],
                in_chans=INPUT["in_chans"],
                gflop_per_call=flops / 1e9, sgemm_gflops=sgemm_rate / 1e9, fastest_foreign=fastest_foreign,
                rows=rows, **extra)


def _row(result: dict, candidate: str) -> dict | None:
    return next((row for row in result["rows"] if row["candidate"] == candidate), None)


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "x") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _picked_text(picked_info: dict) -> str:
    rest = ", ".join(f"{k}={v}" for k, v in picked_info.items() if k != "module")
    return picked_info.get("module", "?") + (f" ({rest})" if rest else "")


def markdown_header(header: dict) -> list[str]:
    env = ", ".join(f"{k}={v}" for k, v in header["env"].items())
    out = [
        "# ConvMixer CPU benchmark", "",
        f"CPU: {header['cpu']} ({header['machine']}); {header['cpu_features']}; PyTorch's CPU capability "
        f"{header['torch_cpu_capability']}; {header['threads']} threads.", "",
        f"Environment: {env}.", "",
        f"torch {header['torch']}, timm {header['timm']}, onnxruntime {header['onnxruntime']}, "
        f"openvino {header['openvino']}; {header['repeats']} interleaved repeats, medians. "
        f"Command: `{header['command']}`", "",
        f"Process settings: glibc allocator thresholds {header['allocator']}; "
        f"convmixer-timm kernels {header['kernels']}.", "",
    ]
    setup = {"onnxruntime": f"onnxruntime: CPUExecutionProvider, {header['threads']} intra-op threads, spinning off",
             "openvino": f"OpenVINO FP32: CPU, INFERENCE_PRECISION_HINT=f32, INFERENCE_NUM_THREADS="
                         f"{header['threads']}, {header['openvino_setup']}"}
    if header["foreign_runtimes"]:
        out += ["Foreign runtimes on the project's ONNX export (opset 17), each timed in rounds of its own against "
                "timm channels_last and scaled (module docstring). "
                + "; ".join(setup[k] for k in header["foreign_runtimes"]) + ".", ""]
    return out


def markdown_result(r: dict) -> list[str]:
    shape = f"{r.get('in_chans', 3)}x{r['img_size']}x{r['img_size']}"
    out = [f"## {r['variant']} {r['mode']}, batch {r['batch']} ({shape})",
           f"sgemm 2048^3 in the same rounds: {r['sgemm_gflops']:.1f} GFLOP/s; "
           f"{r['gflop_per_call']:.2f} GFLOP per call"]
    for name, info in r.get("picked", {}).items():
        sec = r["seconds"][name]
        out.append(f"- {name} runs {_picked_text(info)}; built in {sec['build']:.2f} s, first call "
                   f"{sec['first_call']:.2f} s (excluded from the timings)")
    if r.get("foreign_scale"):
        out.append("- foreign runtimes' own rounds: timm channels_last took " + ", ".join(
            f"{v:.2f}x (beside {k})" for k, v in r["foreign_scale"].items()) + " its time in the main rounds")
    for runtime, details in r.get("foreign_details", {}).items():
        out.append(f"- {runtime}: " + "; ".join(f"{k} {v}" for k, v in details.items()))
    foreign = bool(r.get("fastest_foreign"))
    out += ["", "| candidate | img/s | ms | x timm best |" + (" x fastest foreign |" if foreign else "")
            + " GFLOP/s | of sgemm | peak MiB | max rel err |",
            "|---|---|---|---|" + ("---|" if foreign else "") + "---|---|---|---|"]
    for row in r["rows"]:
        err = "-" if row["max_rel_err"] is None else f"{row['max_rel_err']:.1e}"
        vs_foreign = f" {_fmt(row['speedup_vs_fastest_foreign'], suffix='')} |" if foreign else ""
        out.append(
            f"| {row['candidate']} | {row['images_per_s']:.1f} | {row['ms']:.1f} | "
            f"{row['speedup_vs_timm_best']:.2f} |{vs_foreign} {row['gflops']:.1f} | "
            f"{100 * row['fraction_of_sgemm']:.0f}% | {_fmt(row['peak_mib'], '.0f', '')} | {err} |")
    if foreign:
        ours = [f"{name} {_fmt(_row(r, name)['speedup_vs_fastest_foreign'])}"
                for name in r.get("picked", {}) if _row(r, name)]
        out.append(f"\nAgainst the fastest foreign runtime ({r['fastest_foreign']}): " + ", ".join(ours))
    out += [f"\n{note}" for note in r.get("notes", [])]
    out.append("")
    return out


def markdown_summary(results: list[dict]) -> list[str]:
    """Per variant and batch: ours against timm's best and the fastest foreign runtime, and of sgemm."""
    keyed: dict[tuple[str, int], dict[str, dict]] = {}
    for r in results:
        keyed.setdefault((r["variant"], r["batch"]), {})[r["mode"]] = r
    out = ["## Summary", "",
           "Ratios are speedups (>1: ours faster). Inference: `optimize_for_inference(model)` (the default, "
           "which also times the installed runtimes), with `input_size`, and with `backend='torch'` (PyTorch's "
           "paths only); training: the default model fed NCHW (convmixer-timm NCHW), against timm's better eager "
           "layout, and the default model under torch.compile against the best of timm's eager and compiled runs.",
           "",
           "| variant (batch) | optimize_for_inference vs timm best | with input_size | PyTorch paths only "
           "| vs fastest foreign (default / input_size / PyTorch only) | fastest foreign | inference of sgemm "
           "| training default vs timm best | training of sgemm | compiled training vs timm best (eager or compiled) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for (variant, batch), modes in keyed.items():
        inf, train = modes.get("inference"), modes.get("training")
        default = _row(inf, "optimize_for_inference") if inf else None
        sized = _row(inf, "optimize_for_inference(input_size)") if inf else None
        torch_only = _row(inf, TORCH_ONLY) if inf else None
        step = _row(train, "convmixer-timm NCHW") if train else None
        compiled_step = _row(train, COMPILED_TRAINING) if train else None
        fastest = inf.get("fastest_foreign") if inf else None
        vs_foreign = " / ".join(_fmt(row['speedup_vs_fastest_foreign']) for row in (default, sized, torch_only)
                                if row) if fastest else "-"
        out.append(
            f"| {variant} ({batch}) | {_fmt(default and default['speedup_vs_timm_best'])} | "
            f"{_fmt(sized and sized['speedup_vs_timm_best'])} | "
            f"{_fmt(torch_only and torch_only['speedup_vs_timm_best'])} | {vs_foreign} | {fastest or '-'} | "
            f"{_fmt(default and 100 * default['fraction_of_sgemm'], '.0f', '%')} | "
            f"{_fmt(step and step['speedup_vs_timm_best'])} | "
            f"{_fmt(step and 100 * step['fraction_of_sgemm'], '.0f', '%')} | "
            f"{_fmt(compiled_step and compiled_step['speedup_vs_timm_best_any'])} |")
    out.append("")
    return out


def markdown(results: list[dict], header: dict) -> str:
    out = markdown_header(header)
    for r in results:
        out += markdown_result(r)
    return "\n".join(out + markdown_summary(results))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_features() -> str:
    """The instruction sets that decide which kernels run: AVX2+FMA and AVX-512 on x86-64, SVE on aarch64."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return "CPU flags unknown (no /proc/cpuinfo)"
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "SVE " + ("yes" if "sve" in flags else "no") + ", ASIMD " + ("yes" if "asimd" in flags else "no")
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    amx = sorted(f for f in flags if f.startswith("amx"))
    return (f"AVX2+FMA {'yes' if {'avx2', 'fma'} <= flags else 'no'}; "
            f"AVX-512 {'yes (' + ' '.join(avx512) + ')' if avx512 else 'no'}" + (f"; {' '.join(amx)}" if amx else ""))


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


ENV_VARS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "CONVMIXER_TIMM_CPU_ISA", "ATEN_CPU_CAPABILITY",
            "OMP_NUM_THREADS")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_BATCH), choices=list(VARIANTS_BY_NAME))
    parser.add_argument("--modes", nargs="+", default=["inference", "training"], choices=["inference", "training"])
    parser.add_argument("--batch", type=int, default=None, help="one batch size for all variants, 1 included "
                        "(default: each variant's size in DEFAULT_BATCH)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--in-chans", type=int, default=3, help="input channels (1: grey images)")
    parser.add_argument("--img-size", type=int, default=None, help="image size (default: each variant's own)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime candidate")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile training candidates")
    parser.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO candidates")
    parser.add_argument("--openvino-hint", choices=["both", "latency", "throughput"], default="both",
                        help="OpenVINO PERFORMANCE_HINT to time (default both; the faster counts)")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the Markdown report here")
    args = parser.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be >= 1")
    INPUT.update(in_chans=args.in_chans, img_size=args.img_size)
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    # glibc's allocator thresholds are raised only where the user asks (speed/allocator.py); the setting is
    # process-wide, so when asked, timm's training candidates share it in those rounds.
    from convmixer_timm.speed.allocator import training_tunes_allocator

    allocator = ("raised while convmixer-timm models train on the CPU (CONVMIXER_TIMM_TUNE_MALLOC=1), shared by "
                 "timm's training candidates" if training_tunes_allocator() else "glibc defaults")
    hints = ["LATENCY", "THROUGHPUT"] if args.openvino_hint == "both" else [args.openvino_hint.upper()]
    runtimes: dict[str, dict] = {}
    if not args.no_onnx:
        runtimes["onnxruntime"] = {}
    if not args.no_openvino:
        runtimes["openvino"] = {"hints": hints}
    ov_setup = ("PERFORMANCE_HINT " + " and ".join(hints) + (" both timed, the faster counts" if len(hints) > 1
                else "") + "; LATENCY: one request of the whole batch, THROUGHPUT: the batch split over its "
                "infer requests (AsyncInferQueue); static input shapes")
    header = dict(
        torch=torch.__version__, timm=timm.__version__, onnxruntime=_version("onnxruntime"),
        openvino=_version("openvino"), threads=torch.get_num_threads(), cpu=_cpu_name(), machine=platform.machine(),
        cpu_features=_cpu_features(),
        torch_cpu_capability=getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
        env={name: os.environ.get(name, "unset") for name in ENV_VARS}, repeats=args.repeats, allocator=allocator,
        kernels=", ".join(f"{k}={v}" for k, v in kernel_info().items()), openvino_setup=ov_setup,
        foreign_runtimes=list(runtimes) if "inference" in args.modes else [],
        command="python " + " ".join([os.path.relpath(__file__), *(argv if argv is not None else sys.argv[1:])]))
    results = []
    for name in args.variants:
        variant = VARIANTS_BY_NAME[name]
        batch = args.batch if args.batch is not None else DEFAULT_BATCH.get(name, 1)
        for mode in args.modes:
            if mode == "inference":
                r = bench_inference(variant, batch, args.repeats, args.warmup, runtimes)
            else:
                r = bench_training(variant, batch, args.repeats, args.warmup, compiled=not args.no_compile)
            results.append(r)
            print("\n".join(markdown_result(r)), flush=True, file=sys.stderr)
    md = markdown(results, header)
    if args.markdown:
        args.markdown.write_text(md + "\n")
    if args.json:
        args.json.write_text(json.dumps(dict(header=header, results=results), indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

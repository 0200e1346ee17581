"""What a server pays for ``optimize_for_inference``: the first call of a new shape, cold and warm, and whether the
path it chose holds up in steady state. One command:

    python benchmarks/first_call.py                                  # 5 runs of each variant, Markdown on stdout
    python benchmarks/first_call.py --runs 5 --json first_call.json --markdown first_call.md
    python benchmarks/first_call.py --variants cifar --runs 2 --rounds 3 --no-compile   # a quick look

Variants: ``cifar`` is convmixer_256_8_ks5_p2 at batch 64, ``imagenet`` convmixer_768_32 at batch 2
(``--imagenet-depth`` cuts it, stated in the report). Every run is two fresh processes sharing an empty choice
cache of their own (never the user's):

* cold: ``optimize_for_inference(model)`` and its first call, timed together (the race for the shape happens in
  that call); then, in the same process, the steady state of the default (its chosen path, through the module)
  and of every path it could have chosen, built for the whole model and timed interleaved in ``--rounds`` rounds
  (medians; one untimed call each first; a ``SETTLE_S`` pause before every timed call, as in ``bench.py``, so no
  path pays for the previous one's spinning threads). Also timm's built-in in both layouts, and, unless
  ``--no-compile``, ``torch.compile`` (inductor) of timm's model with ``freezing`` set only inside a
  ``torch._inductor.config.patch`` context: its first call (the compilation) is reported beside ours;
* warm: a new process with the choice the cold one left in the cache: construction and first call.

The within-5% check reads: the default's steady median over the fastest median of the paths measured in the same
process (``default / fastest``); 1.00x is the best possible, runs above 1.05x fail. Beside it: the same ratio of
fastest calls (``by min``, less sensitive to other processes' load), and the default over its own chosen path's
row, which runs the same object: that ratio is the run's noise floor, how far apart two identical paths measured
(1.00x on a quiet machine). Figures are wall-clock
seconds from ``time.perf_counter`` in this benchmark; the library takes its clock as a parameter
(``AutotunedConvMixer(clock=...)``), which the tests replace with a fake one.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Benchmark the checkout this file is in, not an installed copy; bench.py's model builder and CPU description.
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

VARIANTS = {"cifar": ("convmixer_256_8_ks5_p2", 64), "imagenet": ("convmixer_768_32", 2)}
SETTLE_S = 0.05
WITHIN = 1.05


def _time(clock: Callable[[], float], fn: Callable[[], object]) -> float:
    start = clock()
    fn()
    return clock() - start


def interleave(fns: dict[str, Callable[[], object]], rounds: int, clock: Callable[[], float] = time.perf_counter,
               settle: float = SETTLE_S) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Median-ready times per path: one untimed call each, then ``rounds`` rounds in a rotated order.

    A path that raises is left out with its error (a foreign runtime that fails here says nothing about ours)."""
    errors: dict[str, str] = {}
    alive = {}
    for name, fn in fns.items():
        try:
            fn()
            alive[name] = fn
        except Exception as error:
            errors[name] = f"{type(error).__name__}: {error}"
    times: dict[str, list[float]] = {name: [] for name in alive}
    order = list(alive)
    for index in range(rounds):
        shift = index % len(order)
        for name in order[shift:] + order[:shift]:
            time.sleep(settle)
            times[name].append(_time(clock, alive[name]))
    return times, errors


def _model(name: str, depth: int | None):
    import torch
    from bench import build_models

    from convmixer_timm import VARIANTS_BY_NAME

    variant = VARIANTS_BY_NAME[name]
    if depth is not None:
        variant = dataclasses.replace(variant, d=depth)
    ref, ours = build_models(variant)
    return variant, ref.eval(), ours.eval(), torch


def worker(args: argparse.Namespace) -> dict:
    """One fresh process: ``cold`` (first call, then steady state of every path) or ``warm`` (first call)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="  [%(process)d] %(message)s", stream=sys.stderr)
    name, _ = VARIANTS[args.variant]
    variant, ref, ours, torch = _model(name, args.depth)
    from convmixer_timm.speed import optimize_for_inference

    x = torch.randn(args.batch, 3, variant.img_size, variant.img_size)
    out: dict = {}
    with torch.no_grad():
        start = time.perf_counter()
        fast = optimize_for_inference(ours, cache=args.cache)
        fast(x)
        out["first_call_s"] = time.perf_counter() - start
    entry = next(iter(fast._entries.values()))
    out.update(choice=entry.name, source=entry.source, tunings=fast.tunings)
    if args.mode == "warm":
        return out
    ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    fns: dict[str, Callable[[], object]] = {"default": lambda: fast(x)}
    for path in fast.paths():
        fns[path] = lambda path=path: fast.run_path(path, x)
    for path, build in fast._foreign_builders().items():
        try:
            runner = entry.runner if path == entry.name else build(fast.plain, tuple(x.shape), True)
            fns[path] = lambda runner=runner: runner(x)
        except Exception as error:
            out.setdefault("build_errors", {})[path] = f"{type(error).__name__}: {error}"
    fns["timm NCHW"] = lambda: ref(x)
    fns["timm channels_last"] = lambda: ref_cl(x_cl)
    if args.compile:
        fns.update(_compiled(ref, x_cl, out))
    with torch.no_grad():
        times, errors = interleave(fns, args.rounds)
    medians = {path: statistics.median(values) for path, values in times.items()}
    lows = {path: min(values) for path, values in times.items()}
    paths = {p: t for p, t in medians.items() if p != "default" and not p.startswith(("timm", "torch.compile"))}
    fastest = min(paths, key=paths.get)
    fastest_low = min((p for p in paths), key=lows.get)
    timm_best = min(medians["timm NCHW"], medians["timm channels_last"])
    # The default runs the same object as its chosen path's row: their ratio is this run's noise floor.
    out.update(ms={p: 1e3 * t for p, t in medians.items()}, min_ms={p: 1e3 * t for p, t in lows.items()},
               errors=errors, fastest=fastest, default_over_fastest=medians["default"] / paths[fastest],
               default_over_fastest_min=lows["default"] / lows[fastest_low],
               default_over_own_path=medians["default"] / medians[entry.name] if entry.name in medians else None,
               timm_best_over_default=timm_best / medians["default"])
    return out


def _compiled(ref, x, out: dict) -> dict[str, Callable[[], object]]:
    """torch.compile (inductor) of timm's eval model, channels_last, with freezing set only while it runs."""
    import torch
    from torch._inductor import config

    model = copy.deepcopy(ref).to(memory_format=torch.channels_last).eval()
    compiled = torch.compile(model)

    def run():
        # Scoped: freezing (constant-folding the weights into the graph) is on only inside this context, the
        # process-wide inductor settings stay as the user left them.
        with config.patch(freezing=True), torch.no_grad():
            return compiled(x)

    try:
        start = time.perf_counter()
        run()
        out["compile_first_call_s"] = time.perf_counter() - start
    except Exception as error:  # no compiler, an inductor limitation: reported, the rest still runs
        out["compile_error"] = f"{type(error).__name__}: {error}"
        return {}
    return {"torch.compile (freezing)": run}


def _run_worker(mode: str, variant: str, batch: int, depth: int | None, cache: Path, rounds: int,
                compile_: bool) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--variant", variant, "--batch",
               str(batch), "--cache", str(cache), "--rounds", str(rounds)]
    if depth is not None:
        command += ["--depth", str(depth)]
    if not compile_:
        command.append("--no-compile")
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"error": f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def markdown(report: dict) -> str:
    h = report["header"]
    out = ["# optimize_for_inference: first call and steady state", "",
           f"CPU: {h['cpu']} ({h['machine']}); {h['cpu_features']}; {h['threads']} threads. torch {h['torch']}, "
           f"timm {h['timm']}, onnxruntime {h['onnxruntime']}, openvino {h['openvino']}. Command: "
           f"`{h['command']}`", "",
           f"Each run: two fresh processes on an empty cache of their own; steady state: medians of {h['rounds']} "
           "interleaved rounds in the cold process. `default / fastest` is the default's steady median over the "
           "fastest path measured in the same process (pass: at most 1.05x).", ""]
    for v in report["variants"]:
        out += [f"## {v['name']} (depth {v['depth']}), batch {v['batch']}", "",
                "| run | cold first call s | choice | warm first call s (source) | default ms | fastest path (ms) "
                "| default / fastest | (by min) | default / its own path (noise) | x timm best "
                "| torch.compile first call s / ms |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, run in enumerate(v["runs"], 1):
            cold, warm = run["cold"], run["warm"]
            if "error" in cold:
                out.append(f"| {i} | {cold['error']} | | | | | | | | | |")
                continue
            ms = cold["ms"]
            compiled = (f"{cold['compile_first_call_s']:.1f} / {ms['torch.compile (freezing)']:.1f}"
                        if "torch.compile (freezing)" in ms else cold.get("compile_error", "-"))
            warm_text = (f"{warm['first_call_s']:.2f} ({warm['source']})" if "first_call_s" in warm
                         else warm.get("error", "-"))
            out.append(f"| {i} | {cold['first_call_s']:.2f} | {cold['choice']} | {warm_text} | "
                       f"{ms['default']:.1f} | {cold['fastest']} ({ms[cold['fastest']]:.1f}) | "
                       f"{cold['default_over_fastest']:.3f}x | {_ratio(cold.get('default_over_fastest_min'))} | "
                       f"{_ratio(cold.get('default_over_own_path'))} | {cold['timm_best_over_default']:.2f}x | "
                       f"{compiled} |")
        ok = [r["cold"] for r in v["runs"] if "error" not in r["cold"]]
        if ok:
            ratios = [c["default_over_fastest"] for c in ok]
            warm = [r["warm"]["first_call_s"] for r in v["runs"] if "first_call_s" in r["warm"]]
            out += ["", f"Cold first call: median {statistics.median(c['first_call_s'] for c in ok):.2f} s, max "
                    f"{max(c['first_call_s'] for c in ok):.2f} s; warm: median "
                    f"{statistics.median(warm) if warm else float('nan'):.2f} s. default / fastest: max "
                    f"{max(ratios):.3f}x; within {WITHIN:.2f}x in {sum(r <= WITHIN for r in ratios)} of "
                    f"{len(ratios)} runs."]
            paths = sorted({p for c in ok for p in c["ms"]})
            out += ["", "Steady state per path (ms, one column per run):", "",
                    "| path | " + " | ".join(str(i) for i in range(1, len(ok) + 1)) + " |",
                    "|---|" + "---|" * len(ok)]
            for p in paths:
                out.append(f"| {p} | " + " | ".join(f"{c['ms'][p]:.1f}" if p in c["ms"] else "-" for c in ok)
                           + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--runs", type=int, default=5, help="fresh (cold, warm) process pairs per variant")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved steady-state rounds in each cold run")
    parser.add_argument("--imagenet-depth", type=int, default=None, help="cut convmixer_768_32 to this depth")
    parser.add_argument("--cifar-batch", type=int, default=VARIANTS["cifar"][1])
    parser.add_argument("--imagenet-batch", type=int, default=VARIANTS["imagenet"][1])
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    # A worker's own arguments (the parent starts it):
    parser.add_argument("--worker", choices=["cold", "warm"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.mode = args.worker
        print(json.dumps(worker(args)))
        return 0
    from bench import _cpu_features, _cpu_name, _version

    cpu = _cpu_name()
    print(f"CPU: {cpu}; {_cpu_features()}", file=sys.stderr, flush=True)
    import torch

    header = dict(cpu=cpu, machine=platform.machine(), cpu_features=_cpu_features(), threads=torch.get_num_threads(),
                  torch=torch.__version__, timm=_version("timm"), onnxruntime=_version("onnxruntime"),
                  openvino=_version("openvino"), rounds=args.rounds, runs=args.runs,
                  command="python " + " ".join([os.path.relpath(__file__), *(argv if argv is not None
                                                                             else sys.argv[1:])]))
    report = {"header": header, "variants": []}
    for key in args.variants:
        name, _ = VARIANTS[key]
        batch = args.cifar_batch if key == "cifar" else args.imagenet_batch
        depth = args.imagenet_depth if key == "imagenet" else None
        from convmixer_timm import VARIANTS_BY_NAME

        entry = {"key": key, "name": name, "batch": batch, "depth": depth or VARIANTS_BY_NAME[name].d, "runs": []}
        for run in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="convmixer-first-call-") as tmp:
                print(f"{name} batch {batch}: run {run + 1}/{args.runs}, cold", file=sys.stderr, flush=True)
                cold = _run_worker("cold", key, batch, depth, Path(tmp), args.rounds, args.compile)
                print(f"{name} batch {batch}: run {run + 1}/{args.runs}, warm", file=sys.stderr, flush=True)
                warm = _run_worker("warm", key, batch, depth, Path(tmp), args.rounds, args.compile)
            entry["runs"].append({"cold": cold, "warm": warm})
            gc.collect()
        report["variants"].append(entry)
    md = markdown(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""benchmarks/bench.py's bookkeeping, on fake runtimes and fixed times: no wall clock is compared."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark

from convmixer_timm import VARIANTS_BY_NAME


@pytest.fixture(scope="module")
def bench():
    module = load_benchmark("bench")
    module.SETTLE_S = 0.0
    return module


def _info() -> dict:
    return {"notes": [], "foreign": [], "foreign_scale": {}, "picked": {}, "seconds": {}}


def test_missing_or_failing_runtime_is_a_note_not_a_crash(bench):
    def missing(*args):
        raise ModuleNotFoundError("No module named 'openvino'", name="openvino")

    def broken(*args):
        raise RuntimeError("no CPU plugin")

    times, errors, info = {"timm channels_last": [1.0]}, {}, _info()
    x = torch.zeros(1, 3, 4, 4)
    for runtime, build in (("openvino", missing), ("onnxruntime", broken)):
        bench.time_foreign(runtime, build, Path("model.onnx"), x, {}, lambda: x, x, 1, 0, times, errors, info)
    assert list(times) == ["timm channels_last"] and not info["foreign"]
    assert "openvino skipped: not installed (openvino)" in info["notes"][0]
    assert "onnxruntime skipped" in info["notes"][1] and "no CPU plugin" in info["notes"][1]


def test_foreign_times_are_scaled_by_the_bridge_per_round(bench, monkeypatch):
    own = {"fake": [2.0, 4.0, 6.0], "bridge": [1.0, 2.0, 3.0]}  # the bridge ran 2x its main-round median
    monkeypatch.setattr(bench, "interleave", lambda fns, repeats, warmup: {k: own[k] for k in fns})
    x = torch.ones(1, 3, 4, 4)
    released = []

    class Session:
        def __del__(self):
            released.append(True)

    def build(path, x, threads, options):
        session = Session()
        return {"fake": lambda: (session, x)[1]}, {"detail": "1 stream"}

    times, errors, info = {"timm channels_last": [1.0, 1.0, 1.0]}, {}, _info()
    bench.time_foreign("fake", build, Path("model.onnx"), x, {}, lambda: x, x, 3, 0, times, errors, info)
    assert times["fake"] == [2.0, 2.0, 2.0] and errors["fake"] == 0.0
    assert info["foreign"] == ["fake"] and info["foreign_scale"]["fake"] == 2.0 and released == [True]
    assert any("Warning" in note for note in info["notes"])  # the load moved between the two sets of rounds


def test_summary_compares_ours_with_timm_and_the_fastest_foreign_runtime(bench):
    variant = VARIANTS_BY_NAME["convmixer_256_8_ks5_p2"]
    info = _info()
    info["foreign"] = ["onnxruntime", "OpenVINO LATENCY"]
    info["picked"] = {"optimize_for_inference": {"module": "M", "depthwise": "onednn"},
                      "optimize_for_inference(input_size)": {"module": "M"}, bench.TORCH_ONLY: {"module": "M"}}
    info["seconds"] = {k: {"build": 0.1, "first_call": 0.2} for k in info["picked"]}
    times = {"timm NCHW": [4.0], "timm channels_last": [5.0], "convmixer-timm": [4.0],
             "optimize_for_inference": [2.0], "optimize_for_inference(input_size)": [1.6], bench.TORCH_ONLY: [3.2],
             "sgemm 2048^3": [1.0], "onnxruntime": [3.0], "OpenVINO LATENCY": [2.4]}
    inference = bench.summarise(variant, "inference", 64, 10 ** 9, times, {}, {}, info)
    assert inference["fastest_foreign"] == "OpenVINO LATENCY"
    rows = {row["candidate"]: row for row in inference["rows"]}
    assert rows["optimize_for_inference"]["speedup_vs_timm_best"] == pytest.approx(2.0)
    assert rows["optimize_for_inference"]["speedup_vs_fastest_foreign"] == pytest.approx(1.2)
    assert rows["onnxruntime"]["peak_mib"] is None
    training = bench.summarise(variant, "training", 64, 10 ** 9, {
        "timm NCHW": [4.0], "timm channels_last": [5.0], "convmixer-timm NCHW": [2.5],
        "convmixer-timm channels_last": [2.6], "sgemm 2048^3": [1.0]}, {}, {}, {})
    header = dict(cpu="CPU", machine="x86_64", cpu_features="AVX2+FMA yes; AVX-512 no", torch_cpu_capability="AVX2",
                  threads=2, env={"ONEDNN_MAX_CPU_ISA": "AVX2"}, torch="t", timm="t", onnxruntime="o",
                  openvino="v", repeats=1, command="c", allocator="a", kernels="k", openvino_setup="s",
                  foreign_runtimes=["onnxruntime", "openvino"])
    md = bench.markdown([inference, training], header)
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in md and "AVX-512 no" in md
    assert "| convmixer_256_8_ks5_p2 (64) | 2.00x | 2.50x | 1.25x | 1.20x / 1.50x / 0.75x | OpenVINO LATENCY | " in md
    # training default vs timm best, its share of sgemm, then the compiled step (not run here)
    assert md.rstrip().endswith("| 1.60x | 2% | - |")


@pytest.fixture(scope="module")
def first_call():
    return load_benchmark("first_call")


def test_first_call_interleaves_on_the_injected_clock_and_leaves_failing_paths_out(first_call):
    now = [0.0]

    def clock() -> float:
        return now[0]

    def path(cost: float):
        def run() -> None:
            now[0] += cost

        return run

    def broken() -> None:
        raise RuntimeError("no CPU plugin")

    times, errors = first_call.interleave({"a": path(2.0), "b": path(1.0), "x": broken}, rounds=3, clock=clock,
                                          settle=0.0)
    assert times == {"a": [2.0] * 3, "b": [1.0] * 3} and "no CPU plugin" in errors["x"]


def test_first_call_report_reads_off_the_within_5_percent_check(first_call):
    def run(ratio: float) -> dict:
        cold = {"first_call_s": 3.0, "choice": "conv+kernel", "fastest": "mm+kernel", "default_over_fastest": ratio,
                "timm_best_over_default": 1.5, "ms": {"default": 10.0 * ratio, "mm+kernel": 10.0,
                                                      "conv+kernel": 10.0 * ratio}}
        return {"cold": cold, "warm": {"first_call_s": 0.5, "source": "remembered"}}

    header = dict(cpu="CPU", machine="x86_64", cpu_features="f", threads=2, torch="t", timm="t", onnxruntime="o",
                  openvino="v", rounds=5, runs=2, command="c")
    report = {"header": header, "variants": [{"name": "convmixer_256_8_ks5_p2", "depth": 8, "batch": 64,
                                              "runs": [run(1.02), run(1.08), {"cold": {"error": "exit status 1"},
                                                                              "warm": {"error": "exit status 1"}}]}]}
    md = first_call.markdown(report)
    assert "default / fastest: max 1.080x; within 1.05x in 1 of 2 runs." in md
    assert "| 2 | 3.00 | conv+kernel | 0.50 (remembered) | 10.8 | mm+kernel (10.0) | 1.080x | - | - | 1.50x | - |" in md
    assert "| 3 | exit status 1 |" in md

"""optimize_for_inference() is exact: same logits as timm's built-in eval model with the same weights.

Odd and even kernels, GELU and ReLU, NCHW and channels_last inputs and models, both pointwise implementations;
tolerance 1e-4 of the reference logits' largest magnitude (observed ~3e-7: only float32 rounding differs).

Then the choosing, on an injected clock (no test reads the wall clock to compare speeds): the race and its early
stops, failing paths, the cut copy for large calls, four threads on one new shape, the bounded shape cache, the
choices remembered on disk across a real subprocess, a damaged choice file, and logging instead of printing.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

import pytest
import timm
import torch
from clocks import StepClock
from reference import randomize_batchnorm
from timm.models.convmixer import ConvMixer as TimmConvMixer
from torch import nn

from convmixer_timm import VARIANTS, ConvMixer, speed
from convmixer_timm.speed import FusedConvMixerInference, autotune, optimize_for_inference
from convmixer_timm.speed import race as race_module
from convmixer_timm.speed import runtimes as runtime_module
from convmixer_timm.speed.race import race

CASES = [(5, "gelu", 2), (8, "gelu", 2), (3, "relu", 1), (4, "relu", 3)]
ROOT = Path(__file__).resolve().parents[1]


# optimize_for_inference remembers its choices in the user's cache: these tests use a folder of their own.
pytestmark = pytest.mark.usefixtures("private_choice_cache")


def _pair(k: int, act: str, patch: int, dim: int = 16, depth: int = 2, num_classes: int = 10):
    torch.manual_seed(0)
    ref = TimmConvMixer(dim, depth, k, patch, num_classes=num_classes, act_layer=nn.GELU if act == "gelu" else nn.ReLU)
    ref = randomize_batchnorm(ref).eval()
    ours = ConvMixer(dim, depth, k, patch, num_classes=num_classes, act_layer=act)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _assert_exact(ref: torch.Tensor, out: torch.Tensor) -> None:
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


DEPTHWISE = ["onednn", pytest.param("kernel", marks=pytest.mark.skipif(speed.load() is None, reason="no compiler"))]


@pytest.mark.parametrize("depthwise", DEPTHWISE)
@pytest.mark.parametrize("pointwise", ["conv", "mm"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(("k", "act", "patch"), CASES)
def test_every_path_matches_timm_builtin(k, act, patch, channels_last, pointwise, depthwise):
    ref, ours = _pair(k, act, patch)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    paths = speed.AutotunedConvMixer(ours.to(memory_format=fmt)).paths()
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        expected = ref(x)
        for name in (f"{pointwise}+{depthwise}", "plain", "plain channels_last"):
            _assert_exact(expected, paths[name](x.contiguous(memory_format=fmt)))
            _assert_exact(expected[:1], paths[name](x[:1]))  # batch 1


@pytest.mark.slow
@pytest.mark.parametrize(("k", "act", "patch"), CASES)
def test_the_default_matches_timm_builtin_on_every_shape_it_sees(k, act, patch):
    ref, ours = _pair(k, act, patch)
    fast = optimize_for_inference(ours)
    with torch.no_grad():
        for shape in [(2, 3, 24, 24), (1, 3, 24, 24), (2, 3, 16, 20), (2, 3, 24, 24)]:
            x = torch.randn(shape)
            _assert_exact(ref(x), fast(x))
    assert len(fast.choices) == 3


def test_accepts_timm_builtin_and_leaves_the_model_alone():
    ref, _ = _pair(7, "gelu", 2)
    ref.train()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    fast = optimize_for_inference(ref, input_size=(2, 3, 16, 16))
    assert set(fast.choices.values()) <= set(fast.paths()) | set(speed.RUNTIMES) | {"openvino latency",
                                                                                     "openvino throughput"}
    assert ref.training
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(value, state[key])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _assert_exact(ref.eval()(x), fast(x))


def test_odd_image_size_and_feature_extractor():
    ref, ours = _pair(5, "gelu", 3, num_classes=0)
    x = torch.randn(2, 3, 17, 20)  # not a multiple of the patch size: the stem ignores the remainder
    with torch.no_grad():
        _assert_exact(ref(x), optimize_for_inference(ours, (3, 17, 20))(x))


def test_unsupported_models_fall_back_to_an_eval_copy():
    model = ConvMixer(8, 2, 3, 2, num_classes=4, act_layer="silu").train()
    fast = optimize_for_inference(model, backend="torch")
    assert fast.fused is None and set(fast.paths()) == {"plain", "plain channels_last"}
    assert model.training and not fast.training
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model.eval()(x))


def test_rejects_wrong_input():
    _, ours = _pair(3, "relu", 1)
    with pytest.raises(RuntimeError, match="expects images"):
        optimize_for_inference(ours)(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="expected images"):
        FusedConvMixerInference(ours)(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="pointwise"):
        FusedConvMixerInference(ours, pointwise="fft")
    with pytest.raises(ValueError, match="depthwise"):
        FusedConvMixerInference(ours, depthwise="fft")


@pytest.mark.parametrize(("k", "act"), [(5, "gelu"), (8, "relu")])
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_optional_runtimes_match_timm_builtin(k, act, runtime):
    pytest.importorskip(runtime)
    ref, ours = _pair(k, act, 2)
    fast = optimize_for_inference(ours, (3, 3, 16, 16), backend=runtime)
    assert isinstance(fast, speed.OnnxRuntimeConvMixer if runtime == "onnxruntime" else speed.OpenVinoConvMixer)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        _assert_exact(ref(x), fast(x.contiguous(memory_format=torch.channels_last)))
    with pytest.raises(ValueError, match="input_size"):
        optimize_for_inference(ours, backend=runtime)


def test_one_export_serves_openvino_throughput_with_a_known_number_of_requests():
    pytest.importorskip("openvino")
    ref, ours = _pair(5, "gelu", 2)
    onnx = runtime_module.onnx_bytes(ours, (1, 3, 16, 16))  # exported at batch 1, the batch axis is dynamic
    fast = speed.OpenVinoConvMixer(None, (4, 3, 16, 16), "THROUGHPUT", onnx=onnx, requests=2)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        _assert_exact(ref(x), fast(x))
    assert fast.requests == 2 and fast.sizes == [2, 2]


def test_auto_also_races_the_installed_runtimes_and_stays_exact():
    runtimes = speed.installed_runtimes()
    if not runtimes:
        pytest.skip("neither onnxruntime nor openvino is installed")
    ref, ours = _pair(5, "gelu", 2)
    clock = StepClock()  # every timed call reads 1.0: every path ties, so the incumbent (the plain model) is kept
    tuned = speed.AutotunedConvMixer(ours, clock=clock, rounds=2, runtimes=runtimes)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _assert_exact(ref(x), tuned(x))
    foreign = ("onnxruntime" in runtimes) + 2 * ("openvino" in runtimes)  # openvino: two hints
    # a first call and two rounds per path (all tie), then the call itself, timed for the re-check
    assert clock.readings == 2 * (1 + 2) * (len(tuned.paths()) + foreign) + 2
    assert tuned.choices[((2, 3), (3, 16, 16), torch.float32, "cpu")] in ("plain", "plain channels_last")
    with pytest.raises(ValueError, match="backend"):
        optimize_for_inference(ours, backend="tvm")
    with pytest.raises(ValueError, match="unknown runtimes"):
        speed.AutotunedConvMixer(ours, runtimes=("tvm",))


@pytest.mark.slow
def test_one_export_per_model_and_image_size_serves_every_runtime_and_batch_size(monkeypatch):
    runtimes = speed.installed_runtimes()
    if not runtimes:
        pytest.skip("neither onnxruntime nor openvino is installed")
    exports = []
    export = runtime_module.onnx_bytes

    def counting(model, input_size):
        exports.append(tuple(input_size))
        return export(model, input_size)

    monkeypatch.setattr(runtime_module, "onnx_bytes", counting)
    ref, ours = _pair(5, "gelu", 2)
    tuned = speed.AutotunedConvMixer(ours, clock=StepClock(), rounds=1, runtimes=runtimes)
    with torch.no_grad():
        for shape in [(2, 3, 16, 16), (3, 3, 16, 16), (2, 3, 20, 20)]:
            x = torch.randn(shape)
            _assert_exact(ref(x), tuned(x))
    assert exports == [(2, 3, 16, 16), (2, 3, 20, 20)]  # a new batch size reuses the export of its image size


@pytest.mark.skipif(speed.load() is None, reason="no compiler")
@pytest.mark.parametrize(("dim", "k", "size"), [(37, 9, 11), (48, 8, 19), (20, 11, 6), (16, 3, 1)])
def test_mixing_kernel_on_uneven_channels_widths_and_kernels(dim, k, size):
    # Channel tails (not a multiple of the vector width), row tails (not a multiple of 8 outputs), kernel sizes
    # without a compiled specialisation, a 1x1 grid.
    torch.manual_seed(dim)
    ref = randomize_batchnorm(TimmConvMixer(dim, 2, k, 1, num_classes=5)).eval()
    ours = ConvMixer(dim, 2, k, 1, num_classes=5)
    ours.load_state_dict(ref.state_dict())
    fast = FusedConvMixerInference(ours, depthwise="kernel")
    x = torch.randn(2, 3, size, size + 3)
    with torch.no_grad():
        _assert_exact(ref(x), fast(x))
        fast.depthwise = "onednn"  # packed weights are cached per shape and path, so switching is safe
        _assert_exact(ref(x), fast(x))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_every_registered_variant_optimizes_exactly(variant):
    torch.manual_seed(0)
    act = nn.GELU if variant.act == "gelu" else nn.ReLU
    ref = randomize_batchnorm(TimmConvMixer(16, 2, variant.k, variant.p, num_classes=10, act_layer=act)).eval()
    ours = timm.create_model(variant.name, dim=16, depth=2, num_classes=10)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, variant.img_size, variant.img_size)
    with torch.no_grad():
        for depthwise in ["onednn"] + (["kernel"] if speed.load() is not None else []):
            _assert_exact(ref(x), FusedConvMixerInference(ours, depthwise=depthwise)(x))


# ------------------------------------------------------------------------------------------ the race


def _cost(clock: StepClock, seconds: float, fail_on: int | None = None):
    """A fake path whose timed calls read ``seconds`` on ``clock``; it raises on call number ``fail_on``."""
    calls = []

    def run() -> None:
        calls.append(None)
        if fail_on is not None and len(calls) >= fail_on:
            raise RuntimeError("the runtime crashed")
        clock.now += seconds - 1.0

    return run


def test_the_race_stops_once_one_path_is_clearly_ahead():
    clock = StepClock()
    result = race({"ref": _cost(clock, 1.0), "fast": _cost(clock, 0.5)}, clock, rounds=5, min_rounds=2)
    assert result.choice == "fast" and result.times == {"ref": [1.0, 1.0], "fast": [0.5, 0.5]}
    assert clock.readings == 2 * 2 * (1 + 2)  # a first call and two rounds: "ref" is more than 1.2x behind, over
    clock = StepClock()
    close = race({"ref": _cost(clock, 1.0), "fast": _cost(clock, 0.5), "close": _cost(clock, 0.55)}, clock,
                 rounds=5, min_rounds=2)
    assert close.choice == "fast" and len(close.times["ref"]) == 2 and len(close.times["close"]) == 5


def test_a_path_far_behind_on_its_first_call_is_out_before_the_rounds():
    clock = StepClock()
    result = race({"ref": _cost(clock, 1.0), "slow": _cost(clock, 2.6), "fast": _cost(clock, 0.9)}, clock,
                  rounds=2, margin=0.0)
    assert set(result.times) == {"ref", "fast"} and result.choice == "fast"  # 2.6 > 2.5 x 0.9 -> dropped
    clock = StepClock()
    kept = race({"ref": _cost(clock, 1.0), "slow": _cost(clock, 2.6)}, clock, rounds=2, warmup_drop_ratio=None)
    assert set(kept.times) == {"ref", "slow"}


def test_the_race_pauses_only_before_the_calls_it_is_told_to(monkeypatch):
    pauses = []
    monkeypatch.setattr(race_module.time, "sleep", pauses.append)  # recorded, not slept
    clock = StepClock()
    result = race({"ref": _cost(clock, 1.0), "runtime": _cost(clock, 1.0)}, clock, rounds=3, settle=0.02,
                  settle_before=("runtime",))
    assert pauses == [0.02] * 4 and len(result.times["runtime"]) == 3  # its first call and three rounds


@pytest.mark.parametrize(("challenger", "winner"), [(0.98, "ref"), (0.9, "other")])
def test_the_race_keeps_the_incumbent_unless_clearly_beaten(challenger, winner):
    clock = StepClock()
    assert race({"ref": _cost(clock, 1.0), "other": _cost(clock, challenger)}, clock).choice == winner


def test_a_path_that_fails_while_timed_is_dropped_with_a_warning_not_raised(caplog):
    clock = StepClock()
    with caplog.at_level(logging.WARNING, logger="convmixer_timm"):
        result = race({"ref": _cost(clock, 1.0), "broken": _cost(clock, 0.1, fail_on=1),
                       "flaky": _cost(clock, 0.1, fail_on=3)}, clock, rounds=3)
    assert result.choice == "ref" and set(result.dropped) == {"broken", "flaky"}
    assert "the runtime crashed" in result.dropped["flaky"]
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 2
    with pytest.raises(RuntimeError, match="crashed"):  # the reference refusing the input is the caller's error
        race({"ref": _cost(clock, 1.0, fail_on=1), "other": _cost(clock, 1.0)}, clock)


# ------------------------------------------------------------------------------------------ the autotuner


class FakeRuntime(nn.Module):
    """A foreign runtime stand-in: the model's own output, timed ``speedup`` faster on the fake clock."""

    def __init__(self, model: nn.Module, clock: StepClock, speedup: float = 0.5, fail_on: int | None = None):
        super().__init__()
        self.model, self.clock, self.speedup, self.fail_on, self.calls = model, clock, speedup, fail_on, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_on is not None and self.calls >= self.fail_on:
            raise RuntimeError("the runtime crashed")
        self.clock.now -= self.speedup
        return self.model(x)


class WithFakeRuntimes(speed.AutotunedConvMixer):
    def __init__(self, model: nn.Module, builders: dict, **kwargs):
        super().__init__(model, **kwargs)
        self.fake_builders = builders

    def _foreign_builders(self) -> dict:
        return dict(self.fake_builders)


def _fake(clock: StepClock, built: list, **kwargs):
    """A builder of FakeRuntime that records (input shape, whole model?, weak reference) per runtime built."""
    def build(model: nn.Module, shape: tuple, whole: bool) -> FakeRuntime:
        runtime = FakeRuntime(model, clock, **kwargs)
        built.append((shape, whole, weakref.ref(runtime)))
        runtime.depth = len(model.blocks)
        return runtime

    return build


def test_a_faster_runtime_is_chosen_and_then_runs_every_call():
    ref, ours = _pair(5, "gelu", 2)
    clock, built = StepClock(), []
    tuned = WithFakeRuntimes(ours, {"fake": _fake(clock, built)}, clock=clock)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _assert_exact(ref(x), tuned(x))
        runtime = built[0][2]()
        calls = runtime.calls
        _assert_exact(ref(x), tuned(x))
    assert tuned.choices == {((2, 3), (3, 16, 16), torch.float32, "cpu"): "fake"} and runtime.calls == calls + 1
    assert [(shape, whole) for shape, whole, _ in built] == [((2, 3, 16, 16), True)]  # small: no proxy


@pytest.mark.parametrize(("speedup", "foreign_wins"), [(0.01, False), (0.1, True), (0.7, True)])
def test_a_runtime_must_beat_pytorch_clearly_even_when_every_pytorch_path_is_out(speedup, foreign_wins):
    # 0.99 vs 1.0: inside the 3% margin, a PyTorch path stays (no export, no second thread pool); 0.3 vs 1.0:
    # every PyTorch path is out after its first call, and the runtime wins alone.
    _, ours = _pair(5, "gelu", 2)
    clock = StepClock()
    tuned = WithFakeRuntimes(ours, {"fake": _fake(clock, [], speedup=speedup)}, clock=clock)
    choice = tuned.tune(torch.randn(2, 3, 16, 16))
    assert (choice == "fake") == foreign_wins and (choice in tuned.paths()) != foreign_wins


def test_a_large_call_races_on_a_cut_copy_and_builds_only_the_winner_whole(monkeypatch):
    monkeypatch.setattr(autotune, "PROXY_MACS", 0)  # every call counts as large
    ref, ours = _pair(5, "gelu", 2, depth=4)
    clock, built = StepClock(), []
    tuned = WithFakeRuntimes(ours, {"fake": _fake(clock, built)}, clock=clock)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _assert_exact(ref(x), tuned(x))
    assert [(shape, whole) for shape, whole, _ in built] == [((2, 3, 16, 16), False), ((2, 3, 16, 16), True)]
    gc.collect()
    assert built[0][2]() is None  # the proxy's runtime is released after the race
    assert built[1][2]().depth == 4 and tuned.tunings == 1
    assert len(tuned.plain.blocks) == 4 and len(tuned.fused.blocks) == 4  # the cut copies share, never cut
    with torch.no_grad():
        for path in tuned.paths().values():  # the PyTorch paths were raced cut, and still run whole
            _assert_exact(ref(x), path(x))


def test_a_runtime_that_fails_to_build_or_while_timed_is_dropped(caplog):
    ref, ours = _pair(3, "relu", 1)
    clock = StepClock()

    def broken(model, shape, whole):
        raise OSError("no CPU plugin")

    tuned = WithFakeRuntimes(ours, {"broken": broken, "flaky": _fake(clock, [], fail_on=2)}, clock=clock)
    x = torch.randn(2, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="convmixer_timm"), torch.no_grad():
        _assert_exact(ref(x), tuned(x))
    assert tuned.tune(x) in tuned.paths()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "no CPU plugin" in messages[0] and "the runtime crashed" in messages[1]


def test_four_threads_seeing_a_new_shape_share_one_tuning():
    ref, ours = _pair(5, "gelu", 2)
    entered, all_in = [], threading.Event()

    class Counting(speed.AutotunedConvMixer):
        def forward(self, x):
            entered.append(None)
            if len(entered) == 4:
                all_in.set()
            return super().forward(x)

        def _tune(self, x, previous=None):
            all_in.wait(timeout=120)  # a hang guard: the tuning starts once all four threads are inside
            return super()._tune(x, previous)

    tuned = Counting(ours, clock=StepClock())
    x = torch.randn(3, 3, 16, 16)
    barrier, outputs, errors = threading.Barrier(4), [None] * 4, []

    def serve(i: int) -> None:
        try:
            barrier.wait()
            outputs[i] = tuned(x)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all_in.is_set() and tuned.tunings == 1 and len(tuned.choices) == 1
    with torch.no_grad():
        expected = ref(x)
    for out in outputs:
        _assert_exact(expected, out)


def test_the_shape_cache_is_bounded_and_releases_the_runtimes_it_drops():
    _, ours = _pair(5, "gelu", 2)
    clock, built = StepClock(), []
    tuned = WithFakeRuntimes(ours, {"fake": _fake(clock, built)}, clock=clock, max_shapes=2)
    shapes = [(1, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8), (4, 3, 8, 8)]  # the third call makes (2, ...) the oldest
    with torch.no_grad():
        for shape in shapes:
            tuned(torch.randn(shape))
    gc.collect()
    alive = {shape: ref() is not None for shape, _, ref in built}
    assert alive == {(1, 3, 8, 8): True, (2, 3, 8, 8): False, (4, 3, 8, 8): True}
    assert [key[0] for key in tuned.choices] == [(1, 1), (4, 7)] and tuned.tunings == 3
    assert all(key[:4] != (2, 3, 8, 8) for key in tuned.fused._packed)  # its packed weights went too


def test_progress_goes_to_logging_not_to_stdout_or_stderr(capsys, caplog):
    _, ours = _pair(3, "relu", 1)
    with caplog.at_level(logging.INFO, logger="convmixer_timm"), torch.no_grad():
        optimize_for_inference(ours, backend="torch")(torch.randn(2, 3, 8, 8))
        optimize_for_inference(ours, input_size=(2, 3, 10, 10), backend="torch")  # up front: quiet below DEBUG
    assert capsys.readouterr() == ("", "")
    infos = [r.getMessage() for r in caplog.records if r.name == "convmixer_timm" and r.levelno == logging.INFO]
    assert len(infos) == 2 and "timing" in infos[0] and "[2, 3, 8, 8]" in infos[0] and "chose" in infos[1]


# ------------------------------------------------------------------------------------------ remembered choices


def _choice_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json"))


@pytest.mark.slow
def test_a_choice_is_remembered_across_processes(tmp_path):
    cache = tmp_path / "shared"
    child = textwrap.dedent("""
        import torch
        from convmixer_timm import ConvMixer
        from convmixer_timm.speed import optimize_for_inference
        tuned = optimize_for_inference(ConvMixer(16, 2, 5, 2, num_classes=10), input_size=(2, 3, 16, 16),
                                       backend="torch")
        print(tuned.tunings, list(tuned.choices.values())[0])
    """)
    env = {**os.environ, "CONVMIXER_TIMM_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", child], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    tunings, choice = done.stdout.strip().split(maxsplit=1)  # a path name may hold a space
    assert tunings == "1"
    [file] = _choice_files(cache / "inference")
    record = json.loads(file.read_text())  # plain data
    assert record["choice"] == choice and record["key"]["model"]["dim"] == 16
    assert record["key"]["input"] == {"batches": [2, 3], "image": [3, 16, 16], "dtype": "torch.float32"}
    assert "machine" in record["key"]
    close_call = record["margin"] < record["noise"]  # won inside the noise: the next process races once more
    _, ours = _pair(5, "gelu", 2)  # the same architecture, other weights: the same choice applies
    tuned = optimize_for_inference(ours, backend="torch", cache=cache / "inference")
    with torch.no_grad():
        tuned(torch.randn(2, 3, 16, 16))
    assert tuned.tunings == close_call and (close_call or list(tuned.choices.values()) == [choice])
    assert next(iter(tuned._entries.values())).source == ("timed" if close_call else "remembered")
    other = optimize_for_inference(ours, backend="torch", cache=cache / "inference")
    with torch.no_grad():
        other(torch.randn(1, 3, 16, 16))  # another shape is another key
    assert other.tunings == 1 and len(_choice_files(cache / "inference")) == 2


def test_a_damaged_choice_file_is_one_warning_and_a_new_race(tmp_path, caplog):
    ref, ours = _pair(3, "relu", 1)
    x = torch.randn(2, 3, 8, 8)

    def fresh() -> speed.AutotunedConvMixer:
        return speed.AutotunedConvMixer(ours, clock=StepClock(), cache_dir=tmp_path)

    with torch.no_grad():
        fresh()(x)
        [file] = _choice_files(tmp_path)
        for damage in (b"\x00{not json", json.dumps({"schema": 2, "choice": "plain", "key": {}}).encode()):
            file.write_bytes(damage)
            tuned = fresh()
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="convmixer_timm"):
                _assert_exact(ref(x), tuned(x))
            assert tuned.tunings == 1 and [r.levelno for r in caplog.records] == [logging.WARNING]
            assert "damaged" in caplog.records[0].getMessage()
            assert json.loads(file.read_text())["choice"] in tuned.paths()  # replaced by a whole record
        record = json.loads(file.read_text())
        file.write_text(json.dumps({**record, "choice": "__import__('os').system('false')"}))
        tuned = fresh()
        tuned(x)
        assert tuned.tunings == 1  # a name that is not a path on offer is not used: the race runs again
        again = fresh()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="convmixer_timm"):
            again(x)
        assert again.tunings == 0 and not caplog.records
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".json"]  # no temporary file left behind


@pytest.mark.parametrize("depthwise", DEPTHWISE)
@pytest.mark.parametrize("pointwise", ["conv", "mm"])
def test_a_model_without_blocks_runs_every_path_exactly(pointwise, depthwise):
    # timm's ConvMixer takes depth=0 (stem, pool, head): the stem's BatchNorm is then the one the head folds.
    torch.manual_seed(0)
    ref = randomize_batchnorm(TimmConvMixer(16, 0, 5, 2, num_classes=10)).eval()
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        _assert_exact(ref(x), FusedConvMixerInference(ref).run(x, pointwise, depthwise))


def test_an_evicted_choice_releases_the_weights_packed_for_its_cropped_image():
    # 33 is not a multiple of the patch size: the weights are packed for the 32 x 32 input the stem reads.
    _, ours = _pair(5, "gelu", 2)
    tuned = speed.AutotunedConvMixer(ours, clock=StepClock(), max_shapes=1)
    with torch.no_grad():
        tuned(torch.randn(2, 3, 33, 33))
        assert any(key[2:4] == (32, 32) for key in tuned.fused._packed)
        tuned(torch.randn(2, 3, 16, 16))
    assert all(key[2:4] != (32, 32) for key in tuned.fused._packed)

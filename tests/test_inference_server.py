"""optimize_for_inference under a server: threads, batch buckets, re-checks, and a choice cache that is data.

Everything is timed on injected clocks (no test reads the wall clock to compare speeds), on a 8-channel model.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from convmixer_timm import ConvMixer, speed
from convmixer_timm.speed import AutotunedConvMixer, autotune
from convmixer_timm.speed.choice_cache import MAX_BYTES
from convmixer_timm.speed.race import batch_bucket


class StepClock:
    """Advances 1.0 per reading, per thread: every timed call reads 1.0 unless a fake path moves it back."""

    def __init__(self) -> None:
        self.local = threading.local()

    def __call__(self) -> float:
        self.local.now = getattr(self.local, "now", 0.0) + 1.0
        return self.local.now

    def rewind(self, seconds: float) -> None:
        self.local.now = getattr(self.local, "now", 0.0) - seconds


class Timed(nn.Module):
    """A runtime (real or the model itself) that reads ``seconds`` per call on the clock."""

    def __init__(self, inner: nn.Module, clock: StepClock, seconds: dict):
        super().__init__()
        self.inner, self.clock, self.seconds = inner, clock, seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.rewind(1.0 - self.seconds["now"])
        return self.inner(x)


class WithRuntimes(AutotunedConvMixer):
    """The real runtimes (or one fake one, ``fake=True``) made to read ``seconds["now"]`` per call."""

    def __init__(self, model: nn.Module, seconds: dict, fake: bool = False, **kwargs):
        super().__init__(model, **kwargs)
        self.seconds, self.fake = seconds, fake

    def _foreign_builders(self) -> dict:
        if self.fake:
            return {"fake": lambda model, shape, whole: Timed(model, self.clock, self.seconds)}
        return {name: functools.partial(self._timed, make) for name, make in super()._foreign_builders().items()}

    def _timed(self, make, model: nn.Module, shape: tuple, whole: bool) -> Timed:
        return Timed(make(model, shape, whole), self.clock, self.seconds)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return ConvMixer(8, 1, 3, 2, num_classes=4).eval()


def _quick(model: nn.Module, **kwargs) -> dict:
    return {"clock": StepClock(), "rounds": 2, "min_rounds": 1, "settle": 0.0, **kwargs}


def test_batch_buckets_are_powers_of_two():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 7, 8, 15, 16, 100)] == [
        (1, 1), (2, 3), (2, 3), (4, 7), (4, 7), (8, 15), (8, 15), (16, 31), (64, 127)]


def test_one_race_serves_a_whole_batch_bucket():
    model = _model()
    tuned = AutotunedConvMixer(model, **_quick(model))
    with torch.no_grad():
        for batch, races in [(5, 1), (6, 1), (7, 1), (8, 2), (4, 2), (15, 2)]:
            x = torch.randn(batch, 3, 8, 8)
            torch.testing.assert_close(tuned(x), model(x), rtol=1e-4, atol=1e-5)
            assert tuned.tunings == races, batch
    assert [key[:2] for key in tuned.choices] == [((4, 7), (3, 8, 8)), ((8, 15), (3, 8, 8))]


@pytest.mark.slow
def test_threads_over_more_buckets_than_kept_with_the_real_runtimes():
    # Three threads, three buckets (batch 3 and 6 run on choices raced at 2 and 4: OpenVINO compiled for the
    # bucket), two kept: choices are evicted and raced again while other threads use them.
    model = _model()
    tuned = WithRuntimes(model, {"now": 0.5}, runtimes=speed.installed_runtimes(), max_shapes=2, **_quick(model))
    inputs = {batch: torch.randn(batch, 3, 8, 8) for batch in (1, 2, 3, 4, 6)}
    with torch.no_grad():
        expected = {batch: model(x) for batch, x in inputs.items()}
    errors: list[BaseException] = []

    def serve(offset: int) -> None:
        order = list(inputs)[offset:] + list(inputs)[:offset]
        try:
            for batch in order * 3:
                torch.testing.assert_close(tuned(inputs[batch]), expected[batch], rtol=1e-4, atol=1e-5)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(tuned.choices) == 2 and tuned.tunings >= 3
    if speed.installed_runtimes():  # the runtimes read faster on the clock: one of them serves
        assert set(tuned.choices.values()) <= {"onnxruntime", "openvino latency", "openvino throughput"}


def test_a_choice_that_falls_behind_in_use_races_again(caplog):
    model = _model()
    seconds = {"now": 0.5}
    tuned = WithRuntimes(model, seconds, fake=True, **_quick(model))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for _ in range(autotune.WATCH_CALLS + 2):
            tuned(x)  # 0.5 against the runner-up's 1.0: it keeps winning
            tuned(torch.randn(3, 3, 8, 8))  # same bucket, not the batch the race timed: not counted
        assert tuned.tunings == 1 and list(tuned.choices.values()) == ["fake"]
        seconds["now"] = 1.2  # now 20% slower than the runner-up's 1.0 in the race
        for _ in range(autotune.WATCH_CALLS - 1):
            tuned(x)
        assert tuned.tunings == 1  # the faster half of 15 calls is not enough: the window holds 16
        with caplog.at_level(logging.INFO, logger="convmixer_timm"):
            tuned(x)  # the 16th: due
            tuned(x)  # races again
    assert tuned.tunings == 2 and list(tuned.choices.values()) != ["fake"]
    assert "fell behind" in caplog.text
    entry = next(iter(tuned._entries.values()))
    assert entry.watch.calls == 2 * autotune.WATCH_CALLS  # the next re-check needs twice the calls


def test_a_remembered_close_call_races_once_more(tmp_path):
    model = _model()
    x = torch.randn(2, 3, 8, 8)

    def fresh() -> AutotunedConvMixer:
        tuned = AutotunedConvMixer(model, cache_dir=tmp_path, **_quick(model))
        with torch.no_grad():
            tuned(x)
        return tuned

    assert fresh().tunings == 1
    [file] = tmp_path.glob("*.json")
    record = json.loads(file.read_text())
    assert record["races"] == 1 and record["batch"] == 2 and record["rival_ms"] > 0
    assert fresh().tunings == 0  # all tied on the step clock: margin 0, noise 0, trusted
    file.write_text(json.dumps({**record, "margin": 0.03, "noise": 0.10}))  # won by 3% inside 10% noise
    assert fresh().tunings == 1 and json.loads(file.read_text())["races"] == 2
    file.write_text(json.dumps({**record, "margin": 0.03, "noise": 0.10, "races": 2}))
    assert fresh().tunings == 0  # decided by two races: kept (and still guarded in use)
    file.write_text(json.dumps({"schema": 1, "key": record["key"], "choice": "plain"}))
    assert fresh().tunings == 1 and json.loads(file.read_text())["schema"] == 2  # an older version's: replaced


# ------------------------------------------------------------------------------------------ the choice cache


def _damage(kind: str, path: Path) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink to /dev/zero":
        os.symlink("/dev/zero", path)
    elif kind == "deep nesting":
        path.write_text("[" * 100000)
    elif kind == "one 0xff byte":
        path.write_bytes(b"\xff")
    elif kind == "too large":
        path.write_text(json.dumps({"pad": "x" * MAX_BYTES}))
    else:
        record = json.loads(path.with_suffix(".good").read_text())
        path.write_text(json.dumps({**record, **json.loads(kind)}))


DAMAGE = ["fifo", "symlink to /dev/zero", "deep nesting", "one 0xff byte", "too large", '{"choice": 5}',
          '{"ms": [1, 2]}', '{"races": "1"}', '{"margin": null}', '{"batch": true}', '{"openvino_requests": -1}',
          '{"rival_ms": "fast"}']


@pytest.mark.parametrize("kind", DAMAGE)
def test_an_unusable_choice_file_is_one_warning_a_new_race_and_a_replaced_file(kind, tmp_path, caplog):
    model = _model()
    x = torch.randn(2, 3, 8, 8)

    def run() -> AutotunedConvMixer:
        tuned = AutotunedConvMixer(model, cache_dir=tmp_path, **_quick(model))
        done = threading.Thread(target=lambda: tuned(x))  # a hang shows as a failure, not a stuck run
        done.start()
        done.join(timeout=120)
        assert not done.is_alive()
        return tuned

    run()
    [file] = tmp_path.glob("*.json")
    file.with_suffix(".good").write_text(file.read_text())
    _damage(kind, file)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="convmixer_timm"):
        tuned = run()
    assert tuned.tunings == 1 and [r.levelno for r in caplog.records] == [logging.WARNING], caplog.text
    assert "damaged" in caplog.text
    assert file.is_file() and not file.is_symlink() and json.loads(file.read_text())["schema"] == 2
    assert run().tunings == 0  # the replaced file serves the next process


def test_choice_files_follow_the_umask_and_leave_nothing_behind(tmp_path):
    model = _model()
    old = os.umask(0o027)
    try:
        AutotunedConvMixer(model, cache_dir=tmp_path, **_quick(model)).tune(torch.randn(2, 3, 8, 8))
    finally:
        os.umask(old)
    [file] = tmp_path.iterdir()
    assert file.suffix == ".json" and file.stat().st_mode & 0o777 == 0o640


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_cache_folder_of_another_user_is_not_used(tmp_path, caplog):
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chown(folder, 65534, 65534)
    model = _model()
    tuned = AutotunedConvMixer(model, cache_dir=folder, **_quick(model))
    with caplog.at_level(logging.WARNING, logger="convmixer_timm"), torch.no_grad():
        tuned(torch.randn(2, 3, 8, 8))
        tuned(torch.randn(1, 3, 8, 8))
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and "owned by uid 65534" in caplog.text
    assert tuned.tunings == 2 and not list(folder.iterdir())

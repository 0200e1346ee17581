"""The native operators against hostile and random calls, in a subprocess so that a crash is seen, not suffered.

``operator_fuzz.py`` calls ``torch.ops.convmixer_timm.*`` (and the public ``BatchNorm2d``) with the calls that once
corrupted memory and with hundreds of random ones: shapes (zero-size, one element, 100000 channels), dtypes
(float32/64, bfloat16, float16, int32, int64, bool), layouts (non-contiguous, channels_last, transposed, expanded
with stride 0, pending negation), vectors of the wrong length, bad kernel sizes and paddings, meta tensors among CPU
ones. No call may end the process by a signal; every invalid call raises; every valid one gives PyTorch's result
within the tolerances stated there.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from convmixer_timm import speed

FUZZ = Path(__file__).with_name("operator_fuzz.py")
ROOT = Path(__file__).resolve().parents[1]
SEED, RANDOM_CALLS = 16, 400

pytestmark = pytest.mark.skipif(speed.load() is None, reason="kernels not built: the operators are not callable")


def _fuzz(seed: int, count: int) -> Counter:
    """Run the known and ``count`` random calls; fail on a signal or a wrong answer; count (label, outcome)."""
    result = subprocess.run([sys.executable, str(FUZZ), str(seed), str(count)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    cases = {r["start"]: r["case"] for r in records if "start" in r}
    done = {r["done"]: r for r in records if "done" in r}
    if result.returncode != 0:
        unfinished = [cases[i] for i in cases if i not in done]
        how = (f"signal {signal.Signals(-result.returncode).name}" if result.returncode < 0
               else f"exit status {result.returncode}")
        pytest.fail(f"the fuzzing process ended by {how} during {unfinished[-1] if unfinished else 'start-up'}\n"
                    f"{result.stderr[-3000:]}")
    failures = [f"{cases[i]}\n    -> {r['outcome']}: {r.get('detail')}" for i, r in done.items()
                if r["outcome"] not in ("ok", "raised")]
    assert not failures, f"{len(failures)} of {len(done)} calls answered wrongly:\n" + "\n".join(failures[:20])
    assert len(done) == len(cases)
    return Counter((r["label"], r["outcome"]) for r in done.values())


def test_known_hostile_calls_raise_and_outputs_follow_the_input():
    counts = _fuzz(SEED, 0)
    # The calls that read past buffers or aborted the process now raise; the valid ones (outputs allocated like
    # the input under torch.set_default_device("meta"), 100000 channels, zero-size) give PyTorch's result.
    assert counts[("invalid", "raised")] >= 20 and counts[("valid", "ok")] >= 5
    assert counts[("module", "raised")] == 6 and counts[("module", "ok")] == 2  # PyTorch's error, or its result


@pytest.mark.slow
def test_random_calls_raise_or_give_pytorchs_result():
    counts = _fuzz(SEED, RANDOM_CALLS)
    # Not vacuous: many calls of each kind were made and checked.
    assert counts[("valid", "ok")] >= 100 and counts[("invalid", "raised")] >= 100, counts

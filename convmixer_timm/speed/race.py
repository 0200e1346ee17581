"""The contest behind each choice of :func:`optimize_for_inference`: :func:`race`, and the batch buckets a
choice covers (:func:`batch_bucket`)."""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence

__all__ = ["Clock", "RaceResult", "Watch", "batch_bucket", "race", "runner_up", "score", "spread"]

logger = logging.getLogger("convmixer_timm")

Clock = Callable[[], float]


def batch_bucket(batch: int) -> tuple[int, int]:
    """The batch sizes one choice covers, as TensorRT's optimization profiles do: powers of two up to the next
    (1, 2-3, 4-7, 8-15, ...). Within a bucket the paths rank alike, and a server batching requests dynamically
    races once per bucket instead of once per batch size: at most ``log2(largest batch) + 1`` races per image
    size."""
    if batch < 1:
        return (batch, batch)
    low = 1 << (batch.bit_length() - 1)
    return (low, 2 * low - 1)


def score(times: Sequence[float]) -> float:
    """The mean of the faster half: another process's load only ever adds time, so the slow samples say more
    about the machine than about the path, and a single lucky sample is not trusted alone either."""
    low = sorted(times)[: max(1, len(times) // 2)]
    return sum(low) / len(low)


def spread(times: Sequence[float]) -> float:
    """How far apart one path's timed calls were, relative to the fastest: the noise a win must exceed."""
    return (max(times) - min(times)) / min(times) if times and min(times) > 0 else 0.0


@dataclasses.dataclass
class RaceResult:
    """What :func:`race` decided: the winner, each candidate's timed calls, and why any were dropped."""

    choice: str
    times: dict[str, list[float]]
    dropped: dict[str, str]


def race(candidates: Mapping[str, Callable[[], object]], clock: Clock = time.perf_counter, rounds: int = 5,
         min_rounds: int = 2, margin: float = 0.03, drop_ratio: float = 1.2,
         incumbents: Sequence[str] | None = None, warmup_drop_ratio: float | None = 2.5,
         settle: float = 0.0, settle_before: Collection[str] = ()) -> RaceResult:
    """Interleaved rounds that stop early: the contest behind each of :class:`AutotunedConvMixer`'s choices.

    One warm-up call each (a candidate more than ``warmup_drop_ratio`` times slower than the fastest first call
    is out at once; ``None`` keeps all), then rounds of one timed call per candidate, in an order rotated every
    round (so no path always runs right after the same neighbour). From round ``min_rounds`` on, a candidate whose
    fastest call is more than ``drop_ratio`` times the leader's score is out, and the race ends when one is
    left (once it has run ``min_rounds`` timed calls) or after ``rounds``. A candidate that raises is out too, with
    a warning, unless it is the first incumbent: the reference model itself refusing the input is the caller's
    error and is raised; where every other path failed, the reference is the answer. Scores are
    the mean of each candidate's faster half of calls. The winner must beat the best incumbent (``incumbents``,
    default the first candidate) by ``margin`` to be chosen, so timing noise does not replace the reference
    path with one that is no faster. ``settle`` seconds pass (untimed) before each call of a candidate in
    ``settle_before``, so that it does not share the cores with the threads the previous call left spinning.
    """
    incumbents = list(incumbents) if incumbents else [next(iter(candidates))]
    rounds = max(1, rounds)
    reference = incumbents[0]
    alive = dict(candidates)
    dropped: dict[str, str] = {}

    def drop(name: str, error: BaseException) -> None:
        if name == reference:
            raise error
        logger.warning("convmixer_timm: inference path %r left out: %s: %s", name, type(error).__name__, error)
        dropped[name] = f"{type(error).__name__}: {error}"
        alive.pop(name, None)

    def pause(name: str) -> None:
        if settle > 0 and name in settle_before:
            time.sleep(settle)

    first: dict[str, float] = {}
    for name, run in list(alive.items()):
        pause(name)
        start = clock()
        try:
            run()  # first call: oneDNN primitive creation, weight reorders, onnxruntime arena growth
        except Exception as error:  # a path that fails is not a choice; the others still give the answer
            drop(name, error)
            continue
        first[name] = clock() - start
    if first and warmup_drop_ratio:
        # A first call costs more than later ones, by a one-time setup that is largest for the fast paths
        # (OpenVINO's first inference, oneDNN's primitives): only a path far behind even then is out at once.
        fastest = min(first.values())
        for name in list(alive):
            if len(alive) > 1 and first[name] > fastest * warmup_drop_ratio:
                alive.pop(name)
    times: dict[str, list[float]] = {name: [] for name in alive}
    order = list(alive)
    for index in range(rounds):
        shift = index % len(order)
        for name in order[shift:] + order[:shift]:
            if name not in alive:
                continue
            pause(name)
            start = clock()
            try:
                alive[name]()
            except Exception as error:
                drop(name, error)
                continue
            times[name].append(clock() - start)
        if index + 1 >= min_rounds and len(alive) > 1:
            leader = min(score(times[name]) for name in alive)
            for name in list(alive):
                if min(times[name]) > leader * drop_ratio:
                    alive.pop(name)  # clearly behind: another call would not change the outcome
        if len(alive) <= 1 and index + 1 >= min_rounds:  # the last one standing has run min_rounds calls too
            break
    if not alive:  # every other path failed: the reference ran its first call, so it is the safe answer
        return RaceResult(reference, {name: values for name, values in times.items() if values}, dropped)
    scores = {name: score(times[name]) for name in alive}
    best = min(scores, key=scores.get)
    standing = [name for name in incumbents if name in scores]
    if standing:
        incumbent = min(standing, key=scores.get)
        if scores[best] >= scores[incumbent] * (1.0 - margin):
            best = incumbent
    return RaceResult(best, {name: values for name, values in times.items() if values}, dropped)


def runner_up(result: RaceResult, choice: str) -> tuple[float | None, float, float]:
    """The runner-up's score, the winner's margin over it (negative where an incumbent was kept though slower),
    and the race's noise (the larger spread of the two)."""
    scores = {name: score(times) for name, times in result.times.items() if name not in result.dropped}
    others = [name for name in scores if name != choice]
    if choice not in scores or not others:
        return None, 0.0, 0.0
    rival = min(others, key=scores.get)
    margin = scores[rival] / scores[choice] - 1.0 if scores[choice] > 0 else 0.0
    return scores[rival], margin, max(spread(result.times[choice]), spread(result.times[rival]))


class Watch:
    """Steady-use timings of one choice, and whether it is due for a re-check: once the faster half of its
    last ``calls`` timings is ``margin`` slower than ``rival`` (the runner-up's time in the race)."""

    def __init__(self, rival: float, calls: int, margin: float):
        self.rival, self.calls, self.margin = rival, calls, margin
        self.times: collections.deque[float] = collections.deque(maxlen=calls)
        self.due = False
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self.times.append(seconds)
            if len(self.times) == self.calls and score(self.times) > self.rival * (1.0 + self.margin):
                self.due = True

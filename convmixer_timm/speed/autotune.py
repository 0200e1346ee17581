"""Choosing the fastest exact inference path where it runs: :class:`AutotunedConvMixer` and
:func:`optimize_for_inference`.

Which path is fastest depends on the shape and the CPU, so nothing is assumed: the paths race (:func:`.race.race`)
on the first input of each (batch bucket, image size), on a copy cut to two blocks where a call is large, and the
winner serves every batch size of its bucket. Choices are remembered across processes (:class:`ChoiceCache`) and
re-checked when they stop winning: a choice whose steady-use time falls behind the runner-up's recorded time, or a
remembered one that won by less than the race's noise, races again.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from .choice_cache import ChoiceCache, architecture, cache_dir, machine, version
from .fused import FusedConvMixerInference, supported
from .loader import kernel_info, load
from .precision import check_precision
from .race import Clock, RaceResult, Watch, batch_bucket, race, runner_up, score
from .runtimes import RUNTIMES, OnnxRuntimeConvMixer, OpenVinoConvMixer, RaceRuntimes, full_size, installed_runtimes

__all__ = ["AutotunedConvMixer", "optimize_for_inference"]

logger = logging.getLogger("convmixer_timm")

# Timing is serialized process-wide: two measurements at once (two shapes, two modules) would each time the
# other's load. Looking up a choice already made never waits for it.
_MEASURING = threading.Lock()

# A call of at most this many multiply-adds is cheap enough to time on the whole model; above it, paths race on
# a copy cut to PROXY_DEPTH blocks. The blocks are identical, so a path's time is its stem and head plus depth x
# its block time, and the race ranks the block time at a fraction of the cost (768/32 at batch 2: 1/16).
PROXY_MACS = 2 * 10 ** 9
PROXY_DEPTH = 2
# A copy cut to two blocks weighs per-call costs (a runtime's request overhead, the stem and the head) more than
# the whole model does, so after a race on the copy, PyTorch's best path and the best runtime race again on the
# whole model, where both are within this ratio of the copy's winner.
CONFIRM_RATIO = 1.3
# Steady use re-checks a choice once the faster half of its last WATCH_CALLS timed calls (at the batch size the
# race timed, with no other call or race running) is this much slower than the runner-up was in the race. Each
# re-race of a bucket doubles the calls the next re-check needs, so re-races are logarithmic in the calls made.
RECHECK_MARGIN = 0.10
WATCH_CALLS = 16
# A remembered choice that won by less than its race's noise races again in the next processes, up to this many
# races in all; the winner of the last one is kept (both were within noise, so either is as good).
CLOSE_CALL_RACES = 2


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One bucket's choice. Never changed once made: a new choice is a new entry, and an evicted entry's runtime
    goes with the last reference to it, so a call that holds the entry can always finish with it."""

    name: str
    runner: nn.Module | None  # a foreign runtime built for the whole model and the bucket, or None for PyTorch's
    source: str  # "timed" or "remembered"
    batch: int  # the batch size the race timed
    watch: Watch | None  # None where no other path finished the race: nothing to compare with


def _cut(module: nn.Module, depth: int) -> nn.Module:
    """A shallow copy of ``module`` with only its first ``depth`` blocks (parameters shared, nothing copied)."""
    cut = copy.copy(module)
    cut._modules = dict(module._modules)
    blocks = module.blocks
    cut._modules["blocks"] = blocks[:depth]  # Sequential and ModuleList slice to their own type
    if isinstance(module, FusedConvMixerInference):
        cut._packed = {}  # packed weights are per block list
    return cut


def _due(entry: _Entry) -> bool:
    return entry.watch is not None and entry.watch.due


class AutotunedConvMixer(nn.Module):
    """What :func:`optimize_for_inference` returns: for each batch bucket and image size, the fastest exact path.

    Like ``torch.backends.cudnn.benchmark``: the first call with a new (batch bucket, image size, dtype, device)
    races the paths (:func:`.race.race`) and keeps the winner for every batch size of the bucket
    (:func:`.race.batch_bucket`: 1, 2-3, 4-7, ...; ``choices``). The paths: the plain eval model with NCHW or
    channels_last input (the faster is the incumbent, kept unless another path beats it by ``margin``),
    :class:`FusedConvMixerInference` with each pointwise (oneDNN conv, MKL addmm) and depthwise (compiled kernel,
    oneDNN) implementation where the model is supported, and ``runtimes`` (onnxruntime, OpenVINO) on the model's
    ONNX export. Where a call is large (``PROXY_MACS``), the race runs on a copy cut to ``proxy_depth`` blocks,
    and only the winner is built for the whole model.

    A choice is re-checked when it stops winning: calls at the batch size the race timed are timed on ``clock``
    (when no other call or race runs), and a choice slower than the runner-up's race time by ``RECHECK_MARGIN``
    over ``WATCH_CALLS`` calls races again (each re-race of a bucket doubles the calls the next one needs).

    ``cache_dir``: a folder where choices are remembered across processes (:class:`ChoiceCache`); ``None``
    remembers nothing on disk. ``max_shapes``: how many buckets' choices are kept; the least recently used is
    dropped with its runtime. Thread-safe: threads that see a new bucket together wait for one race and share its
    result; calls of buckets already chosen never wait for a race. Progress goes to the ``convmixer_timm`` logger.
    """

    incumbents: tuple[str, ...] = ("plain", "plain channels_last")  # kept unless beaten by ``margin``

    def __init__(self, model: nn.Module, clock: Clock = time.perf_counter, rounds: int = 5, margin: float = 0.03,
                 announce: bool = True, runtimes: Sequence[str] = (), cache_dir: str | os.PathLike | None = None,
                 max_shapes: int = 8, proxy_depth: int = PROXY_DEPTH, min_rounds: int = 2, settle: float = 0.02):
        super().__init__()
        if unknown := set(runtimes) - set(RUNTIMES):
            raise ValueError(f"unknown runtimes {sorted(unknown)}: choose from {RUNTIMES}")
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
        self.runtimes = tuple(runtimes)
        self.plain = copy.deepcopy(model).eval()
        self.plain_channels_last = copy.deepcopy(self.plain).to(memory_format=torch.channels_last)
        self.fused = FusedConvMixerInference(model, "conv", "onednn") if supported(model) else None
        self._packers = [self.fused] if self.fused is not None else []  # per-shape packed weights: freed on eviction
        self.clock, self.rounds, self.min_rounds, self.margin = clock, rounds, min(min_rounds, rounds), margin
        self.announce, self.max_shapes, self.proxy_depth = announce, max_shapes, max(1, proxy_depth)
        self.settle = settle  # untimed seconds before each timed call (race's ``settle``)
        self.disk = ChoiceCache(cache_dir) if cache_dir is not None else None
        self.tunings = 0  # races run by this module (a remembered choice is not one)
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # guards _entries and _shape_locks; never held while measuring
        self._shape_locks: dict[tuple, threading.Lock] = {}
        self._calls = threading.Lock()  # guards the two counters below: is a timed call alone?
        self._in_flight = self._started = 0
        self._foreign = RaceRuntimes()
        self._arch = architecture(self.plain)
        self.last_race: dict[tuple, RaceResult] = {}  # each key's latest race (the whole model's, where one ran)
        self.eval()

    # -- the paths

    def paths(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """PyTorch's paths by name: the plain model in both layouts, and the fused module's combinations."""
        names = ["plain", "plain channels_last"]
        if self.fused is not None:
            depthwise = ("onednn", "kernel") if load() is not None else ("onednn",)
            names += [f"{pw}+{dw}" for pw in ("conv", "mm") for dw in depthwise]
        return {name: functools.partial(self.run_path, name) for name in names}

    def run_path(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One of PyTorch's paths (see :meth:`paths`) on ``x``."""
        return self._run_torch_path(name, x, self.plain, self.plain_channels_last, self.fused)

    @staticmethod
    def _run_torch_path(name: str, x: torch.Tensor, plain: nn.Module, plain_cl: nn.Module,
                        fused: FusedConvMixerInference | None) -> torch.Tensor:
        if name == "plain":
            return plain(x)
        if name == "plain channels_last":
            return plain_cl(x.contiguous(memory_format=torch.channels_last))
        pointwise, depthwise = name.split("+")
        return fused.run(x, pointwise, depthwise)

    def _foreign_builders(self) -> dict[str, Callable[[nn.Module, tuple[int, ...], bool], nn.Module]]:
        """Each optional runtime's path: a builder taking (model, input shape, whether ``model`` is the whole
        one) and returning a module for every batch size of that shape's bucket. Subclasses may add their own."""
        builders: dict[str, Callable[[nn.Module, tuple[int, ...], bool], nn.Module]] = {}
        if "onnxruntime" in self.runtimes:
            builders["onnxruntime"] = self._foreign.onnxruntime
        if "openvino" in self.runtimes:
            for hint in ("LATENCY", "THROUGHPUT"):
                builders[f"openvino {hint.lower()}"] = functools.partial(self._openvino, hint)
        return builders

    def _openvino(self, hint: str, model: nn.Module, shape: tuple[int, ...], whole: bool) -> nn.Module:
        return self._foreign.openvino(hint, shape, onnx=self._foreign.export(model, shape, whole))

    # -- choosing

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        bucket = batch_bucket(int(x.shape[0])) if x.dim() else (0, 0)
        return (bucket, tuple(x.shape[1:]), x.dtype, x.device.type)

    def _disk_key(self, x: torch.Tensor, candidates: Sequence[str]) -> dict[str, object]:
        versions = {name: version(name) for name in ("torch", "timm", "convmixer-timm", *self.runtimes)}
        bucket = self._key(x)[0]
        return {"machine": machine(), "threads": torch.get_num_threads(), "versions": versions,
                "kernels": str(kernel_info().get("isa")) if load() is not None else "none",
                "model": self._arch, "input": {"batches": list(bucket), "image": list(x.shape[1:]),
                                               "dtype": str(x.dtype)},
                "candidates": sorted(candidates)}

    def _proxy_depth(self, x: torch.Tensor) -> int | None:
        """The depth of the copy the race runs on, or None to race on the whole model."""
        arch = self._arch
        if "dim" not in arch or arch["depth"] <= self.proxy_depth:
            return None
        grid = (x.shape[-2] // arch["patch"]) * (x.shape[-1] // arch["patch"])
        dim = arch["dim"]
        block = arch["kernel"] ** 2 * dim + dim * dim
        macs = x.shape[0] * grid * (arch["in_chans"] * arch["patch"] ** 2 * dim + arch["depth"] * block)
        return self.proxy_depth if macs > PROXY_MACS else None

    def _build(self, name: str, x: torch.Tensor) -> nn.Module | None:
        """The whole model's runner for a foreign path (None for PyTorch's paths)."""
        builders = self._foreign_builders()
        return builders[name](self.plain, tuple(x.shape), True) if name in builders else None

    def _remembered(self, x: torch.Tensor, record: dict, names: Sequence[str]) -> _Entry | None:
        """The entry for a remembered choice, or None where it must race again (not on offer, a close call)."""
        if record["choice"] not in names:
            return None
        if record["margin"] < record["noise"] and record["races"] < CLOSE_CALL_RACES:
            logger.debug("convmixer_timm: %s won by %.1f%% inside %.1f%% noise; timing again", record["choice"],
                         100 * record["margin"], 100 * record["noise"])
            return None
        if record["openvino_requests"] is not None:
            self._foreign.openvino_requests[self._key(x)[:2]] = record["openvino_requests"]
        try:
            runner = self._build(record["choice"], x)
        except Exception as error:
            logger.warning("convmixer_timm: the remembered inference path %r failed to build (%s: %s); "
                           "timing again", record["choice"], type(error).__name__, error)
            return None
        rival = record.get("rival_ms")
        watch = Watch(rival / 1e3, WATCH_CALLS, RECHECK_MARGIN) if rival is not None else None
        return _Entry(record["choice"], runner, "remembered", record["batch"], watch)

    def _tune(self, x: torch.Tensor, previous: _Entry | None = None) -> _Entry:
        foreign_ok = x.device.type == "cpu" and x.dtype == torch.float32
        builders = self._foreign_builders() if foreign_ok else {}
        names = [*self.paths(), *builders]
        disk_key = self._disk_key(x, names) if self.disk is not None else None
        races = 1
        if disk_key is not None and previous is None:
            record = self.disk.get(disk_key)
            if record is not None:
                entry = self._remembered(x, record, names)
                if entry is not None:
                    logger.debug("convmixer_timm: %s for input %s, remembered in %s", entry.name, list(x.shape),
                                 self.disk.path(disk_key))
                    return entry
                races = record["races"] + 1
        depth = self._proxy_depth(x)
        level = logging.INFO if self.announce else logging.DEBUG
        why = "again: the choice fell behind in use" if previous is not None else "(once per batch bucket)"
        logger.log(level, "convmixer_timm: timing %d inference paths for input %s%s %s", len(names), list(x.shape),
                   f" on a {depth}-block copy" if depth else "", why)
        with _MEASURING:
            start = time.perf_counter()  # for the log line only; the choice uses self.clock
            if depth is None:
                plain, plain_cl, fused = self.plain, self.plain_channels_last, self.fused
            else:
                plain, plain_cl = _cut(self.plain, depth), _cut(self.plain_channels_last, depth)
                fused = _cut(self.fused, depth) if self.fused is not None else None
            candidates: dict[str, Callable[[], object]] = {
                name: functools.partial(self._run_torch_path, name, x, plain, plain_cl, fused)
                for name in self.paths()}
            foreign: dict[str, nn.Module] = {}
            for name, make in builders.items():
                try:
                    foreign[name] = make(plain, tuple(x.shape), depth is None)
                except Exception as error:  # an optional path: the others still give the answer
                    logger.warning("convmixer_timm: inference path %r left out for input %s: %s: %s", name,
                                   list(x.shape), type(error).__name__, error)
                    continue
                candidates[name] = functools.partial(foreign[name], x)
            with torch.no_grad():
                # PyTorch's OpenMP workers spin for a few ms after a call: a runtime's call right after one
                # would pay for it, and a PyTorch call would find its threads awake. Every timed call starts
                # from a quiet machine, as each path does in steady use when it runs alone.
                result = race(candidates, self.clock, self.rounds, self.min_rounds, self.margin,
                              incumbents=self.incumbents, settle=self.settle,
                              settle_before=tuple(candidates))
            if result.choice in foreign:
                # A foreign runtime costs an export and a compilation per new bucket and a thread pool beside
                # PyTorch's: like the incumbent, PyTorch's best path is kept unless the runtime beats it clearly.
                own = {n: score(t) for n, t in result.times.items() if n in candidates and n not in foreign}
                best_own = min(own, key=own.get) if own else None  # none: all far behind on their first call
                if best_own and score(result.times[result.choice]) >= own[best_own] * (1.0 - self.margin):
                    result.choice = best_own
            runner = foreign.get(result.choice) if depth is None else None
            foreign_names = set(foreign)
            foreign.clear()  # the runtimes that lost are released now, threads and all
            self._foreign.drop_proxies()
            del candidates, plain, plain_cl, fused
            self.tunings += 1
        remember, timed = disk_key is not None, result
        rival, margin, noise = runner_up(result, result.choice)
        if depth is not None:
            with _MEASURING:
                result.choice, runner, final = self._confirm_on_whole_model(x, result, foreign_names)
            if final is not None:  # times of the whole model
                timed = final
                rival, margin, noise = runner_up(final, result.choice)
            elif rival is not None:  # the copy's stem and head counted depth/proxy times: an upper bound
                rival = rival * self._arch["depth"] / depth
        if depth is not None and result.choice in builders and runner is None:
            try:
                runner = self._build(result.choice, x)
            except Exception as error:  # not remembered: the next process races again
                logger.warning("convmixer_timm: inference path %r failed for the whole model (%s: %s); using "
                               "the plain model", result.choice, type(error).__name__, error)
                result.choice, remember, rival = "plain", False, None
        self.last_race[self._key(x)] = dataclasses.replace(timed, choice=result.choice)
        logger.log(level, "convmixer_timm: chose %s for input %s in %.1f s (%s)", result.choice, list(x.shape),
                   time.perf_counter() - start, ", ".join(f"{n} {1e3 * score(t):.1f} ms" for n, t in sorted(
                       timed.times.items(), key=lambda item: score(item[1]))))
        if remember:
            self.disk.put(disk_key, {
                "choice": result.choice, "proxy_depth": depth, "batch": int(x.shape[0]), "races": races,
                "openvino_requests": self._foreign.openvino_requests.get(self._key(x)[:2]),
                "margin": margin, "noise": noise, "rival_ms": None if rival is None else 1e3 * rival,
                "ms": {n: round(1e3 * score(t), 3) for n, t in result.times.items()}})
        calls = WATCH_CALLS if previous is None or previous.watch is None else 2 * previous.watch.calls
        watch = Watch(rival, calls, RECHECK_MARGIN) if rival is not None and rival > 0 else None
        return _Entry(result.choice, runner, "timed", int(x.shape[0]), watch)

    def _confirm_on_whole_model(self, x: torch.Tensor, result: RaceResult, foreign_names: set[str]
                                ) -> tuple[str, nn.Module | None, RaceResult | None]:
        """After a race on a cut copy: PyTorch's best path and the best runtime, where both came within
        ``CONFIRM_RATIO`` of the winner, race again on the whole model. Returns the choice, the whole-model
        runner where a runtime won, and the whole model's race where one ran."""
        scores = {name: score(times) for name, times in result.times.items() if name not in result.dropped}
        own = [name for name in scores if name not in foreign_names]
        other = [name for name in scores if name in foreign_names]
        if not own or not other:
            return result.choice, None, None
        best = min(scores.values())
        best_own, best_other = min(own, key=scores.get), min(other, key=scores.get)
        if max(scores[best_own], scores[best_other]) > best * CONFIRM_RATIO:
            return result.choice, None, None
        try:
            runner = self._build(best_other, x)
        except Exception as error:  # the runtime fails on the whole model: PyTorch's path stands
            logger.warning("convmixer_timm: inference path %r failed for the whole model (%s: %s)", best_other,
                           type(error).__name__, error)
            return best_own, None, None
        candidates = {
            best_own: functools.partial(self._run_torch_path, best_own, x, self.plain, self.plain_channels_last,
                                        self.fused),
            best_other: functools.partial(runner, x),
        }
        with torch.no_grad():
            final = race(candidates, self.clock, self.rounds, self.min_rounds, self.margin, incumbents=(best_own,),
                         settle=self.settle, settle_before=tuple(candidates))
        return final.choice, (runner if final.choice == best_other else None), final

    def _entry(self, x: torch.Tensor) -> _Entry:
        key = self._key(x)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                if not _due(entry):
                    return entry
            shape_lock = self._shape_locks.setdefault(key, threading.Lock())
        # One race per bucket: threads that see a new one meanwhile wait here and reuse it. A choice due for a
        # re-check keeps serving the other threads while one of them races again.
        if not shape_lock.acquire(blocking=entry is None):
            return entry
        try:
            with self._lock:
                current = self._entries.get(key)
            if current is not None and not _due(current):
                return current
            new = self._tune(x, previous=current)
            with self._lock:
                self._entries[key] = new
                self._entries.move_to_end(key)
                excess = len(self._entries) - self.max_shapes
                evicted = [self._entries.popitem(last=False)[0] for _ in range(excess)]
                self._shape_locks.pop(key, None)
        except BaseException:
            with self._lock:  # an input the model refuses leaves no lock behind
                self._shape_locks.pop(key, None)
            raise
        finally:
            shape_lock.release()
        for (low, high), image, _, _ in evicted:  # the entries and their runtimes go with their last reference
            self._foreign.openvino_requests.pop(((low, high), image), None)
            for module in self._packers:
                module.release(image, range(low, high + 1))
        return new

    @property
    def choices(self) -> dict[tuple, str]:
        """The path chosen for each ((smallest, largest batch), image size, dtype, device) kept, least recently
        used first."""
        with self._lock:
            return {key: entry.name for key, entry in self._entries.items()}

    def tune(self, x: torch.Tensor) -> str:
        """Choose a path for ``x``'s batch bucket, image size, dtype and device if none is kept yet; its name."""
        return self._entry(x).name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            entry = self._entry(x)  # read once: a later eviction or re-check replaces the entry, never changes it
            watch = entry.watch if x.dim() and x.shape[0] == entry.batch else None
            with self._calls:
                self._in_flight += 1
                self._started += 1
                ticket = self._started if self._in_flight == 1 and not _MEASURING.locked() else None
            start = self.clock() if watch is not None and ticket is not None else None
            try:
                return entry.runner(x) if entry.runner is not None else self.run_path(entry.name, x)
            finally:
                stop = self.clock() if start is not None else None
                with self._calls:
                    self._in_flight -= 1
                    alone = ticket is not None and self._started == ticket and not _MEASURING.locked()
                if stop is not None and alone:
                    watch.add(stop - start)


def optimize_for_inference(model: nn.Module, input_size: Sequence[int] | None = None, backend: str = "auto",
                           cache: bool | str | os.PathLike = True, precision: str = "fp32",
                           calibration: Iterable[object] | None = None) -> nn.Module:
    """Return the fastest exact eval-mode version of ``model`` (a convmixer-timm or timm ``ConvMixer``).

    The model itself is left untouched. Which implementation is fastest depends on the shape and the CPU (on an
    AVX2-only EPYC the compiled spatial-mixing kernel lost to oneDNN by up to 2x where it won on AVX-512), so
    nothing is assumed: the paths race on the first input of each batch bucket (1, 2-3, 4-7, ...) and image
    size, and the winner serves that bucket (:class:`AutotunedConvMixer`, like ``cudnn.benchmark``). The first
    call of a new bucket takes seconds and logs what it does to the ``convmixer_timm`` logger (INFO); with
    ``input_size`` (``(N, C, H, W)`` or ``(C, H, W)``) that first race happens here instead. The plain eval model
    in its faster layout is the incumbent, kept unless another path beats it by 3%. Outputs match the eval-mode
    model to float32 rounding (``tests/test_inference.py``).

    ``cache``: choices are remembered across processes in :func:`cache_dir` (``True``), in the given folder, or
    not at all (``False``); a remembered choice skips the race (keyed by CPU, thread count, library versions,
    the model's architecture, the batch bucket and the image size).

    ``backend``: ``"auto"`` (default) also races the optional runtimes installed here, onnxruntime (the ``onnx``
    extra) and OpenVINO FP32 (the ``openvino`` extra), on the model's own ONNX export, and uses one where it is
    faster (imported with their telemetry off: :mod:`.runtimes`); ``"torch"`` keeps to PyTorch's paths;
    ``"onnxruntime"`` or ``"openvino"`` (needs ``input_size``) returns that runtime's wrapper alone.

    ``precision``: ``"fp32"`` (exact), ``"bf16"`` or ``"int8"`` (with ``calibration``): :mod:`.lowp`.
    """
    backends = ("auto", "torch", *RUNTIMES)
    if backend not in backends:
        raise ValueError(f"backend must be one of {backends}, got {backend!r}")
    check_precision(precision, calibration)
    if backend in RUNTIMES and input_size is None:
        raise ValueError(f"backend={backend!r} needs input_size: the ONNX graph is built for one input size")
    if precision != "fp32":
        from .lowp import LowPrecisionConvMixer, one_runtime

        if backend in RUNTIMES:
            return one_runtime(model, input_size, backend, precision, calibration)
        make = functools.partial(LowPrecisionConvMixer, model, precision, calibration)
    elif backend in RUNTIMES:
        return (OnnxRuntimeConvMixer if backend == "onnxruntime" else OpenVinoConvMixer)(model, input_size)
    else:
        make = functools.partial(AutotunedConvMixer, model)
    runtimes = installed_runtimes() if backend == "auto" else ()
    folder = (cache_dir() if cache is True else None) if isinstance(cache, bool) else Path(cache)
    tuned = make(announce=input_size is None, runtimes=runtimes, cache_dir=folder)
    if input_size is not None:
        tuned.tune(torch.randn(full_size(input_size), generator=torch.Generator().manual_seed(0)))
    return tuned

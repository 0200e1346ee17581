"""An opt-in glibc setting for eager CPU training: keep freed activation memory in the process.

ConvMixer never downsamples, so every activation of a training step is a large tensor (32 MiB for a CIFAR batch
of 32 at h=256). glibc serves allocations that large with a fresh ``mmap`` and unmaps them on free, so each new
tensor page-faults in zeroed pages: ``x * 2`` on such a tensor took 8.3 ms with glibc's defaults and 1.3 ms with
the thresholds below, GELU 11.2 -> 3.1 ms, BatchNorm 12.8 -> 3.5 ms (2-core x86_64, torch 2.14). The price is
memory: freed activations stay in the heap, where fragmentation raises the peak resident set of a training step
(256/8 k9 p1, batch 64: 4829 MiB raised, against 4072 MiB for timm's built-in with glibc's defaults). The speed
layer's own operators no longer need it: their outputs come from ``buffers.py``'s pool, which a training step
reuses without touching the allocator; the setting still speeds up whatever else the process allocates (timm's
modules, other models). So nothing is changed unless the user asks, in one of two ways:

* :func:`tune_cpu_allocator` raises the thresholds now, until :func:`restore_cpu_allocator`;
* ``CONVMIXER_TIMM_TUNE_MALLOC=1`` raises them at the first eager CPU training step of a ConvMixer (never for a
  model that is only built, evaluated, run elsewhere, or inside a compiled or traced region) and puts them back,
  with the freed memory returned to the system (``malloc_trim``), when the last model that trained on the CPU is
  garbage collected, or at once by :func:`restore_cpu_allocator`.

The usual process-wide alternative is preloading jemalloc or tcmalloc (``LD_PRELOAD=libjemalloc.so.2``, PyTorch's
CPU performance guide). Even when asked, nothing is changed where the user already chose the allocator's
behaviour: ``GLIBC_TUNABLES`` with a ``glibc.malloc`` setting, any ``MALLOC_*_`` variable glibc reads
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ...), or another allocator (jemalloc, tcmalloc, mimalloc)
loaded into the process. Otherwise glibc runs with its start values, which are what "put back" restores (mmap
threshold, trim threshold and top pad 128 KiB); glibc's adaptive mmap threshold, which any explicit threshold turns
off, stays off. ``CONVMIXER_TIMM_TUNE_MALLOC=0`` (the default) with no call of :func:`tune_cpu_allocator` leaves
glibc alone entirely.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
import weakref

from torch import nn

__all__ = [
    "allocator_tuned", "hold_while_training", "restore_cpu_allocator", "training_tunes_allocator", "tune_cpu_allocator",
    "user_chose_allocator",
]

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_RAISED = {_M_MMAP_THRESHOLD: 1 << 30, _M_TRIM_THRESHOLD: (1 << 31) - 1, _M_TOP_PAD: 64 << 20}
_GLIBC_DEFAULTS = {_M_MMAP_THRESHOLD: 128 << 10, _M_TRIM_THRESHOLD: 128 << 10, _M_TOP_PAD: 128 << 10}

# Re-entrant: a model's finalizer (which restores) can run from garbage collection inside a locked section.
_lock = threading.RLock()
_tuned = False
_asked_directly = False  # tune_cpu_allocator() called by the user: only restore_cpu_allocator() undoes it
_holders: weakref.WeakSet = weakref.WeakSet()


_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def user_chose_allocator() -> str | None:
    """What the user set that makes the allocator theirs to tune (None where nothing is)."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    chosen = sorted(name for name in os.environ if name.startswith("MALLOC_") and name.endswith("_"))
    if chosen:
        return chosen[0]
    preload = os.environ.get("LD_PRELOAD", "")
    return next((name for name in _OTHER_ALLOCATORS if name in preload), None) or _other_allocator_mapped()


@functools.cache
def _other_allocator_mapped() -> str | None:
    # Linked in, or preloaded under any name. A loaded allocator stays loaded, so /proc/self/maps is read once per
    # process, not at every training step that finds the allocator the user's.
    try:
        with open("/proc/self/maps") as maps:
            mapped = maps.read()
    except OSError:
        return None
    return next((name for name in _OTHER_ALLOCATORS if f"lib{name}" in mapped), None)


@functools.cache
def _glibc_functions() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError where the C library is not glibc
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def training_tunes_allocator() -> bool:
    """Whether ``CONVMIXER_TIMM_TUNE_MALLOC`` asks for the setting while a ConvMixer trains on the CPU."""
    return os.environ.get("CONVMIXER_TIMM_TUNE_MALLOC", "0").strip().lower() in ("1", "true", "yes", "on")


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or user_chose_allocator() is not None:
        return None  # the user's allocator settings stand (or there is no glibc malloc to tune)
    return _glibc_functions()


def _set(libc: ctypes.CDLL, values: dict[int, int]) -> bool:
    results = [libc.mallopt(option, value) == 1 for option, value in values.items()]  # every one, no short cut
    return all(results)


def allocator_tuned() -> bool:
    """Whether the raised thresholds are in effect now."""
    return _tuned


def tune_cpu_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds now, until :func:`restore_cpu_allocator`; True where they are in
    effect (False where the user's allocator settings stand, or there is no glibc malloc)."""
    global _asked_directly
    with _lock:
        _asked_directly = _raise()
        return _asked_directly


def _raise() -> bool:
    global _tuned
    with _lock:
        if not _tuned:
            libc = _glibc()
            _tuned = libc is not None and _set(libc, _RAISED)
        return _tuned


def restore_cpu_allocator() -> None:
    """Put glibc's start values back and return freed memory to the system; a no-op where nothing was raised."""
    global _tuned, _asked_directly
    with _lock:
        _asked_directly = False
        if not _tuned:
            return
        libc = _glibc()
        if libc is not None:
            _set(libc, _GLIBC_DEFAULTS)
            libc.malloc_trim(0)
        _tuned = False
        _holders.clear()


def _release_if_last() -> None:
    # Iterating a WeakSet skips dead entries; len() may still count the one being collected.
    with _lock:
        if next(iter(_holders), None) is None and not _asked_directly:
            restore_cpu_allocator()


def hold_while_training(model: nn.Module) -> None:
    """With ``CONVMIXER_TIMM_TUNE_MALLOC=1``: keep the thresholds raised while ``model`` (training on the CPU) is
    alive. Otherwise nothing."""
    if not training_tunes_allocator():
        return
    with _lock:
        if model in _holders:
            return
        if _raise():
            _holders.add(model)
            weakref.finalize(model, _release_if_last).atexit = False

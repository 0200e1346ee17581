"""Full-size tensors of a CPU training step, reused from one step to the next instead of mapped afresh.

glibc's malloc serves every request of 32 MiB or more (its largest dynamic mmap threshold on 64-bit) with a mapping
of its own and unmaps it on free, so each such tensor faults in every page again: at 256/8 k9 p1, batch 32, a step
allocates about 70 of them and spends a sixth of its time in page faults. Raising glibc's thresholds would fix
that for the whole process (``allocator.py``, opt-in); this module fixes it for the speed layer's own operators
only: their full-size outputs come from a pool of storages that a step returns to when it frees them, so the next
step writes into pages that are already there.

A pooled storage is handed out again only when nothing else holds it: no tensor or view on it, no Python reference
to its storage object but the pool's, and not shared with another process (``share_memory_``), so a reused buffer
is never visible through anything older. The pool serves requests while a model that uses the speed layer trains
(:func:`hold`, called by its BatchNorm modules in a CPU training step, as ``allocator.py``'s setting is held); it is
emptied when the last such module is freed or leaves training mode, or by :func:`release_training_buffers`. It
holds at most what was alive at once of its buffers (in a plain training loop, one step's full-size tensors, so the
step's peak memory is what it would be without it), and a buffer left unused for ``IDLE_REQUESTS`` requests (the run
moved on to another batch or image size, or outputs the caller kept were freed) is dropped.
"""
from __future__ import annotations

import sys
import threading
import weakref
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["empty_channels_last", "hold", "pooled_bytes", "release_if_idle", "release_training_buffers"]

# Below this, glibc serves requests from its heap, where freed blocks are reused without faulting pages in.
POOLED_MIN_BYTES = 1 << 20

# A free buffer not handed out during this many requests is dropped (checked at every request the pool cannot serve
# and every IDLE_REQUESTS requests), so buffers of sizes a run stopped using do not stay for the rest of the run.
IDLE_REQUESTS = 4096
# The storage's reference count, read without holding a reference of our own; private to PyTorch (there since
# 1.x): without it the pool stays off and every tensor is a plain allocation.
_use_count = getattr(torch._C, "_storage_Use_Count", None)

# Re-entrant: a holder's finalizer (which may release the pool) can run from garbage collection inside a locked
# section.
_lock = threading.RLock()
_storages: dict[int, list[_Entry]] = defaultdict(list)
_holders: weakref.WeakSet = weakref.WeakSet()
_requests = 0


@dataclass
class _Entry:
    storage: torch.UntypedStorage
    last_request: int

    def unused(self) -> bool:
        # The storage's own count: the pool's Python storage object holds one reference, each tensor or view on it
        # one more. Python references to that object (``t.untyped_storage()`` returns the same one): the entry's,
        # and getrefcount's argument.
        return _use_count(self.storage._cdata) == 1 and sys.getrefcount(self.storage) == 2

    def reusable(self, nbytes: int) -> bool:
        # A storage resized by its last user is no longer the size it is filed under; one shared with another
        # process may still be read there.
        return self.unused() and self.storage.nbytes() == nbytes and not self.storage.is_shared()


def _channels_last_strides(shape: Sequence[int]) -> list[int]:
    _, c, h, w = shape
    return [h * w * c, 1, w * c, c]


def _active() -> bool:
    with _lock:
        return _use_count is not None and any(module.training for module in list(_holders))


def _drop_idle() -> None:
    for nbytes, entries in list(_storages.items()):
        kept = [e for e in entries if not e.unused()
                or (e.reusable(nbytes) and _requests - e.last_request <= IDLE_REQUESTS)]
        if kept:
            _storages[nbytes] = kept
        else:
            del _storages[nbytes]


def empty_channels_last(like: Tensor, shape: Sequence[int] | None = None) -> Tensor:
    """An uninitialised channels_last tensor of ``shape`` (default ``like``'s) with ``like``'s dtype and device,
    from the pool where one is active and the tensor is large enough to be worth it."""
    global _requests
    shape = list(like.shape if shape is None else shape)
    nbytes = like.element_size()
    for size in shape:
        nbytes *= size
    if nbytes < POOLED_MIN_BYTES or like.device.type != "cpu" or not _active():
        return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)
    with _lock:
        _requests += 1
        if _requests % IDLE_REQUESTS == 0:
            _drop_idle()
        entry = next((e for e in _storages.get(nbytes, ()) if e.reusable(nbytes)), None)
        if entry is None:
            _drop_idle()
            entry = _Entry(torch.UntypedStorage(nbytes, device=like.device), _requests)
            _storages[nbytes].append(entry)
        entry.last_request = _requests
        return like.new_empty(0).set_(entry.storage, 0, shape, _channels_last_strides(shape))


def hold(module: nn.Module) -> None:
    """Keep the pool serving while ``module`` is alive and training."""
    with _lock:
        if module in _holders:
            return
        _holders.add(module)
        weakref.finalize(module, release_if_idle).atexit = False


def release_if_idle() -> None:
    """Release the pool where no module that holds it is training any more."""
    if not _active():
        release_training_buffers()


def release_training_buffers() -> None:
    """Return the pool's free buffers to the system now (buffers still in use are freed with their tensors)."""
    with _lock:
        _storages.clear()


def pooled_bytes() -> int:
    """Bytes the pool holds, in use or free."""
    with _lock:
        return sum(e.storage.nbytes() for entries in _storages.values() for e in entries)

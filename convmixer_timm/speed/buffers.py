"""Full-size tensors of a CPU training step, reused from one step to the next instead of mapped afresh.

glibc's malloc serves every request of 32 MiB or more (its largest dynamic mmap threshold on 64-bit) with a mapping
of its own and unmaps it on free, so each such tensor faults in every page again: at 256/8 k9 p1, batch 32, a step
allocates about 70 of them and spends a sixth of its time in page faults. Raising glibc's thresholds would fix
that for the whole process (``allocator.py``, opt-in); this module fixes it for the speed layer's own operators
only: their full-size outputs come from a pool of storages that a step returns to when it frees them, so the next
step writes into pages that are already there.

A pooled storage is handed out again only when nothing else holds it (its reference count is the pool's own
reference), so a reused buffer is never visible through an older tensor. The pool serves requests while a model
that uses the speed layer trains (:func:`hold`, called by its BatchNorm modules in a CPU training step, as
``allocator.py``'s setting is held); it is emptied when the last such module is freed or leaves training mode,
or by :func:`release_training_buffers`. It never holds more than the step had alive at once, so the step's peak
memory is what it would be without it; between steps it keeps what the next step will reuse.
"""
from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["empty_channels_last", "hold", "pooled_bytes", "release_if_idle", "release_training_buffers"]

# Below this, glibc serves requests from its heap, where freed blocks are reused without faulting pages in.
POOLED_MIN_BYTES = 1 << 20

_lock = threading.Lock()
_storages: dict[int, list[torch.UntypedStorage]] = defaultdict(list)
_holders: weakref.WeakSet = weakref.WeakSet()


def _in_use(storage: torch.UntypedStorage) -> bool:
    # One reference is the pool's own Python storage object; any tensor or view on it adds one.
    return torch._C._storage_Use_Count(storage._cdata) > 1


def _channels_last_strides(shape: Sequence[int]) -> list[int]:
    _, c, h, w = shape
    return [h * w * c, 1, w * c, c]


def _active() -> bool:
    return any(module.training for module in _holders)


def empty_channels_last(like: Tensor, shape: Sequence[int] | None = None) -> Tensor:
    """An uninitialised channels_last tensor of ``shape`` (default ``like``'s) with ``like``'s dtype and device,
    from the pool where one is active and the tensor is large enough to be worth it."""
    shape = list(like.shape if shape is None else shape)
    nbytes = like.element_size()
    for size in shape:
        nbytes *= size
    if nbytes < POOLED_MIN_BYTES or like.device.type != "cpu" or not _active():
        return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)
    with _lock:
        pool = _storages[nbytes]
        storage = next((s for s in pool if not _in_use(s) and s.nbytes() == nbytes), None)
        if storage is None:
            pool[:] = [s for s in pool if s.nbytes() == nbytes]  # resized by their last user: not ours to reuse
            storage = torch.UntypedStorage(nbytes, device=like.device)
            pool.append(storage)
        return like.new_empty(0).set_(storage, 0, shape, _channels_last_strides(shape))


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
        return sum(s.nbytes() for pool in _storages.values() for s in pool)

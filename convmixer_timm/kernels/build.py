"""Building and loading the compiled CPU kernels (``training_kernels.cpp``) on first use.

The C++ source ships with the package and is compiled once per machine with the system C++ compiler into a cache
folder (``$CONVMIXER_TIMM_CACHE``, else ``~/.cache/convmixer_timm``, else a per-user folder in the temp
directory where that is not writable). Where no compiler is found or the build
fails, ``load()`` returns None, warns once, and callers keep PyTorch's own ops: slower, same numbers.
``CONVMIXER_TIMM_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["cache_dir", "enabled", "kernels_apply", "load"]

_SOURCE = Path(__file__).with_name("training_kernels.cpp")
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]
if platform.machine().lower() in ("x86_64", "amd64"):
    _FLAGS.append("-mprefer-vector-width=512")  # GCC prefers 256-bit vectors even where AVX-512 is there
_POINTER, _INT64, _INT, _DOUBLE = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
_SIGNATURES = {
    **{f"depthwise_weight_grad_{t}": [_POINTER] * 3 + [_INT64] * 4 + [_INT] * 3 for t in ("f32", "f64")},
    **{f"batch_norm_forward_{t}": [_POINTER] * 7 + [_INT64, _INT64, _DOUBLE, _INT] for t in ("f32", "f64")},
    **{f"batch_norm_backward_{t}": [_POINTER] * 8 + [_INT64, _INT64, _INT] for t in ("f32", "f64")},
    "spatial_mixing_f32": [_INT] + [_POINTER] * 7 + [_INT64] * 4 + [_INT] * 3,
}
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    return os.environ.get("CONVMIXER_TIMM_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("CONVMIXER_TIMM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "convmixer_timm"


def _cpu_signature() -> str:
    # -march=native binds the binary to this CPU; a cache shared between machines must not mix them.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _build(compiler: str) -> Path:
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *_FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    name = f"training_kernels-{key}.so"
    # A read-only home (some CI runners, containers) falls back to a per-user folder in the temp directory.
    fallback = Path(tempfile.gettempdir()) / f"convmixer_timm-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    for folder in (cache_dir(), fallback):
        if (folder / name).exists():
            return folder / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # Build beside the target and rename: concurrent processes (torchrun) never load a half-written file.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            break
        except OSError:
            continue
    else:
        raise RuntimeError(f"no writable folder for the compiled kernels (tried {cache_dir()} and {fallback}); "
                           "set CONVMIXER_TIMM_CACHE to a writable folder")
    target = folder / name
    os.close(fd)
    try:
        result = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip()[-2000:] or f"{compiler} exited with {result.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first call; None where kernels are off or cannot be built."""
    global _library, _tried
    if not enabled():
        return None
    if _tried:
        return _library
    with _lock:
        if _tried:
            return _library
        try:
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C++ compiler found (looked for $CXX, g++, c++, clang++)")
            library = ctypes.CDLL(str(_build(compiler)))
            for name, argtypes in _SIGNATURES.items():
                fn = getattr(library, name)
                fn.restype = None
                fn.argtypes = argtypes
            _library = library
        except (OSError, RuntimeError) as error:
            warnings.warn(
                f"convmixer_timm: compiled CPU kernels unavailable ({error}); using PyTorch's own ops instead "
                "(same results, slower). Install a C++ compiler (g++) to enable them, or set "
                "CONVMIXER_TIMM_KERNELS=0 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
        _tried = True
        return _library


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def kernels_apply(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether a kernel-backed autograd function applies: a CPU autograd step in float32/64, kernels built.

    Elsewhere (no grad, autocast, other dtypes or devices, ``torch.compile``, kernels off) callers use PyTorch's
    own ops, which compute the same values.
    """
    tensors = [x, *(p for p in params if p is not None)]
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and all(t.dtype == x.dtype and t.device == x.device for t in tensors)
        and not _autocast_on()
        and not torch.compiler.is_compiling()
        and load() is not None
    )

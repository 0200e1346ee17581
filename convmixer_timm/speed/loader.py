"""Loading the compiled CPU kernels safely, and choosing their instruction set at run time.

The library is built when the package is built or installed (``build.py``) and lives beside this file. Before
``dlopen`` runs any of its code, the loader checks that:

* the library, its manifest and every folder above them belong to this user or root and are not writable by
  anyone else (a sticky folder such as ``/tmp`` above them is fine): nothing another user could have planted runs;
* the library's size and SHA-256 match the manifest, and the manifest was made from the sources beside it: a
  truncated, empty, stale or foreign file is never mapped (a truncated ELF file crashes the process with SIGBUS
  inside ``dlopen``);
* after loading, the ABI version and every entry point are there.

Any failure gives one ``RuntimeWarning`` naming the cause and the fix, and PyTorch's own ops are used instead
(same results, slower). ``CONVMIXER_TIMM_KERNELS=0`` turns the kernels off silently;
``CONVMIXER_TIMM_CPU_ISA=avx2`` (or ``avx512``, ``baseline``) forces a copy, as long as this CPU can run it.
There is no run-time build and no cache folder: there is nothing to compile, race for or clean up at run time.
"""
from __future__ import annotations

import ctypes
import json
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from .build import ABI_VERSION, HERE, LIBRARY_NAME, MANIFEST_NAME, file_digest, sources_digest

__all__ = ["ISAS", "KernelLibrary", "KernelLoadError", "enabled", "kernel_info", "load", "load_from"]

ISAS = ("avx512", "avx2", "baseline")
_POINTER, _INT64, _INT, _DOUBLE = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
_SIGNATURES = {
    **{f"depthwise_weight_grad_{t}": [_POINTER] * 3 + [_INT64] * 4 + [_INT] * 3 for t in ("f32", "f64")},
    **{f"batch_norm_forward_{t}": [_POINTER] * 7 + [_INT64, _INT64, _DOUBLE, _INT] for t in ("f32", "f64")},
    **{f"batch_norm_backward_{t}": [_POINTER] * 8 + [_INT64, _INT64, _INT] for t in ("f32", "f64")},
    "spatial_mixing_f32": [_INT] + [_POINTER] * 7 + [_INT64] * 4 + [_INT] * 3,
}


class KernelLoadError(RuntimeError):
    """The kernel library was not loaded; the message names the cause and the fix."""


@dataclass(frozen=True)
class KernelLibrary:
    """The kernels of one instruction set, as ctypes functions named like their C entry points."""

    path: Path
    isa: str
    functions: dict

    def __getattr__(self, name: str):
        try:
            return self.functions[name]
        except KeyError:
            raise AttributeError(name) from None


_lock = threading.Lock()
_library: KernelLibrary | None = None
_failure: str | None = None
_tried = False


def enabled() -> bool:
    return os.environ.get("CONVMIXER_TIMM_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _check_owner_and_mode(path: Path, final: bool) -> None:
    info = os.stat(path)
    me = os.getuid()
    if info.st_uid not in (me, 0):
        raise KernelLoadError(f"{path} belongs to user id {info.st_uid}, not to you ({me}) or root")
    others_write = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    sticky_folder = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX and not final
    if others_write and not sticky_folder:
        raise KernelLoadError(f"{path} is writable by other users (mode {stat.filemode(info.st_mode)})")


def _check_trusted(path: Path) -> None:
    """Owner and permissions of ``path``, its folder and every folder above it (symbolic links resolved)."""
    if not hasattr(os, "getuid"):
        return  # Windows: no POSIX owners; the kernels are not built there
    real = Path(os.path.realpath(path))
    _check_owner_and_mode(real, final=True)
    for i, folder in enumerate(real.parents):
        _check_owner_and_mode(folder, final=i == 0)


def _verify(library: Path, manifest_path: Path, sources: Path) -> None:
    for path in (library, manifest_path):
        if not path.is_file():
            raise KernelLoadError(f"{path} is missing")
        _check_trusted(path)
    try:
        manifest = json.loads(manifest_path.read_text())
        expected_library, expected_sources = manifest["library_sha256"], manifest["sources_sha256"]
        abi = manifest["abi"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise KernelLoadError(f"{manifest_path} is damaged ({error})") from error
    if abi != ABI_VERSION:
        raise KernelLoadError(f"{library} has kernel ABI {abi}, this package needs {ABI_VERSION}")
    if file_digest(library) != expected_library:
        raise KernelLoadError(f"{library} is damaged (its SHA-256 differs from the one recorded at build time)")
    if (sources / "convmixer_kernels.cpp").exists() and sources_digest(sources) != expected_sources:
        raise KernelLoadError(f"{library} was built from other sources than the ones beside it (stale build)")


def _pick_isa(cdll: ctypes.CDLL) -> str:
    supports = cdll.cmx_cpu_supports
    supports.argtypes, supports.restype = [ctypes.c_char_p], ctypes.c_int
    compiled = cdll.cmx_compiled_isas
    compiled.restype = ctypes.c_char_p
    available = [isa for isa in compiled().decode().split(",") if supports(isa.encode())]
    forced = os.environ.get("CONVMIXER_TIMM_CPU_ISA", "").strip().lower()
    if forced and forced != "auto":
        if forced in available:
            return forced
        warnings.warn(f"convmixer_timm: CONVMIXER_TIMM_CPU_ISA={forced} is not available on this CPU (it can run "
                      f"{', '.join(available)}); using {available[0]}", RuntimeWarning, stacklevel=4)
    return available[0]


def load_from(library: Path, manifest: Path | None = None, sources: Path = HERE) -> KernelLibrary:
    """Verify, load and bind one library file; raises :class:`KernelLoadError` without loading anything unsafe."""
    library = Path(library)
    manifest = manifest or library.with_name(MANIFEST_NAME)
    _verify(library, manifest, sources)
    try:
        cdll = ctypes.CDLL(str(library))
    except OSError as error:
        raise KernelLoadError(f"{library} could not be loaded ({error})") from error
    try:
        version = cdll.cmx_abi_version
        version.restype = ctypes.c_int
        if version() != ABI_VERSION:
            raise KernelLoadError(f"{library} reports kernel ABI {version()}, this package needs {ABI_VERSION}")
        isa = _pick_isa(cdll)
        functions = {}
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(cdll, f"{name}__{isa}")
            fn.restype, fn.argtypes = None, argtypes
            functions[name] = fn
    except AttributeError as error:
        raise KernelLoadError(f"{library} lacks the entry point {error.args[0] if error.args else '?'}") from error
    return KernelLibrary(path=library, isa=isa, functions=functions)


def load() -> KernelLibrary | None:
    """The kernels for this CPU, loaded on first call; None (after one warning) where they cannot be used."""
    global _library, _failure, _tried
    if not enabled():
        return None
    if _tried:
        return _library
    with _lock:
        if not _tried:
            try:
                _library = load_from(HERE / LIBRARY_NAME)
            except KernelLoadError as error:
                _failure = str(error)
                warnings.warn(
                    f"convmixer_timm: compiled CPU kernels not used: {error}. PyTorch's own ops run instead (same "
                    "results, slower). To build them, reinstall with a C++ compiler (g++) present: `pip install "
                    "--force-reinstall --no-deps convmixer-timm` (or `python -m convmixer_timm.speed.build` in a "
                    "source checkout); CONVMIXER_TIMM_KERNELS=0 silences this.",
                    RuntimeWarning, stacklevel=3)
            _tried = True
    return _library


def kernel_info() -> dict:
    """What the speed layer uses here: whether the kernels are loaded, from where, which ISA, or why not."""
    library = load()
    return dict(enabled=enabled(), loaded=library is not None, isa=library.isa if library else None,
                path=str(library.path) if library else None, reason=_failure)

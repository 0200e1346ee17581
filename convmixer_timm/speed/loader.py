"""Loading the compiled CPU kernels, checked for damage, and choosing their instruction set at run time.

The library is built when the package is built or installed (``build.py``) and lives beside this file. It is trusted
as this file is: by where it is installed. Python imports the package's own modules from that folder without asking
who owns it or who may write it, so whoever can replace the library there can replace ``loader.py`` as well; checks
of owners and modes would guard nothing Python does not already trust, and would refuse ordinary installs (shared
group-writable environments, images run under a random user id, read-only installs owned by someone else).

What is checked is that the library is whole and is the one built from the sources beside it, because a damaged
library does not fail cleanly (a truncated ELF file crashes the process with SIGBUS inside ``dlopen``):

* the manifest, both sources and the library are each opened once, without waiting on a FIFO, and must be regular
  files (checked through the open descriptor);
* the library's SHA-256, over the bytes read from that descriptor, matches the manifest, and the manifest was made
  from the sources beside it: a truncated, empty, stale or foreign file is never mapped;
* the library is then loaded through that same descriptor (``/proc/self/fd/N``), so the file mapped, and whose
  constructors run, is the file whose bytes were hashed, even if a reinstall or rebuild replaces the path meanwhile;
* after loading, the ABI version and every entry point are there.

Symbolic links are followed as Python follows them to the modules it imports: a virtual environment or prefix
reached through a linked folder (Nix profiles, a linked ``site-packages``) and Spack views that link single files
both work. Each path is resolved once (``os.path.realpath``) and the file it resolves to is opened with
``O_NOFOLLOW``, so a link put there between the two steps is refused rather than followed; what the descriptor holds
is vouched for by the hash alone, never by its path. The manifest is looked for beside the library path given, and
the sources in the package's own (resolved) folder.

Any failure gives one ``RuntimeWarning`` per process naming the cause and the fix, and PyTorch's own ops are used
instead (same results, slower). ``CONVMIXER_TIMM_KERNELS=0`` turns the kernels off silently;
``CONVMIXER_TIMM_CPU_ISA=avx2`` (or ``avx512_bf16``, ``avx512``, ``baseline``) forces a copy, as long as this CPU
can run it.
There is no run-time build and no cache folder: there is nothing to compile, race for or clean up at run time.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import json
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from .build import ABI_VERSION, HERE, LIBRARY_NAME, MANIFEST_NAME, SOURCES, digest_of_sources

__all__ = ["ISAS", "KernelLibrary", "KernelLoadError", "enabled", "kernel_info", "load", "load_from"]

ISAS = ("avx512_bf16", "avx512", "avx2", "baseline")
_POINTER, _INT64, _INT, _DOUBLE = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
_SIGNATURES = {
    **{f"depthwise_weight_grad_{t}": [_POINTER] * 3 + [_INT64] * 4 + [_INT] * 3 for t in ("f32", "f64")},
    **{f"batch_norm_forward_{t}": [_POINTER] * 7 + [_INT64, _INT64, _DOUBLE, _INT] for t in ("f32", "f64")},
    **{f"batch_norm_backward_{t}": [_POINTER] * 8 + [_INT64, _INT64, _INT] for t in ("f32", "f64")},
    "spatial_mixing_f32": [_INT] + [_POINTER] * 7 + [_INT64] * 4 + [_INT] * 3,
    "depthwise_conv_f32": [_POINTER] * 4 + [_INT64] * 4 + [_INT] * 3,
    "spatial_mixing_bf16": [_INT, _INT] + [_POINTER] * 7 + [_INT64] * 4 + [_INT] * 3,
    **{f"act_batch_norm_forward_{t}": [_INT] + [_POINTER] * 7 + [_INT64, _INT64, _DOUBLE, _INT]
       for t in ("f32", "f64")},
    **{f"act_batch_norm_backward_{t}": [_INT] + [_POINTER] * 8 + [_INT64, _INT64, _INT] for t in ("f32", "f64")},
}
# O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; its type is refused before any read.
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
_MAX_MANIFEST_BYTES = 1 << 16
_FD_FOLDER = Path("/proc/self/fd")
# dlopen returns an already-loaded library whose name matches, without opening anything: a name reused for another
# descriptor would give back the earlier library. Each load gets a name never used before (one more leading slash;
# a process loads a library a handful of times, so the names stay far below PATH_MAX).
_load_count = itertools.count(1)


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


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return kind
    return "not a regular file"


def _open_regular(path: Path) -> int:
    """A descriptor of the regular file ``path`` names, its links resolved once; the caller closes it.

    Everything after this reads, hashes and maps the descriptor, never the path. Raises :class:`KernelLoadError`.
    """
    real = Path(os.path.realpath(path))
    named = str(path) if real == Path(os.path.abspath(path)) else f"{path} (resolved to {real})"
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except FileNotFoundError:
        raise KernelLoadError(f"{named} is missing") from None
    except PermissionError:
        raise KernelLoadError(f"{named} cannot be read by you (permission denied: {_mode_text(real)})") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise KernelLoadError(f"{named} is still a symbolic link once resolved (a loop of links, or a link put "
                                  "there meanwhile)") from None
        raise KernelLoadError(f"{named} cannot be opened ({error.strerror or error})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KernelLoadError(f"{named} is {_kind(info.st_mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mode_text(path: Path) -> str:
    try:
        return f"mode {stat.filemode(os.lstat(path).st_mode)}"
    except OSError:
        return "a folder above it cannot be searched"


def _read_checked(fd: int, path: Path, limit: int | None = None) -> bytes:
    """All of the open file, which must not change size while it is read (a writer at work)."""
    before = os.fstat(fd)
    if limit is not None and before.st_size > limit:
        raise KernelLoadError(f"{path} is damaged ({before.st_size} bytes, more than any manifest)")
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    data = b"".join(chunks)
    after = os.fstat(fd)
    if len(data) != before.st_size or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise KernelLoadError(f"{path} changed while it was being checked; load again once nothing writes to it")
    return data


def _read_file(path: Path, limit: int | None = None) -> bytes:
    fd = _open_regular(path)
    try:
        return _read_checked(fd, path, limit)
    finally:
        os.close(fd)


def _check_manifest_and_sources(library: Path, manifest_path: Path, sources: Path) -> str:
    """The library's SHA-256 recorded by the manifest, after checking it was made from the sources beside it."""
    try:
        manifest = json.loads(_read_file(manifest_path, _MAX_MANIFEST_BYTES))
        expected_library, expected_sources = manifest["library_sha256"], manifest["sources_sha256"]
        abi = manifest["abi"]
    except (ValueError, KeyError, TypeError) as error:
        raise KernelLoadError(f"{manifest_path} is damaged ({error})") from error
    if abi != ABI_VERSION:
        raise KernelLoadError(f"{library} has kernel ABI {abi}, this package needs {ABI_VERSION}")
    if digest_of_sources({name: _read_file(sources / name) for name in SOURCES}) != expected_sources:
        raise KernelLoadError(f"{library} was built from other sources than the ones beside it (stale build)")
    return expected_library


def _map(fd: int, library: Path) -> ctypes.CDLL:
    """``dlopen`` the open file itself: the dynamic loader opens ``/proc/self/fd/N``, the inode that was checked."""
    if not _FD_FOLDER.is_dir():
        raise KernelLoadError(f"{library} cannot be loaded by descriptor here ({_FD_FOLDER} is absent); mount /proc")
    name = "/" * next(_load_count) + str(_FD_FOLDER / str(fd)).lstrip("/")
    try:
        return ctypes.CDLL(name)
    except OSError as error:
        raise KernelLoadError(f"{library} could not be loaded ({error})") from error


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


def _bind(cdll: ctypes.CDLL, library: Path) -> KernelLibrary:
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


def load_from(library: Path, manifest: Path | None = None, sources: Path = HERE) -> KernelLibrary:
    """Verify, load and bind one library file; raises :class:`KernelLoadError` without loading anything unsafe."""
    library = Path(library)
    manifest = Path(manifest) if manifest is not None else library.with_name(MANIFEST_NAME)
    try:
        expected_library = _check_manifest_and_sources(library, manifest, Path(sources))
        fd = _open_regular(library)
        try:
            if hashlib.sha256(_read_checked(fd, library)).hexdigest() != expected_library:
                raise KernelLoadError(f"{library} is damaged (its SHA-256 differs from the one recorded at build time)")
            cdll = _map(fd, library)
        finally:
            os.close(fd)  # the mapping holds the file from here on
    except OSError as error:  # a file or folder that vanished or changed type between two steps
        raise KernelLoadError(f"{library} could not be checked ({error})") from error
    return _bind(cdll, library)


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
            except Exception as error:  # whatever the cause, PyTorch's ops are the safe answer
                _failure = str(error) if isinstance(error, KernelLoadError) else f"{type(error).__name__}: {error}"
                warnings.warn(
                    f"convmixer_timm: compiled CPU kernels not used: {_failure}. PyTorch's own ops run instead (same "
                    "results, slower). To build them, reinstall with a C++ compiler (g++) present: `pip install "
                    "--force-reinstall --no-deps convmixer-timm` (or `python -m convmixer_timm.speed.build` in a "
                    "source checkout); CONVMIXER_TIMM_KERNELS=0 silences this.",
                    RuntimeWarning, stacklevel=3)
            finally:
                _tried = True
    return _library


def kernel_info() -> dict:
    """What the speed layer uses here: whether the kernels are loaded, from where, which ISA, or why not."""
    library = load()
    reason = _failure if enabled() else "turned off by CONVMIXER_TIMM_KERNELS"
    return dict(enabled=enabled(), loaded=library is not None, isa=library.isa if library else None,
                path=str(library.path) if library else None, reason=reason)

"""Compiling the CPU kernels into one shared library, at package build time (see ``hatch_build.py``).

Pure Python with no torch import, so the wheel build hook can run it. The library holds one copy of the kernels
per instruction set (``convmixer_kernels.cpp``) and is built without ``-march=native``: the same binary runs on
every CPU of its architecture and picks its copy at run time. Beside it goes a manifest (``_convmixer_kernels.json``)
with the library's SHA-256 and the SHA-256 of the sources it was built from, so the loader can tell a damaged,
stale or foreign file from the one built here and fall back to PyTorch's ops instead of loading it.

    python -m convmixer_timm.speed.build    # rebuild in place (a source checkout, after editing the C++)

A build killed midway leaves nothing running and nothing outside its staging folder: the compiler runs with
``-pipe`` and ``TMPDIR`` inside that folder, in a process group of its own that a small watchdog kills as soon as
the build process is gone (``PR_SET_PDEATHSIG`` alone would reach only the ``g++`` driver, not ``cc1plus``); the
next build removes the staging folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "LIBRARY_NAME", "MANIFEST_NAME", "SOURCES", "KernelBuildError", "build_kernels", "digest_of_sources",
    "file_digest", "find_compiler", "is_current", "read_regular_file", "remove_stale_builds", "sources_digest",
]

HERE = Path(__file__).resolve().parent
LIBRARY_NAME = "_convmixer_kernels.so"
MANIFEST_NAME = "_convmixer_kernels.json"
SOURCES = ("convmixer_kernels.cpp", "kernels_body.inc")
ABI_VERSION = 5  # cmx_abi_version() in convmixer_kernels.cpp
# -pipe: no assembler file in TMPDIR for a killed build to leave behind.
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fvisibility=hidden", "-pipe"]


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled; the message names the cause."""


def read_regular_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of ``path``, opened without following a symbolic link or waiting on a FIFO; OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                 | getattr(os, "O_BINARY", 0))
    with open(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return file.read()


def digest_of_sources(contents: Mapping[str, bytes]) -> str:
    """The SHA-256 recorded in the manifest for the sources, given each one's bytes by name."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + contents[name] + b"\0")
    return digest.hexdigest()


def sources_digest(folder: Path = HERE) -> str:
    return digest_of_sources({name: read_regular_file(Path(folder) / name) for name in SOURCES})


def file_digest(path: Path) -> str:
    return hashlib.sha256(read_regular_file(path)).hexdigest()


def find_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


_PARTIAL_PREFIX = ".building-"


def _die_with_parent() -> None:
    # A build killed with SIGKILL cannot clean up; its compiler must not outlive it and keep writing.
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# Run beside the compiler: when the build process is gone (its end of the pipe closes without "done"), the
# compiler's whole process group dies, cc1plus and as included. Deaf to the signals that ended the build.
_WATCHDOG = """
import os, signal, sys
for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(number, signal.SIG_IGN)
if sys.stdin.buffer.read() != b"done":
    try:
        os.killpg(int(sys.argv[1]), signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _run_compiler(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the compiler; return its exit status and error output. Nothing it started outlives this process."""
    if not sys.platform.startswith("linux"):
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        return result.returncode, result.stderr
    compiler = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)
    watchdog = None
    try:
        watchdog = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG, str(compiler.pid)],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, stderr = compiler.communicate()
    except BaseException:  # interrupted (Ctrl-C, SIGTERM turned into an exception): the group goes with us
        _kill_group(compiler.pid)  # before the leader is reaped, so the group id cannot be anyone else's
        compiler.wait()
        raise
    finally:
        if watchdog is not None:
            try:
                watchdog.communicate(b"done")
            except OSError:
                pass
    return compiler.returncode, stderr


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_builds(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the staging folders of builds in ``out_dir`` whose process is gone (killed); return what was removed."""
    removed = []
    for path in Path(out_dir).glob(f"{_PARTIAL_PREFIX}*"):
        pid = path.name[len(_PARTIAL_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def is_current(out_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether ``out_dir`` already holds an intact library built from these sources (an editable reinstall)."""
    out = Path(out_dir) if out_dir is not None else HERE
    try:
        record = json.loads((out / MANIFEST_NAME).read_text())
        return (record.get("abi") == ABI_VERSION and record.get("sources_sha256") == sources_digest()
                and record.get("library_sha256") == file_digest(out / LIBRARY_NAME))
    except (OSError, ValueError, AttributeError):
        return False


def build_kernels(out_dir: str | os.PathLike[str] | None = None, compiler: str | None = None) -> Path:
    """Compile the library and its manifest into ``out_dir`` (default: beside this file); return the library path.

    Everything is written in a staging folder inside ``out_dir`` (the compiler's temporary files too) and renamed
    into place, the manifest last, so a killed build leaves either the previous pair or nothing the loader would
    accept, and nothing outside ``out_dir``.
    """
    out = Path(out_dir) if out_dir is not None else HERE
    compiler = compiler or find_compiler()
    if compiler is None:
        raise KernelBuildError("no C++ compiler found (looked for $CXX, g++, c++, clang++)")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(out)
    library, manifest = out / LIBRARY_NAME, out / MANIFEST_NAME
    staging = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL_PREFIX}{os.getpid()}-", dir=out))
    try:
        scratch = staging / "tmp"
        scratch.mkdir()
        staged_library, staged_manifest = staging / LIBRARY_NAME, staging / MANIFEST_NAME
        command = [compiler, *_FLAGS, str(HERE / SOURCES[0]), "-o", str(staged_library)]
        try:
            sources_sha256 = sources_digest()  # what the compiler is about to read
        except OSError as error:
            raise KernelBuildError(f"the kernel sources in {HERE} cannot be read: {error}") from error
        try:
            status, stderr = _run_compiler(command, env={**os.environ, "TMPDIR": str(scratch)})
        except OSError as error:
            raise KernelBuildError(f"{compiler} could not run: {error}") from error
        if status != 0:
            raise KernelBuildError(f"{' '.join(command)} failed:\n{stderr.strip()[-3000:]}")
        os.chmod(staged_library, 0o755)
        record = dict(abi=ABI_VERSION, library_sha256=file_digest(staged_library), sources_sha256=sources_sha256,
                      machine=platform.machine().lower(), compiler=Path(compiler).name)
        staged_manifest.write_text(json.dumps(record, indent=1) + "\n")
        os.chmod(staged_manifest, 0o644)
        if manifest.exists() or manifest.is_symlink():
            manifest.unlink()  # the old manifest must not vouch for a half-replaced library
        os.replace(staged_library, library)
        os.replace(staged_manifest, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return library


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        path = build_kernels(args[0] if args else None)
    except KernelBuildError as error:
        print(f"convmixer_timm kernels: {error}", file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

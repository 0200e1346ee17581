"""Compiling the CPU kernels into one shared library, at package build time (see ``hatch_build.py``).

Pure Python with no torch import, so the wheel build hook can run it. The library holds one copy of the kernels
per instruction set (``convmixer_kernels.cpp``) and is built without ``-march=native``: the same binary runs on
every CPU of its architecture and picks its copy at run time. Beside it goes a manifest (``_convmixer_kernels.json``)
with the library's SHA-256 and the SHA-256 of the sources it was built from, so the loader can tell a damaged,
stale or foreign file from the one built here and fall back to PyTorch's ops instead of loading it.

    python -m convmixer_timm.speed.build    # rebuild in place (a source checkout, after editing the C++)
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = [
    "LIBRARY_NAME", "MANIFEST_NAME", "KernelBuildError", "build_kernels", "find_compiler", "is_current",
    "remove_stale_builds", "sources_digest",
]

HERE = Path(__file__).resolve().parent
LIBRARY_NAME = "_convmixer_kernels.so"
MANIFEST_NAME = "_convmixer_kernels.json"
SOURCES = ("convmixer_kernels.cpp", "kernels_body.inc")
ABI_VERSION = 2  # cmx_abi_version() in convmixer_kernels.cpp
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fvisibility=hidden"]


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled; the message names the cause."""


def sources_digest(folder: Path = HERE) -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


_PARTIAL_PREFIX = ".building-"


def _die_with_parent() -> None:
    # A build killed with SIGKILL cannot clean up; its compiler must not outlive it and keep writing.
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_builds(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the partial files of builds in ``out_dir`` whose process is gone (killed); return what was removed."""
    removed = []
    for path in Path(out_dir).glob(f"{_PARTIAL_PREFIX}*"):
        pid = path.name[len(_PARTIAL_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
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

    Both files are written under temporary names and renamed into place, the manifest last, so a killed build
    leaves either the previous pair or nothing the loader would accept.
    """
    out = Path(out_dir) if out_dir is not None else HERE
    compiler = compiler or find_compiler()
    if compiler is None:
        raise KernelBuildError("no C++ compiler found (looked for $CXX, g++, c++, clang++)")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(out)
    library, manifest = out / LIBRARY_NAME, out / MANIFEST_NAME
    fd, tmp_library = tempfile.mkstemp(prefix=f"{_PARTIAL_PREFIX}{os.getpid()}-", suffix=".so", dir=out)
    os.close(fd)
    tmp_manifest = tmp_library + ".json"
    try:
        command = [compiler, *_FLAGS, str(HERE / SOURCES[0]), "-o", tmp_library]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False,
                                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        except OSError as error:
            raise KernelBuildError(f"{compiler} could not run: {error}") from error
        if result.returncode != 0:
            raise KernelBuildError(f"{' '.join(command)} failed:\n{result.stderr.strip()[-3000:]}")
        os.chmod(tmp_library, 0o755)
        record = dict(abi=ABI_VERSION, library_sha256=file_digest(Path(tmp_library)), sources_sha256=sources_digest(),
                      machine=platform.machine().lower(), compiler=Path(compiler).name)
        Path(tmp_manifest).write_text(json.dumps(record, indent=1) + "\n")
        os.chmod(tmp_manifest, 0o644)
        if manifest.exists():
            manifest.unlink()  # the old manifest must not vouch for a half-replaced library
        os.replace(tmp_library, library)
        os.replace(tmp_manifest, manifest)
    finally:
        for leftover in (tmp_library, tmp_manifest):
            if os.path.exists(leftover):
                os.unlink(leftover)
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

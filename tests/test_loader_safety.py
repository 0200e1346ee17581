"""The kernel loader on real file systems: every ordinary install loads, the file checked is the file mapped, and
every damaged or unreadable file is one warning and PyTorch's ops.

Everything here is real: libraries compiled and swapped on disk, modes set with chmod, FIFOs made with mkfifo,
symbolic links, files given to another user with chown, and processes run without root's permission override.
Each case is a plain ``load_from`` call where that proves it; a subprocess only where the process is the point (one
warning per process, the model training on PyTorch's ops, a mode-000 file, a read-only install of another user).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from convmixer_timm import speed
from convmixer_timm.speed import build, loader

ROOT = Path(__file__).resolve().parents[1]
SPEED = ROOT / "convmixer_timm" / "speed"
LIBRARY, MANIFEST = SPEED / build.LIBRARY_NAME, SPEED / build.MANIFEST_NAME
OTHER_USER = 65534  # nobody

needs_kernels = pytest.mark.skipif(speed.load() is None, reason="kernels not built here (no C++ compiler)")
needs_compiler = pytest.mark.skipif(build.find_compiler() is None, reason="no C++ compiler")
needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="chown, and a process without root's permission override, need root")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/fd and /proc/self/maps")


def _private_copy(folder: Path) -> Path:
    folder.mkdir(mode=0o700)
    shutil.copy(LIBRARY, folder / build.LIBRARY_NAME)
    shutil.copy(MANIFEST, folder / build.MANIFEST_NAME)
    return folder / build.LIBRARY_NAME


def _foreign_library(folder: Path, marker: Path, forge_manifest: bool = False) -> Path:
    """A real library whose constructor leaves ``marker``: proof that its code ran in this process."""
    folder.mkdir(mode=0o700)
    source = folder / "foreign.cpp"
    source.write_text(textwrap.dedent("""
        #include <cstdio>
        #include <cstring>
        __attribute__((constructor)) static void announce() {
            if (std::FILE* f = std::fopen("MARKER", "w")) std::fclose(f);
        }
        extern "C" int cmx_abi_version() { return ABI; }
        extern "C" const char* cmx_compiled_isas() { return "baseline"; }
        extern "C" int cmx_cpu_supports(const char* isa) { return std::strcmp(isa, "baseline") == 0; }
    """).replace("MARKER", str(marker)).replace("ABI", str(build.ABI_VERSION)))
    library = folder / build.LIBRARY_NAME
    subprocess.run([build.find_compiler(), "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    if forge_manifest:  # what someone who can write the file and its manifest would leave
        (folder / build.MANIFEST_NAME).write_text(json.dumps(dict(
            abi=build.ABI_VERSION, library_sha256=build.file_digest(library), sources_sha256=build.sources_digest())))
    return library


def _load_error(path: Path) -> str:
    with pytest.raises(loader.KernelLoadError) as caught:
        loader.load_from(path)
    return str(caught.value)


def _record_dlopen_names(monkeypatch: pytest.MonkeyPatch, before_loading: Callable[[], object] = lambda: None
                         ) -> list[str]:
    """The names the loader hands to dlopen (through ctypes), with ``before_loading`` run just before each."""
    names: list[str] = []
    real_cdll = ctypes.CDLL

    def cdll(name: str, *args: object, **kwargs: object) -> ctypes.CDLL:
        names.append(name)
        before_loading()
        return real_cdll(name, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    return names


def _mapped_inodes(path: Path) -> set[int]:
    fields = [line.split() for line in Path("/proc/self/maps").read_text().splitlines() if str(path) in line]
    return {int(row[4]) for row in fields}


# ------------------------------------------------------------------------------------------------ checked = mapped


@needs_kernels
@needs_compiler
@linux_only
def test_a_library_swapped_in_after_the_check_is_never_mapped(tmp_path, monkeypatch):
    # A reinstall or rebuild replacing the library between the loader's checks and dlopen: the loader maps the
    # descriptor it hashed, so the new file's constructor never runs and the checked inode is what is mapped.
    path = _private_copy(tmp_path / "private")
    checked_inode = path.stat().st_ino
    marker = tmp_path / "foreign-constructor-ran"
    foreign = _foreign_library(tmp_path / "foreign", marker)
    names = _record_dlopen_names(monkeypatch, before_loading=lambda: os.replace(foreign, path))
    library = loader.load_from(path)
    monkeypatch.undo()
    assert len(names) == 1 and re.fullmatch(r"/+proc/self/fd/\d+", names[0])
    assert path.stat().st_ino != checked_inode  # the swap did happen
    assert not marker.exists()
    assert library.isa in loader.ISAS and callable(library.spatial_mixing_f32)
    assert _mapped_inodes(path) == {checked_inode}  # shown as "(deleted)": the file replaced on disk


@needs_kernels
@needs_compiler
@linux_only
def test_libraries_loaded_one_after_another_through_the_same_descriptor_number_are_each_mapped(tmp_path,
                                                                                              monkeypatch):
    # dlopen hands back an already-loaded library whose name matches without opening anything: a second load
    # through /proc/self/fd/N of another file must not be given the first one.
    marker = tmp_path / "foreign-constructor-ran"
    foreign = _foreign_library(tmp_path / "foreign", marker, forge_manifest=True)
    names = _record_dlopen_names(monkeypatch)
    loader.load_from(_private_copy(tmp_path / "private"))
    assert "lacks the entry point" in _load_error(foreign)
    assert marker.exists()  # the second file was really mapped (its manifest vouched for it: a forged one)
    first, second = names
    assert first.rsplit("/", 1)[1] == second.rsplit("/", 1)[1]  # the same (lowest free) descriptor number...
    assert first != second  # ...under a name dlopen has never seen


# ------------------------------------------------------------------------------------------------ installs that load


def _installed_copy(folder: Path) -> Path:
    """The kernel files of an install (library, manifest, sources) copied into ``folder``, made here."""
    folder.mkdir(parents=True)
    for name in (build.LIBRARY_NAME, build.MANIFEST_NAME, *build.SOURCES):
        shutil.copy(SPEED / name, folder / name)
    return folder


def _load(folder: Path) -> loader.KernelLibrary:
    return loader.load_from(folder / build.LIBRARY_NAME, sources=folder)


def _set_modes(folder: Path, files: int, folders: int) -> None:
    for path in folder.iterdir():
        path.chmod(files)
    folder.chmod(folders)


INSTALLS: dict[str, Callable[[Path], object]] = {
    # shared conda and HPC environments, images run under a random user id in group 0 (OpenShift)
    "group-writable": lambda folder: _set_modes(folder, 0o664, 0o2775),
    "world-writable": lambda folder: _set_modes(folder, 0o666, 0o777),
    "read-only": lambda folder: _set_modes(folder, 0o444, 0o555),
    "another user's": lambda folder: [os.chown(path, OTHER_USER, OTHER_USER) for path in (folder, *folder.iterdir())],
}


@needs_kernels
@pytest.mark.parametrize("install", list(INSTALLS))
def test_an_ordinary_install_loads_whoever_owns_it_and_whoever_may_write_it(tmp_path, install):
    if install == "another user's" and os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    folder = _installed_copy(tmp_path / "site-packages" / "convmixer_timm" / "speed")
    INSTALLS[install](folder)
    library = _load(folder)
    assert library.isa in loader.ISAS and callable(library.spatial_mixing_f32)


@needs_kernels
@pytest.mark.parametrize("relative", [False, True])
def test_an_install_reached_through_a_linked_folder_loads(tmp_path, relative):
    # Nix: real files under the store, reached through profile folders that are links; a venv whose site-packages
    # is a link. The path given is never resolved by hand: the loader follows the links as Python does.
    store = _installed_copy(tmp_path / "store" / "abc-convmixer" / "site-packages" / "convmixer_timm" / "speed")
    (tmp_path / "profile").symlink_to(Path("store/abc-convmixer") if relative else store.parents[2])
    assert _load(tmp_path / "profile" / "site-packages" / "convmixer_timm" / "speed").isa in loader.ISAS


@needs_kernels
@pytest.mark.parametrize("linked", ["the library", "every file"])
def test_kernel_files_linked_one_by_one_into_another_folder_load(tmp_path, linked):
    # A Spack view links single files of the installed prefix into the view's folders.
    prefix = _installed_copy(tmp_path / "prefix")
    view = tmp_path / "view"
    view.mkdir()
    for name in (build.LIBRARY_NAME, build.MANIFEST_NAME, *build.SOURCES):
        if linked == "every file" or name == build.LIBRARY_NAME:
            (view / name).symlink_to(prefix / name)
        else:
            shutil.copy(prefix / name, view / name)
    assert _load(view).isa in loader.ISAS


# ------------------------------------------------------------------------------------------------ damaged files


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _cut(path: Path, keep: Callable[[bytes], bytes]) -> None:
    path.write_bytes(keep(path.read_bytes()))


def _dangling_link(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.with_name("nowhere"))


def _link_loop(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.with_name("loop"))
    path.with_name("loop").symlink_to(path)


SO, JSON, CPP, INC = build.LIBRARY_NAME, build.MANIFEST_NAME, *build.SOURCES
DAMAGE: dict[str, tuple[Callable[[Path], object], str]] = {  # what is done to the copy, what the refusal says
    "library truncated": (lambda f: _cut(f / SO, lambda b: b[: len(b) // 2]), "is damaged"),
    "library empty": (lambda f: _cut(f / SO, lambda b: b""), "is damaged"),
    "library one byte changed": (lambda f: _cut(f / SO, lambda b: b[:-1] + bytes([b[-1] ^ 1])), "is damaged"),
    "sources edited after the build": (lambda f: _cut(f / INC, lambda b: b + b"\n// edited\n"), "stale build"),
    "manifest cut short": (lambda f: _cut(f / JSON, lambda b: b[: len(b) // 2]), f"{JSON} is damaged"),
    "manifest oversized": (lambda f: _cut(f / JSON, lambda b: b + b" " * (1 << 17)), "more than any manifest"),
    "manifest of another ABI": (lambda f: (f / JSON).write_text(json.dumps(dict(
        json.loads((f / JSON).read_text()), abi=build.ABI_VERSION + 1))), f"ABI {build.ABI_VERSION + 1}"),
    "library missing": (lambda f: (f / SO).unlink(), f"{SO} is missing"),
    "manifest missing": (lambda f: (f / JSON).unlink(), f"{JSON} is missing"),
    "kernels_body.inc missing": (lambda f: (f / INC).unlink(), f"{INC} is missing"),
    "library a dangling link": (lambda f: _dangling_link(f / SO), "is missing"),
    "library a loop of links": (lambda f: _link_loop(f / SO), "still a symbolic link"),
    "library a folder": (lambda f: _folder(f / SO), "is a folder"),
    "library a FIFO": (lambda f: _fifo(f / SO), "is a FIFO"),
    "manifest a FIFO": (lambda f: _fifo(f / JSON), "is a FIFO"),
    "convmixer_kernels.cpp a FIFO": (lambda f: _fifo(f / CPP), "is a FIFO"),
}


def _refusal_without_hanging(folder: Path) -> str:
    # The join timeout is a hang guard (opening a FIFO for reading waits for a writer), not a measurement.
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            _load(folder)
            outcome.append(None)
        except BaseException as error:  # handed to the test's thread, which judges it
            outcome.append(error)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(120)
    if thread.is_alive():
        for path in folder.iterdir():  # release an open waiting for a writer, so the thread ends
            if path.is_fifo():
                with contextlib.suppress(OSError):
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_from waited on a FIFO")
    assert outcome and isinstance(outcome[0], loader.KernelLoadError), outcome
    return str(outcome[0])


@needs_kernels
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_file_is_refused_before_anything_is_mapped(tmp_path, monkeypatch, damage):
    spoil, expected = DAMAGE[damage]
    folder = _installed_copy(tmp_path / "speed")
    spoil(folder)
    names = _record_dlopen_names(monkeypatch)
    message = _refusal_without_hanging(folder)
    assert expected in message, message
    assert names == []  # refused before dlopen: a truncated ELF file would SIGBUS in it


# ------------------------------------------------------------------------------------------------ one warning

TRAIN_AND_INFER = """
import json, warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from convmixer_timm import ConvMixer, speed
    torch.manual_seed(0)
    model = ConvMixer(8, 1, 3, 2, num_classes=2).train()
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 1, 0])).backward()
    grad = float(model.blocks[0][0].fn[0].weight.grad.abs().sum())
    tuned = speed.optimize_for_inference(model.eval(), input_size=(3, 8, 8), backend="torch")
    with torch.no_grad():
        tuned(torch.randn(2, 3, 8, 8))
    loads = [speed.load() for _ in range(3)]
    info = speed.kernel_info()
print(json.dumps(dict(loaded=any(library is not None for library in loads), reason=info["reason"], grad=grad,
                      path=info["path"], warnings=[str(w.message) for w in caught if "kernels" in str(w.message)])))
"""


@pytest.fixture(scope="module")
def site() -> Iterator[Path]:
    """A folder for package copies that a process without root's permission override may read."""
    base = Path(tempfile.mkdtemp(prefix="cmx-loader-safety-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _package_copy(site: Path, name: str) -> Path:
    root = site / name
    root.mkdir(mode=0o755)
    shutil.copytree(ROOT / "convmixer_timm", root / "convmixer_timm", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _without_permission_override() -> None:
    # Run in the child before exec: root keeps its uid but loses CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so file
    # modes bind it as any user (the interpreter under /root stays reachable, unlike for another user).
    # PR_CAPBSET_DROP = 24; what exec grants root is bounded by this set.
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _train_and_infer(root: Path, path_entry: Path | None = None, unprivileged: bool = False, **env: str) -> dict:
    home = root / "home"
    home.mkdir(exist_ok=True)
    # cwd: `python -c` puts the working folder first on sys.path, ahead of PYTHONPATH. The timeout is a hang guard
    # (a FIFO read that waits for a writer would wait for ever), not a measurement.
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_INFER], capture_output=True, text=True, timeout=600, cwd=home,
        env={**os.environ, "PYTHONPATH": str(path_entry or root), "HOME": str(home), **env},
        preexec_fn=_without_permission_override if unprivileged else None)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def reference_grad(site: Path) -> float:
    out = _train_and_infer(_package_copy(site, "reference"), CONVMIXER_TIMM_KERNELS="0")
    assert out["warnings"] == [] and not out["loaded"]
    return out["grad"]


UNREADABLE = "cannot be read by you"
IN_A_PROCESS = {  # the SIGBUS case, the hang case, the case only a process without root's override can see
    "library truncated": DAMAGE["library truncated"],
    "library a FIFO": DAMAGE["library a FIFO"],
    "library unreadable (mode 000)": (lambda f: (f / SO).chmod(0), UNREADABLE),
}


@pytest.mark.slow  # a process each, importing torch and timm
@needs_kernels
@needs_root
@linux_only
@pytest.mark.parametrize("case", list(IN_A_PROCESS))
def test_a_file_that_cannot_be_used_is_one_warning_and_pytorchs_ops(site, reference_grad, case):
    spoil, expected = IN_A_PROCESS[case]
    root = _package_copy(site, re.sub(r"[^A-Za-z0-9_.]+", "-", case))
    spoil(root / "convmixer_timm" / "speed")
    out = _train_and_infer(root, unprivileged=expected == UNREADABLE)
    assert not out["loaded"]
    assert len(out["warnings"]) == 1, out["warnings"]  # once per process, not once per step or call
    assert expected in out["warnings"][0] and expected in out["reason"], out
    assert "pip install --force-reinstall" in out["warnings"][0]  # and the fix
    assert out["grad"] == pytest.approx(reference_grad, rel=1e-5)


@pytest.mark.slow  # a process each, importing torch and timm
@needs_kernels
@needs_root
@linux_only
def test_a_read_only_install_of_another_user_through_links_loads_without_roots_override(site):
    # Everything at once, in a process bound by file modes like any user (also the control for mode 000 above):
    # files 0444 and folders 0555 owned by another user, the environment reached through a linked folder, and the
    # library itself a link into another read-only folder. It loads silently.
    real = _package_copy(site, "env-real")
    speed_folder = real / "convmixer_timm" / "speed"
    elsewhere = site / "lib-real"
    elsewhere.mkdir()
    shutil.move(speed_folder / SO, elsewhere / SO)
    (speed_folder / SO).symlink_to(elsewhere / SO)
    for folder in (real / "convmixer_timm", elsewhere):
        for path in [*folder.rglob("*"), folder]:
            if not path.is_symlink():
                os.chown(path, OTHER_USER, OTHER_USER)
                path.chmod(0o555 if path.is_dir() else 0o444)
    (site / "env").symlink_to(real)
    out = _train_and_infer(real, path_entry=site / "env", unprivileged=True)
    assert out["loaded"] and out["warnings"] == [] and out["reason"] is None, out
    assert out["path"] == str(speed_folder / SO)


def test_kernel_info_names_why_the_kernels_are_off(monkeypatch):
    monkeypatch.setenv("CONVMIXER_TIMM_KERNELS", "0")
    info = speed.kernel_info()
    assert not info["loaded"] and "CONVMIXER_TIMM_KERNELS" in info["reason"]


@needs_kernels
def test_a_library_whose_size_changes_while_it_is_read_is_refused(tmp_path, monkeypatch):
    # A writer at work (the owner rebuilding in place): what was hashed must be all of the file that is mapped.
    path = _private_copy(tmp_path / "private")
    real_read = os.read

    def read_then_grow(fd: int, size: int) -> bytes:
        data = real_read(fd, size)
        if os.fstat(fd).st_ino == path.stat().st_ino and not data:
            with path.open("ab") as grown:
                grown.write(b"\0")
        return data

    monkeypatch.setattr(os, "read", read_then_grow)
    assert "changed while it was being checked" in _load_error(path)

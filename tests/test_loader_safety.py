"""The kernel loader against a hostile or careless file system: the file checked is the file mapped, and every file
that cannot be trusted or read is one warning and PyTorch's ops.

Everything here is real: libraries compiled and swapped on disk, modes set with chmod, FIFOs made with mkfifo,
symbolic links, files given to another user with chown, and processes run as that user.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
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
                                reason="chown and running as another user need root")
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
    # Another user's race: replace the library between the loader's checks and dlopen. The loader maps the
    # descriptor it checked, so the swapped-in file's constructor never runs and the checked inode is what is mapped.
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


# ------------------------------------------------------------------------------------------------ links, folders


@needs_kernels
@pytest.mark.parametrize("linked", [build.MANIFEST_NAME, *build.SOURCES])
def test_a_manifest_or_source_link_is_refused_even_to_a_genuine_file(tmp_path, linked):
    path = _private_copy(tmp_path / "private")
    sources = tmp_path / "sources"
    sources.mkdir()
    for name in build.SOURCES:
        shutil.copy(SPEED / name, sources / name)
    target = tmp_path / "real" / linked
    target.parent.mkdir()
    holder = path.parent if linked == build.MANIFEST_NAME else sources
    shutil.move(holder / linked, target)
    (holder / linked).symlink_to(target)
    with pytest.raises(loader.KernelLoadError, match=f"{linked} is a symbolic link"):
        loader.load_from(path, sources=sources)


@needs_kernels
@pytest.mark.parametrize("relative", [False, True])
def test_a_folder_link_between_private_folders_is_followed(tmp_path, relative):
    path = _private_copy(tmp_path / "private")
    holder = tmp_path / "mine"
    holder.mkdir(mode=0o700)
    (holder / "kernels").symlink_to(Path("../private") if relative else path.parent)
    assert loader.load_from(holder / "kernels" / build.LIBRARY_NAME).isa in loader.ISAS


@needs_kernels
def test_a_folder_link_held_in_a_folder_others_can_write_is_refused(tmp_path):
    # Whoever can write the folder holding the link can point it elsewhere: the link's folder is judged too.
    path = _private_copy(tmp_path / "private")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "kernels").symlink_to(path.parent)
    shared.chmod(0o777)
    assert f"{shared} is writable by other users" in _load_error(shared / "kernels" / build.LIBRARY_NAME)


@needs_kernels
def test_a_folder_link_into_a_folder_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    path = _private_copy(shared / "private")
    shared.chmod(0o777)  # anyone could rename the private folder away and put theirs in its place
    holder = tmp_path / "mine"
    holder.mkdir(mode=0o700)
    (holder / "kernels").symlink_to(path.parent)
    assert f"{shared} is writable by other users" in _load_error(holder / "kernels" / build.LIBRARY_NAME)


@needs_kernels
@needs_root
def test_a_folder_link_in_a_sticky_folder_counts_only_if_it_is_yours(tmp_path):
    path = _private_copy(tmp_path / "private")
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: others may add names, not replace ours
    link = sticky / "kernels"
    link.symlink_to(path.parent)
    assert loader.load_from(link / build.LIBRARY_NAME).isa in loader.ISAS
    os.lchown(link, OTHER_USER, OTHER_USER)
    assert f"{link} belongs to user id {OTHER_USER}" in _load_error(link / build.LIBRARY_NAME)


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
                      warnings=[str(w.message) for w in caught if "kernels" in str(w.message)])))
"""


@pytest.fixture(scope="module")
def site() -> Iterator[Path]:
    """A folder for package copies that another user may read (pytest's own tmp folders are private to root)."""
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
    # Run in the child before exec: root keeps its uid but loses CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so a
    # mode-000 file is unreadable to it as to any user (the interpreter under /root stays reachable, unlike for
    # another user). PR_CAPBSET_DROP = 24; what exec grants root is bounded by this set.
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _train_and_infer(root: Path, as_user: int | None = None, unprivileged: bool = False, **env: str) -> dict:
    home = root / "home"
    home.mkdir(exist_ok=True)
    if as_user is not None:
        os.chown(home, as_user, as_user)
    # cwd: `python -c` puts the working folder first on sys.path, ahead of PYTHONPATH. The timeout is a hang guard
    # (a FIFO read that waits for a writer would wait for ever), not a measurement.
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_INFER], capture_output=True, text=True, timeout=600, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "HOME": str(home), **env},
        preexec_fn=_without_permission_override if unprivileged else None,
        **(dict(user=as_user, group=as_user, extra_groups=[]) if as_user is not None else {}))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def reference_grad(site: Path) -> float:
    out = _train_and_infer(_package_copy(site, "reference"), CONVMIXER_TIMM_KERNELS="0")
    assert out["warnings"] == [] and not out["loaded"]
    return out["grad"]


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _link_to_a_genuine_copy(path: Path) -> None:
    target = path.parent.parent / f"genuine-{path.name}"
    shutil.move(path, target)
    path.symlink_to(target)


UNREADABLE = "cannot be read by you"
CASES = {  # what is done to the package copy's kernel folder, what the warning says
    "library unreadable (mode 000)": (lambda s: (s / build.LIBRARY_NAME).chmod(0), UNREADABLE),
    "source unreadable (mode 000)": (lambda s: (s / "convmixer_kernels.cpp").chmod(0), UNREADABLE),
    "manifest unreadable (mode 000)": (lambda s: (s / build.MANIFEST_NAME).chmod(0), UNREADABLE),
    "kernels_body.inc missing": (lambda s: (s / "kernels_body.inc").unlink(), "kernels_body.inc is missing"),
    "manifest missing": (lambda s: (s / build.MANIFEST_NAME).unlink(), "_convmixer_kernels.json is missing"),
    "library a folder": (lambda s: _folder(s / build.LIBRARY_NAME), "is a folder"),
    "library a FIFO": (lambda s: _fifo(s / build.LIBRARY_NAME), "is a FIFO"),
    "manifest a FIFO": (lambda s: _fifo(s / build.MANIFEST_NAME), "is a FIFO"),
    "convmixer_kernels.cpp a FIFO": (lambda s: _fifo(s / "convmixer_kernels.cpp"), "is a FIFO"),
    "library a link": (lambda s: _link_to_a_genuine_copy(s / build.LIBRARY_NAME), "is a symbolic link"),
    "manifest a link": (lambda s: _link_to_a_genuine_copy(s / build.MANIFEST_NAME), "is a symbolic link"),
    "source a link": (lambda s: _link_to_a_genuine_copy(s / "kernels_body.inc"), "is a symbolic link"),
    "manifest another user's": (lambda s: os.chown(s / build.MANIFEST_NAME, OTHER_USER, OTHER_USER),
                                f"belongs to user id {OTHER_USER}"),
    "source another user's": (lambda s: os.chown(s / "kernels_body.inc", OTHER_USER, OTHER_USER),
                              f"belongs to user id {OTHER_USER}"),
    "source writable by others": (lambda s: (s / "convmixer_kernels.cpp").chmod(0o666), "writable by other users"),
}


@needs_kernels
@needs_root
@linux_only
@pytest.mark.parametrize("case", list(CASES))
def test_a_file_that_cannot_be_trusted_or_read_is_one_warning_and_pytorchs_ops(site, reference_grad, case):
    spoil, expected = CASES[case]
    root = _package_copy(site, re.sub(r"[^A-Za-z0-9_.]+", "-", case))
    spoil(root / "convmixer_timm" / "speed")
    out = _train_and_infer(root, unprivileged=expected == UNREADABLE)
    assert not out["loaded"]
    assert len(out["warnings"]) == 1, out["warnings"]  # once per process, not once per step or call
    assert expected in out["warnings"][0] and expected in out["reason"], out
    assert "pip install --force-reinstall" in out["warnings"][0]  # and the fix
    assert out["grad"] == pytest.approx(reference_grad, rel=1e-5)


@needs_kernels
@needs_root
@linux_only
def test_the_intact_copy_loads_where_mode_000_is_unreadable(site):
    # The control for the cases above: without the permission override an intact copy still loads, silently.
    out = _train_and_infer(_package_copy(site, "intact-unprivileged"), unprivileged=True)
    assert out["loaded"] and out["warnings"] == [] and out["reason"] is None, out


@needs_kernels
@needs_root
@linux_only
def test_another_user_loads_the_kernels_of_a_package_root_installed(site):
    # The other side of the cases above: root-owned files readable by all are trusted by every user.
    try:
        subprocess.run([sys.executable, "-c", "pass"], user=OTHER_USER, group=OTHER_USER, extra_groups=[],
                       capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"user {OTHER_USER} cannot run {sys.executable} here (an interpreter under /root)")
    root = _package_copy(site, "intact")
    out = _train_and_infer(root, as_user=OTHER_USER)
    assert out["loaded"] and out["warnings"] == [] and out["reason"] is None, out


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

"""Crash-safe installs of a folder: it appears complete or not at all, and what a killed run leaves is recovered.

The folder is written into a hidden staging folder beside its destination (same file system), checked, then
moved into place in one rename; an existing folder is swapped out atomically (Linux ``renameat2``) or, elsewhere,
kept in a backup until the new one is in place. ``recover_output`` removes what a run killed meanwhile left
behind (SIGKILL leaves no chance to clean up) and puts a lone backup back.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from .format import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, HubFolderError

__all__ = ["check_output_path", "move_into_place", "recover_output", "staging_dir", "write_error"]

# Staging and backup folders sit beside the output as ".{name}.{pid}.{random}.partial" / ".old": the pid lets a
# later run recognise the leftovers of a run that was killed (SIGKILL leaves no chance to clean up) and remove
# them, while never touching the folders of a run still in progress.
_LEFTOVER_SUFFIXES = ("partial", "old")

# A file name holds at most 255 bytes (NAME_MAX on Linux and macOS). ".{stem}.{pid}.{8 hex}.partial" adds up to 29
# bytes to the stem (pids of up to 10 digits), so an output name longer than this gets a stem cut to fit plus a
# digest of the whole name: still one stem per output name, whatever the pid, for recover_output to match.
NAME_MAX = 255
_STEM_MAX = NAME_MAX - 29


def _leftover_stem(name: str) -> str:
    encoded = os.fsencode(name)
    if len(encoded) <= _STEM_MAX:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:16]
    prefix = name
    while len(os.fsencode(prefix)) > _STEM_MAX - len(digest) - 1:  # whole characters: never half of a UTF-8 one
        prefix = prefix[:-1]
    return f"{prefix}~{digest}"


def _leftover_name(out_dir: Path, kind: str) -> Path:
    return out_dir.parent / f".{_leftover_stem(out_dir.name)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}"


def _remove(path: Path) -> None:
    if path.is_symlink():  # an output that was a symlink, swapped out: drop the link, never its target
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


# OS errors of a write, as the cause and the fix in words. safetensors reports its I/O errors as text only
# ("Error while serializing: I/O error: No space left on device (os error 28)"), hence the code read from it.
_WRITE_ERRORS = {
    errno.ENOSPC: ("no space is left on the device", "free some space, or choose an output folder on another disk"),
    errno.EDQUOT: ("the disk quota is used up", "free some space, or choose an output folder on another disk"),
    errno.EFBIG: ("a file would exceed the file size limit (ulimit -f)", "raise the limit, or write elsewhere"),
    errno.EROFS: ("the file system is read-only", "choose an output folder on a writable file system"),
    errno.EACCES: ("permission denied", "choose an output folder you can write to"),
    errno.EPERM: ("operation not permitted", "choose an output folder you can write to"),
    errno.ENAMETOOLONG: ("a name is too long for the file system", "choose a shorter output path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another output path"),
    errno.ELOOP: ("the path has too many levels of symbolic links", "choose another output path"),
}


def write_error(exc: BaseException, out_dir: Path, existed: bool) -> HubFolderError:
    code = getattr(exc, "errno", None)
    if code is None and (found := re.search(r"\b(?:os error|code:) (\d+)", str(exc))):
        code = int(found.group(1))
    reason, fix = _WRITE_ERRORS.get(code, (None, "check the output folder and try again"))
    if reason is None:
        reason = os.strerror(code) if code else (str(exc).splitlines() or [type(exc).__name__])[0]
    kept = "; the existing folder is unchanged" if existed else ""
    return HubFolderError(f"cannot write {out_dir}: {reason}; {fix}. Nothing was written{kept}.")


def check_output_path(out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """The absolute folder ``save_hub_folder(model, out_dir, ...)`` would write, checked as it checks it before
    reading any weights; ``convert`` calls it first so that a bad ``--out`` fails at once.

    Raises:
        ValueError: the path names no folder to create (``/``, ``.``, ``..``), or a name no file system or model
            card can hold (a NUL byte, over 255 bytes, not UTF-8).
        FileExistsError: it exists (or is a symlink, even a dangling one) and ``overwrite`` is False, or it is a file.
        HubFolderError: the folder it would go in cannot be written (read-only, permission denied, a file, a
            path too long for the file system).
    """
    raw = os.fsdecode(out_dir)
    if os.path.basename(os.path.normpath(raw)) in ("", ".", ".."):
        raise ValueError(f"the output path {raw!r} names no folder to create; name a new folder, e.g. "
                         "./convmixer_768_32")
    _check_folder_name(raw)
    path = Path(os.path.abspath(raw))
    try:
        return _checked_output_path(path, overwrite)
    except OSError as exc:  # e.g. a parent folder's name too long for the file system
        if exc.errno is None:
            raise
        raise write_error(exc, path, existed=False) from exc


def _check_folder_name(raw: str) -> None:
    if "\0" in raw:
        raise ValueError("the output path holds a NUL character, which no file name can hold; choose another path")
    name = os.path.basename(os.path.normpath(raw))
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"the folder name {os.fsencode(name)!r} is not UTF-8 text; it becomes the model card's "
                         "title (and usually the Hub repo's name), so choose a UTF-8 name") from None
    if len(name.encode("utf-8")) > NAME_MAX:
        raise ValueError(f"the folder name is {len(name.encode('utf-8'))} bytes long, and a file name holds at most "
                         f"{NAME_MAX} bytes; choose a shorter name")


def _checked_output_path(path: Path, overwrite: bool) -> Path:
    if path.is_symlink() and not path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; pass "
                                  "--overwrite (overwrite=True) to replace the link with the folder, or remove it")
    elif path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a folder; choose another output path")
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it (the old "
                                  "folder is kept if the new write fails)")
        # Replacing a folder deletes what it holds: only ever one this module wrote (a typo such as `--out ~` or
        # `--out /tmp` must not take a home folder with it). A symbolic link is replaced, its target never touched.
        foreign = [] if path.is_symlink() else sorted(set(os.listdir(path)) - {CONFIG_NAME, WEIGHTS_NAME, CARD_NAME})
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise FileExistsError(f"{path} holds files a Hub folder written here does not ({shown}), and --overwrite "
                                  f"replaces only such a folder ({CONFIG_NAME}, {WEIGHTS_NAME}, {CARD_NAME}); choose "
                                  "another output path, or move those files away first")
    ancestor = path.parent
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise HubFolderError(f"cannot write {path}: {ancestor} is not a folder; choose another output path")
    effective = os.access in os.supports_effective_ids
    if not os.access(ancestor, os.W_OK | os.X_OK, effective_ids=effective):
        read_only = bool(os.statvfs(ancestor).f_flag & os.ST_RDONLY)
        reason, fix = _WRITE_ERRORS[errno.EROFS if read_only else errno.EACCES]
        raise HubFolderError(f"cannot write {path}: {ancestor} is not writable ({reason}); {fix}")
    return path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def recover_output(out_dir: str | os.PathLike[str]) -> None:
    """Clean up after a write to ``out_dir`` that was killed: remove the staging and backup folders of dead
    processes, and put a backup back where a kill left ``out_dir`` missing (possible only on systems without
    ``renameat2``). Folders of live processes are left alone."""
    try:
        out_dir = Path(os.path.abspath(out_dir))
        if not out_dir.name or not out_dir.parent.is_dir():
            return
    except (OSError, ValueError):  # a path no file system holds: nothing of ours can be there
        return
    parent = out_dir.parent
    stem = re.escape(_leftover_stem(out_dir.name))
    pattern = re.compile(rf"^\.{stem}\.(\d+)\.[0-9a-f]{{8}}\.({'|'.join(_LEFTOVER_SUFFIXES)})$")
    backups = []
    try:
        listing = list(parent.iterdir())
    except OSError:  # an unreadable parent: nothing of ours can be found there, and writing will say why
        return
    for entry in listing:
        match = pattern.match(entry.name)
        if not match or not _ours(entry) or _pid_alive(int(match.group(1))):
            continue
        if match.group(2) == "old" and not out_dir.exists() and not out_dir.is_symlink():
            backups.append(entry)
        else:
            _remove(entry)
    if backups:  # one killed overwrite left only its backup: that is the previous output, complete
        backups.sort(key=lambda p: p.lstat().st_mtime)
        with contextlib.suppress(OSError):  # best effort: a backup that cannot be moved stays where it is
            os.rename(backups[-1], out_dir)
            for extra in backups[:-1]:
                _remove(extra)


def _ours(entry: Path) -> bool:
    """Whether a leftover-looking entry is one this user's runs made: a folder (or a swapped-out output link)
    owned by us. In a shared folder (``/tmp``) anyone can create ``.out.123.abcdef12.old``: such a folder of
    another user is never removed, nor adopted as the output."""
    try:
        info = entry.lstat()
    except OSError:
        return False
    return info.st_uid == os.geteuid() and (stat.S_ISDIR(info.st_mode) or stat.S_ISLNK(info.st_mode))


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A hidden folder beside ``out_dir`` (same file system, so the final rename is atomic); removed on failure,
    together with any parent folders created for it."""
    created = [p for p in (out_dir.parent, *out_dir.parent.parents) if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging = _leftover_name(out_dir, "partial")
        staging.mkdir(mode=0o700)
        try:
            yield staging
        except BaseException:  # includes Ctrl-C and the CLI's SIGTERM: never leave a half-written folder behind
            _remove(staging)
            raise
    except BaseException:
        for parent in created:  # innermost first; rmdir refuses a folder someone else has put files in
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's ``renameat2(RENAME_EXCHANGE)``; False where the C library, the
    kernel or the file system cannot (the caller then falls back to two renames)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def current_umask() -> int:
    """The process's umask, read without changing it (Linux 4.7+ reports it in /proc/self/status). Elsewhere it
    is set and put back, which leaves a moment in which another thread's new files would get the wrong mode."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def move_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Move a complete staging folder to ``out_dir``. ``out_dir`` always exists while it is replaced: the two
    folders are swapped in one step, or (without ``renameat2``) the old one waits in a backup that
    ``recover_output`` puts back if a kill comes between the two renames."""
    umask = current_umask()
    # The staging folder is made 0700 and some writers make their files 0600 (write-then-rename); a published
    # folder should have the permissions of any other the user creates.
    os.chmod(staging, 0o777 & ~umask)
    for file in staging.iterdir():
        os.chmod(file, 0o666 & ~umask)
    if not out_dir.exists() and not out_dir.is_symlink():
        try:
            os.rename(staging, out_dir)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):  # created meanwhile
                raise FileExistsError(f"{out_dir} appeared while writing; pass --overwrite to replace it") from exc
            raise
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite (overwrite=True) to replace it")
    if exchange(staging, out_dir):
        _remove(staging)  # the staging path now holds the previous folder
        return
    backup = _leftover_name(out_dir, "old")
    os.rename(out_dir, backup)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(backup, out_dir)
        raise
    _remove(backup)

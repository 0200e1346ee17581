"""Choices of :func:`optimize_for_inference` remembered across processes: one small JSON file per key.

Every file is data from a folder others may reach, never trusted: it is opened without following a symlink and
without blocking (a FIFO in its place is refused, not waited on), must be a regular file, is read up to
:data:`MAX_BYTES`, and must hold exactly the types a choice has. Anything else is one warning; the caller races
again and the file is replaced. A folder owned by another user is not used at all.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import platform
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["MAX_BYTES", "ChoiceCache", "architecture", "cache_dir", "machine", "version"]

logger = logging.getLogger("convmixer_timm")

SCHEMA = 2
MAX_BYTES = 64 * 1024  # a record is about 2 kB


def cache_dir() -> Path:
    """Where :func:`optimize_for_inference` remembers its choices: ``$CONVMIXER_TIMM_CACHE/inference``, else
    ``~/.cache/convmixer_timm/inference`` (the folder the demo and the kernel build use)."""
    root = os.environ.get("CONVMIXER_TIMM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "convmixer_timm") / "inference"


def version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def machine() -> dict[str, str]:
    """The CPU (model and the hash of its flags) and the settings that decide which ISA each library uses."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == (platform.processor() or platform.machine()):
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    env = {name: os.environ.get(name, "") for name in (
        "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "CONVMIXER_TIMM_CPU_ISA")}
    return {"cpu": model, "machine": platform.machine(), "flags_sha256": hashlib.sha256(flags.encode()).hexdigest(),
            "torch_capability": str(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()),
            **{f"env {k}": v for k, v in env.items()}}


def architecture(model: nn.Module) -> dict[str, object]:
    """The model's speed-relevant shape: dim, depth, kernel, patch, activation, classes, and every tensor shape."""
    shapes = [f"{name}:{list(t.shape)}" for name, t in model.state_dict().items()]
    arch: dict[str, object] = {"class": type(model).__name__,
                               "shapes_sha256": hashlib.sha256("\n".join(shapes).encode()).hexdigest()}
    try:
        stem = model.stem[0]
        arch.update(dim=int(stem.weight.shape[0]), depth=len(model.blocks), patch=int(stem.stride[0]),
                    kernel=int(model.blocks[0][0].fn[0].weight.shape[-1]) if len(model.blocks) else 0,
                    act=type(model.stem[1]).__name__, in_chans=int(stem.weight.shape[1]))
    except (AttributeError, IndexError, TypeError):
        pass
    return arch


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(data: object, key: Mapping[str, object]) -> dict:
    """``data`` if it is a whole record for ``key``, with every field of the type a choice has; else ValueError."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"not a schema-{SCHEMA} record")
    if json.dumps(data.get("key"), sort_keys=True) != json.dumps(key, sort_keys=True):
        raise ValueError("not a choice for this key")
    if not isinstance(data.get("choice"), str):
        raise ValueError("'choice' is not a string")
    ms = data.get("ms")
    if not isinstance(ms, dict) or not all(isinstance(k, str) and _is_number(v) and v >= 0 for k, v in ms.items()):
        raise ValueError("'ms' is not a map of path names to times")
    for name in ("margin", "noise"):
        if not _is_number(data.get(name)):
            raise ValueError(f"{name!r} is not a number")
    for name, low in (("races", 1), ("batch", 1)):
        if not isinstance(data.get(name), int) or isinstance(data.get(name), bool) or data[name] < low:
            raise ValueError(f"{name!r} is not an integer >= {low}")
    if data.get("rival_ms") is not None and not (_is_number(data["rival_ms"]) and data["rival_ms"] > 0):
        raise ValueError("'rival_ms' is not a positive number")
    for name in ("openvino_requests", "proxy_depth"):
        value = data.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name!r} is not a positive integer")
    return data


class ChoiceCache:
    """Choices remembered across processes: one small JSON file per (machine, libraries, model, input) key.

    JSON data only (a file is never executed or unpickled, and a name read from it is used only if it is one of
    the paths on offer). Writes go to a new file in the same folder, created with the user's umask, and are
    renamed into place, so a reader sees the old file or the new one, whole. A file that cannot be read as a
    record for its key is reported (one warning) and treated as absent; the next choice replaces it.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._warned_write = False
        self._refused = False

    def path(self, key: Mapping[str, object]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.folder / f"{digest}.json"

    def _usable(self, create: bool) -> bool:
        """Whether the folder is ours: another user's folder could feed us choices or swap files under us."""
        if self._refused:
            return False
        try:
            if create:
                self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            info = self.folder.stat()
        except FileNotFoundError:
            return False
        except OSError as error:
            self._warn_write(error)
            return False
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            self._refused = True
            logger.warning("convmixer_timm: not using the inference-choice cache %s: it is %s; choices are timed "
                           "in each process (set CONVMIXER_TIMM_CACHE to a folder of your own)", self.folder,
                           "not a folder" if not stat.S_ISDIR(info.st_mode) else f"owned by uid {info.st_uid}")
            return False
        return True

    def _read(self, path: Path) -> bytes | None:
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise ValueError("a symbolic link") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            chunks, size = [], 0
            while size <= MAX_BYTES:
                chunk = os.read(fd, MAX_BYTES + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if size > MAX_BYTES:
                raise ValueError(f"larger than {MAX_BYTES} bytes")
            return b"".join(chunks)
        finally:
            os.close(fd)

    def get(self, key: Mapping[str, object]) -> dict | None:
        """The record remembered for ``key``, or None (absent, unusable: one warning)."""
        if not self._usable(create=False):
            return None
        path = self.path(key)
        try:
            data = self._read(path)
            if data is None:
                return None
            record = json.loads(data.decode("utf-8"))
            if isinstance(record, dict) and type(record.get("schema")) is int and 0 < record["schema"] < SCHEMA:
                return None  # written by an older version: raced again and replaced without a warning
            return _check(record, key)
        except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)[:200]
            logger.warning("convmixer_timm: damaged inference-choice file %s (%s); timing again and replacing it",
                           path, reason)
        except OSError as error:
            logger.warning("convmixer_timm: cannot read the remembered inference choice %s (%s); timing again",
                           path, error)
        return None

    def put(self, key: Mapping[str, object], record: Mapping[str, object]) -> None:
        """Remember ``record`` for ``key``, replacing whatever is at its path (a file, a link, a FIFO)."""
        if not self._usable(create=True):
            return
        path = self.path(key)
        tmp = self.folder / f"{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"schema": SCHEMA, "key": key, **record}, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as error:  # a read-only or full cache: the choice still holds for this process
            self._warn_write(error)

    def _warn_write(self, error: OSError) -> None:
        if not self._warned_write:
            self._warned_write = True
            logger.warning("convmixer_timm: cannot remember inference choices in %s (%s)", self.folder, error)

"""Hub-ready folders: write them atomically, load them, check them, publish them.

A folder holds ``model.safetensors`` (timm key layout), ``config.json`` in timm's own format (written by
``timm.models._hub.save_for_hf``, so ``timm.create_model("local-dir:DIR", pretrained=True)`` and
``"hf-hub:ORG/NAME"`` rebuild the model from it) and a model card ``README.md``. The config keeps only the
constructor arguments that differ from the registered variant and the class names, so that Hugging Face
transformers' timm wrapper loads the folder too; the card states only facts about these weights.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import inspect
import json
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .labels import canonical_dataset, check_labels, dataset_labels
from .model_card import Architecture, render_model_card
from .models.checkpoint import CheckpointError, describe_architecture, read_dimensions, to_timm_layout
from .models.variants import Variant, get_variant

__all__ = [
    "CARD_NAME", "CONFIG_NAME", "WEIGHTS_NAME", "HubFolderError", "HubPushError", "architecture_of",
    "check_output_path", "load_hub_folder", "malformed_token", "push_hub_folder", "recover_output", "save_hub_folder",
    "verify_hub_folder", "weights_sha256",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"

# Activation modules recognised when a model (e.g. the authors' nn.Sequential) does not name its activation.
_ACT_NAMES = {nn.GELU: "gelu", nn.ReLU: "relu", nn.SiLU: "silu", nn.Hardswish: "hard_swish", nn.Mish: "mish"}


class HubFolderError(RuntimeError):
    """A Hub folder that cannot be written, or that does not load back as the model it should hold."""


class HubPushError(RuntimeError):
    """Publishing a folder to the Hub failed; the message names the cause and the fix."""


def architecture_of(state_dict: Mapping[str, torch.Tensor], act: str) -> Architecture:
    """Read h, d, k, p, input channels and classes from timm-layout weights (the activation has no weights)."""
    h, d, k, p, in_chans, num_classes = read_dimensions(state_dict)
    return Architecture(h=h, d=d, k=k, p=p, act=act, in_chans=in_chans, num_classes=num_classes)


def _activation_of(model: nn.Module, default: str) -> str:
    name = getattr(model, "act_name", None)
    if isinstance(name, str) and name:
        return name.lower()
    for module in model.modules():
        for cls, act in _ACT_NAMES.items():
            if type(module) is cls:
                return act
    return default


def _global_pool_of(model: nn.Module) -> str | None:
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    return pool if isinstance(pool, str) else None


def _model_args(variant: Variant, model: nn.Module, arch: Architecture, overrides: Mapping[str, Any] | None
                ) -> dict[str, Any]:
    """Every constructor argument that fixes the architecture: what the staged folder is rebuilt and checked with."""
    args: dict[str, Any] = dict(dim=arch.h, depth=arch.d, kernel_size=arch.k, patch_size=arch.p,
                                act_layer=arch.act, in_chans=arch.in_chans, num_classes=arch.num_classes)
    pool = _global_pool_of(model)
    if pool is not None:
        args["global_pool"] = pool
    args.update(_batch_norm_args_of(model))
    args.update(overrides or {})
    return args


def _batch_norm_args_of(model: nn.Module) -> dict[str, float]:
    """``bn_momentum`` / ``bn_eps`` where every BatchNorm shares a value other than PyTorch's default: eps
    changes the outputs, so a folder without it would not reproduce the model."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    args: dict[str, float] = {}
    for arg, attribute, default in (("bn_momentum", "momentum", 0.1), ("bn_eps", "eps", 1e-5)):
        values = {getattr(m, attribute) for m in norms}
        if len(values) == 1 and isinstance(value := values.pop(), float) and value != default:
            args[arg] = value
    return args


# Never in config.json's model_args: num_classes has its own top-level field (transformers passes it to
# timm.create_model itself, so a second copy is a TypeError), and timm leaves out drop rates and placement.
_NOT_MODEL_ARGS = frozenset({"num_classes", "drop_rate", "drop_path_rate", "device", "dtype"})


def _differing_args(variant: Variant, args: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of ``args`` that differ from what ``timm.create_model(variant.name)`` builds by default.

    Only these go into config.json: timm's ``local-dir:``/``hf-hub:`` loaders and transformers' timm wrapper
    call ``timm.create_model(architecture, **model_args)``, and the registered variant supplies the rest.
    """
    from .models.convmixer import ConvMixer

    defaults = {name: p.default for name, p in inspect.signature(ConvMixer).parameters.items()
                if p.default is not inspect.Parameter.empty}
    defaults.update(variant.model_args())
    return {k: v for k, v in args.items() if k not in _NOT_MODEL_ARGS and (k not in defaults or defaults[k] != v)}


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of timm-layout weights: names, dtypes, shapes and values, independent of the file format.

    ``Variant.published_sha256`` holds this digest for published weights, so the authors' ``.pth.tar`` and the
    same tensors as ``model.safetensors`` are recognised alike. BatchNorm's ``num_batches_tracked`` counters are
    left out: they never change an output, and copies of the same weights disagree on them.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        if key.endswith("num_batches_tracked"):
            continue
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _resolve_labels(labels: Sequence[str] | None, model: nn.Module, variant: Variant, num_classes: int,
                    dataset: str | None) -> tuple[tuple[str, ...] | None, dict[str, str] | None, bool]:
    """Class names for config.json: (names, their descriptions, whether they are ImageNet-1k's own).

    The caller's names win; then those the model already carries (a folder loaded and saved again); then the
    names of the variant's data set, unless the classifier has another size or the caller named another data set.
    """
    if labels is not None:
        return check_labels(labels, num_classes), None, False
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("label_names") and cfg.get("num_classes") == num_classes:
        names = cfg["label_names"]
        if isinstance(names, (list, tuple)) and len(names) == num_classes:
            descriptions = cfg.get("label_descriptions")
            own = dataset_labels(variant.dataset)
            return tuple(names), descriptions if isinstance(descriptions, dict) else None, bool(
                own and own.descriptions and tuple(names) == own.names)
    if num_classes != variant.num_classes or canonical_dataset(dataset or variant.dataset) != variant.dataset:
        return None, None, False
    known = dataset_labels(variant.dataset)
    if known is None:
        return None, None, False
    return known.names, known.descriptions, known.descriptions is not None


def _build_reference(variant: Variant, model: nn.Module, state_dict: dict[str, torch.Tensor],
                     args: dict[str, Any]) -> nn.Module:
    """A fresh timm-built model holding ``state_dict``: what ``local-dir:`` will rebuild from the folder."""
    import timm

    try:
        reference = timm.create_model(variant.name, pretrained=False, **args)
    except (TypeError, ValueError) as exc:
        raise HubFolderError(f"cannot build {variant.name} with {args}: {exc}") from exc
    source_cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(source_cfg, Mapping) and source_cfg.get("architecture") == variant.name:
        # Keep the caller's preprocessing (input size, mean/std, crop) when the model came from timm.
        reference.pretrained_cfg = dict(source_cfg)
    try:
        reference.load_state_dict(state_dict)
    except CheckpointError:
        raise
    except RuntimeError as exc:
        raise CheckpointError(
            f"the weights ({describe_architecture(state_dict)}) do not fit {variant.name} built with {args}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return reference.eval()


def _assert_same(expected: torch.Tensor, actual: torch.Tensor, what: str) -> None:
    if torch.equal(actual, expected):  # the common case, and far cheaper than assert_close
        return
    try:  # NaNs in the same places count as equal; otherwise report where they differ
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    except AssertionError as exc:
        raise HubFolderError(f"{what} differs after reloading the folder: {str(exc).splitlines()[0]}") from exc


def _probe_input(input_size: tuple[int, ...], patch_size: int) -> torch.Tensor:
    # ConvMixer runs at any size >= p; a 4 x 4 patch grid exercises every layer (padding included) at a
    # fraction of the cost of 224 px (seconds per pass for the large variants on a small CPU).
    channels, *spatial = input_size
    spatial = [min(s, 4 * patch_size) for s in spatial]
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, channels, *spatial, generator=generator)


def verify_hub_folder(path: str | os.PathLike[str]) -> nn.Module:
    """Build the model from a folder through ``local-dir:`` and run one forward; return it in eval mode.

    Also refuses a config.json that transformers cannot load (``num_classes`` repeated in ``model_args``, as
    timm's ``save_for_hf`` and earlier versions of convmixer-timm write it). Raises ``HubFolderError`` naming what is
    missing or broken and the fix.
    """
    model = _load_folder(Path(path), run_forward=True)
    _check_transformers_config(Path(path))
    return model


def _check_transformers_config(folder: Path) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    model_args = config.get("model_args") or {}
    if "num_classes" in model_args:
        raise HubFolderError(
            f"{folder / CONFIG_NAME} repeats num_classes in model_args, so transformers cannot load it (its timm "
            "wrapper passes num_classes itself: TypeError 'got multiple values for keyword argument'); write the "
            f"folder again with `convmixer-timm convert {folder / WEIGHTS_NAME} --model {config.get('architecture')} "
            "--out NEW_DIR` (plus the --num-classes/--model-kwargs the weights need), or delete num_classes from "
            "model_args (the top-level num_classes holds it)")


def _load_folder(folder: Path, run_forward: bool) -> nn.Module:
    if not folder.is_dir():
        raise HubFolderError(f"{folder} is not a folder; write one with `convmixer-timm convert` first")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        raise HubFolderError(f"{folder} lacks {', '.join(missing)}; write it with `convmixer-timm convert`")
    import timm

    try:
        model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True).eval()
        if not run_forward:
            return model
        input_size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        with torch.inference_mode():
            out = model(_probe_input(input_size, getattr(model, "patch_size", 7)))
    except Exception as exc:  # anything timm or the weights raise means the folder is unusable
        raise HubFolderError(f"{folder} does not load with timm: {type(exc).__name__}: {exc}") from exc
    if out.shape != (1, model.num_classes) and model.num_classes > 0:
        raise HubFolderError(f"{folder} gives outputs of shape {tuple(out.shape)}, expected (1, {model.num_classes})")
    return model


def load_hub_folder(path: str | os.PathLike[str]) -> nn.Module:
    """The model of a Hub folder, weights loaded, in eval mode (``timm.create_model("local-dir:...")``)."""
    return _load_folder(Path(path), run_forward=False)


# Staging and backup folders sit beside the output as ".{name}.{pid}.{random}.partial" / ".old": the pid lets a
# later run recognise the leftovers of a run that was killed (SIGKILL leaves no chance to clean up) and remove
# them, while never touching the folders of a run still in progress.
_LEFTOVER_SUFFIXES = ("partial", "old")

# A file name holds at most 255 bytes (NAME_MAX on Linux and macOS). ".{stem}.{pid}.{8 hex}.partial" adds up to 29
# bytes to the stem (pids of up to 10 digits), so an output name longer than this gets a stem cut to fit plus a
# digest of the whole name: still one stem per output name, whatever the pid, for recover_output to match.
_STEM_MAX = 255 - 29


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


def _write_error(exc: BaseException, out_dir: Path, existed: bool) -> HubFolderError:
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
        ValueError: the path names no folder to create (``/``, ``.``, ``..``).
        FileExistsError: it exists (or is a symlink, even a dangling one) and ``overwrite`` is False, or it is a file.
        HubFolderError: the folder it would go in cannot be written (read-only, permission denied, a file).
    """
    raw = os.fspath(out_dir)
    if os.path.basename(os.path.normpath(raw)) in ("", ".", ".."):
        raise ValueError(f"the output path {raw!r} names no folder to create; name a new folder, e.g. "
                         "./convmixer_768_32")
    path = Path(os.path.abspath(raw))
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
    out_dir = Path(os.path.abspath(out_dir))
    parent = out_dir.parent
    if not out_dir.name or not parent.is_dir():
        return
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
def _staging_dir(out_dir: Path) -> Iterator[Path]:
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


def _exchange(a: Path, b: Path) -> bool:
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


def _install(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Move a complete staging folder to ``out_dir``. ``out_dir`` always exists while it is replaced: the two
    folders are swapped in one step, or (without ``renameat2``) the old one waits in a backup that
    ``recover_output`` puts back if a kill comes between the two renames."""
    umask = os.umask(0)
    os.umask(umask)
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
    if _exchange(staging, out_dir):
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


def _keep_differing_args(config_path: Path, model_args: dict[str, Any]) -> None:
    # timm's save_for_hf records every argument, num_classes included (a TypeError in transformers' timm wrapper,
    # which passes num_classes itself); replace them with the differing ones.
    written = json.loads(config_path.read_text(encoding="utf-8"))
    config = {}
    for key, value in written.items():
        if key == "pretrained_cfg" and model_args:  # where save_for_hf puts model_args
            config["model_args"] = model_args
        if key != "model_args":
            config[key] = value
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def save_hub_folder(
        model: torch.nn.Module,
        out_dir: str | os.PathLike,
        model_name: str,
        *,
        metrics: dict[str, float] | None = None,
        dataset: str | None = None,
        overwrite: bool = False,
        model_args: dict | None = None,
        labels: Sequence[str] | None = None,
        metrics_note: str | None = None,
) -> Path:
    """Write ``model`` as a Hub-ready folder and return its path.

    Args:
        model: A ConvMixer (timm-built, or any module whose state dict is in a supported layout, such as the
            authors' ``nn.Sequential``). Its weights are copied, the model itself is not changed.
        out_dir: Folder to create. It appears complete or not at all: everything is written to a hidden
            folder beside it, reloaded and compared, then renamed into place.
        model_name: The variant the model is an instance of (e.g. ``"convmixer_768_32"``); h/d/k/p/classes are
            read from the weights, so variants with overridden sizes are fine.
        metrics: Figures for these weights, for the model card, e.g. ``{"top1": 98.6, "dataset": "sklearn
            digits"}``; the ``dataset`` entry (or ``dataset``) names what they were measured on and is required.
        dataset: What the weights were trained on, if known. The card names a training data set only when this
            is given or the weights are the variant's published ones (``Variant.published_sha256``).
        overwrite: Replace an existing ``out_dir``; it stays intact if the new write fails. Only a folder holding
            nothing but what this function writes (or a symbolic link, replaced, its target untouched) is replaced.
        model_args: Constructor arguments overriding those read from the model (JSON-serialisable). config.json
            keeps only the arguments that differ from the registered variant, and never ``num_classes``.
        labels: One class name per output, in order. Default: names the model already carries, else the
            variant's data set's (ImageNet-1k's synsets, CIFAR-10's names) when the classifier has that data
            set's size and ``dataset`` names no other; else none. They become timm's ``label_names`` and
            transformers' ``id2label``.
        metrics_note: Where ``metrics`` come from, for the card (default: measured for these weights).

    Raises:
        ValueError: ``labels`` do not give one unique name per class, ``metrics`` name no data set, or ``out_dir``
            names no folder (``/``, ``..``).
        FileExistsError: ``out_dir`` exists (or is a symbolic link) and ``overwrite`` is False, or is a file.
        KeyError: unknown ``model_name`` (the message names the nearest variants).
        CheckpointError: the weights do not fit the variant.
        HubFolderError: the folder could not be written (the message names the cause: a full disk, a read-only
            file system...) or does not reload identically.
    """
    variant = get_variant(model_name)
    recover_output(out_dir)
    out_dir = check_output_path(out_dir, overwrite)
    existed = out_dir.exists() or out_dir.is_symlink()

    state_dict = {k: v.detach().to("cpu", copy=True) for k, v in to_timm_layout(model.state_dict()).items()}
    arch = architecture_of(state_dict, _activation_of(model, variant.act))
    args = _model_args(variant, model, arch, model_args)
    reference = _build_reference(variant, model, state_dict, args)
    arch = Architecture(h=arch.h, d=arch.d, k=arch.k, p=arch.p, act=str(args.get("act_layer", arch.act)),
                        in_chans=arch.in_chans, num_classes=arch.num_classes)
    if any(k != "dataset" for k in metrics or {}) and not (dataset or (metrics or {}).get("dataset")):
        raise ValueError("metrics need the data set they were measured on: pass dataset=... or metrics['dataset']")
    published = weights_sha256(reference.state_dict()) in variant.published_sha256
    names, descriptions, imagenet_names = _resolve_labels(labels, model, variant, arch.num_classes, dataset)

    # timm reads label names from config.json's top level or its pretrained_cfg; transformers reads only the top
    # level, and with none there it names 1000 classes with ImageNet-1k's readable descriptions ("tench, Tinca
    # tinca") itself. ImageNet-1k's synsets therefore stay inside pretrained_cfg (timm's inference.py prints
    # them, or their descriptions), where at the top level transformers would show "n01440764" instead.
    for key in ("label_names", "label_descriptions", "label_offset"):
        reference.pretrained_cfg.pop(key, None)
    model_config: dict[str, Any] = {}
    if names is not None and imagenet_names:
        reference.pretrained_cfg["label_names"] = list(names)
        if descriptions:
            reference.pretrained_cfg["label_descriptions"] = dict(descriptions)
    elif names is not None:
        model_config["label_names"] = list(names)
        if descriptions:
            model_config["label_descriptions"] = dict(descriptions)

    try:
        _write_staged(reference, out_dir, overwrite, variant, args, model_config, arch, metrics, metrics_note,
                      dataset, published, names)
    except OSError as exc:
        if exc.errno is None:  # ours (the output appeared meanwhile), already one line
            raise
        raise _write_error(exc, out_dir, existed) from exc
    except Exception as exc:
        from safetensors import SafetensorError

        if isinstance(exc, SafetensorError):
            raise _write_error(exc, out_dir, existed) from exc
        raise
    return out_dir


def _write_staged(reference: nn.Module, out_dir: Path, overwrite: bool, variant: Variant, args: dict[str, Any],
                  model_config: dict[str, Any], arch: Architecture, metrics: dict[str, float] | None,
                  metrics_note: str | None, dataset: str | None, published: bool,
                  names: tuple[str, ...] | None) -> None:
    """Write the folder beside ``out_dir``, reload and compare it, then move it into place."""
    from timm.models._hub import save_for_hf

    with _staging_dir(out_dir) as staging:
        try:
            save_for_hf(reference, str(staging), model_config=model_config, model_args=args, safe_serialization=True)
            _keep_differing_args(staging / CONFIG_NAME, _differing_args(variant, args))
        except (ValueError, TypeError) as exc:
            raise HubFolderError(f"could not write the folder: {exc}") from exc
        input_size = tuple(reference.pretrained_cfg.get("input_size", (3, arch.p * 32, arch.p * 32)))
        input_size = (arch.in_chans, *input_size[1:])
        card = render_model_card(
            repo_name=out_dir.name, variant=variant, arch=arch, input_size=input_size,
            global_pool=str(args.get("global_pool", "avg")),
            param_count=sum(t.numel() for t in reference.parameters()),
            metrics=metrics, metrics_note=metrics_note, dataset=dataset, published=published, labels=names,
        )
        (staging / CARD_NAME).write_text(card, encoding="utf-8")

        loaded = _load_folder(staging, run_forward=False)  # the forward below runs it
        loaded_state = loaded.state_dict()
        for key, expected in reference.state_dict().items():
            _assert_same(expected, loaded_state[key], f"tensor {key}")
        x = _probe_input(input_size, arch.p)
        with torch.inference_mode():
            _assert_same(reference(x), loaded(x), "the model output")
        _install(staging, out_dir, overwrite)


def malformed_token(token: str, source: str) -> str | None:
    """What is wrong with a Hub token, in one line that does not quote it; None for a well-formed one.

    A token goes into an HTTP header, which takes visible ASCII only: a control character (a ``\\r`` from a file
    saved on Windows, a tab), a space or a non-ASCII character makes the HTTP library refuse the header, quoting
    it, token and all.
    """
    for position, char in enumerate(token, 1):
        if "!" <= char <= "~":
            continue
        if char == " ":
            what = "a space"
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            what = f"a control character (0x{ord(char):02x})"
        else:
            what = "a non-ASCII character"
        return (f"the Hub token from {source} is malformed: character {position} of {len(token)} is {what}, and a "
                "token is printable ASCII with no spaces (hf_...); copy it again from "
                "https://huggingface.co/settings/tokens")
    return None


def _without(text: str, secret: str | None) -> str:
    # An HTTP library may quote the Authorization header it refused; a message of ours never repeats it.
    return text.replace(secret, "<token>") if secret else text


def _token_source() -> str:
    """Where huggingface_hub's ``get_token()`` finds the token when none is passed (for messages)."""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HF_TOKEN" if os.environ.get("HF_TOKEN") else "HUGGING_FACE_HUB_TOKEN"
    return "the stored login (`hf auth login`)"


def push_hub_folder(
        folder: str | os.PathLike[str],
        repo_id: str,
        *,
        token: str | None = None,
        endpoint: str | None = None,
        private: bool = False,
        revision: str | None = None,
        commit_message: str | None = None,
        verify: bool = True,
        allow_non_finite: bool = False,
) -> str:
    """Check that ``folder`` loads with timm, then upload it to ``repo_id``; return the commit URL.

    ``token`` and ``endpoint`` default to ``HF_TOKEN`` / ``HF_ENDPOINT`` (or the stored login), as in
    huggingface_hub. The repo is created if missing; ``revision`` names a branch, created if missing.
    ``verify=False`` skips the load and finiteness checks for a caller that has just run them itself. Weights
    holding NaN or infinite values are refused unless ``allow_non_finite``. A malformed token (a control character,
    a space) is refused before anything is sent, and no message quotes a token.
    """
    import json

    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from .models.checkpoint import non_finite_message, non_finite_tensors

    used = token or get_token()
    problem = used and malformed_token(used, "the token argument" if token else _token_source())
    if problem:
        raise HubPushError(problem)
    if verify:
        verify_hub_folder(folder)
        if not allow_non_finite:
            from safetensors.torch import load_file

            non_finite = non_finite_tensors(load_file(Path(folder) / WEIGHTS_NAME))
            if non_finite:
                raise HubFolderError(f"{Path(folder) / WEIGHTS_NAME}: {non_finite_message(non_finite)}; such weights "
                                     "give NaN outputs: pass allow_non_finite=True (--allow-non-finite) to publish "
                                     "them anyway")
    try:
        architecture = json.loads((Path(folder) / CONFIG_NAME).read_text())["architecture"]
    except (OSError, ValueError, KeyError) as exc:
        raise HubFolderError(f"{folder} has no readable {CONFIG_NAME}: {exc}") from exc
    api = HfApi(endpoint=endpoint or None, token=token or None, library_name="convmixer-timm")
    where = api.endpoint
    try:
        repo_url = api.create_repo(repo_id, private=private or None, exist_ok=True)
        repo_id = repo_url.repo_id
        # Create the branch only when missing: writing to an existing branch needs no branch-creation right.
        if revision and revision != "main" and not api.revision_exists(repo_id, revision):
            api.create_branch(repo_id, branch=revision)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=Path(folder), revision=revision,
            commit_message=commit_message or f"Add {architecture} weights (convmixer-timm)",
            ignore_patterns=[".*"],
        )
    except HfHubHTTPError as exc:
        from huggingface_hub import get_token

        status = getattr(getattr(exc, "response", None), "status_code", None)
        unauthorised = ("the token was rejected" if token or get_token() else "no token was found") + \
            ": set HF_TOKEN, run `hf auth login` or pass --token-stdin"
        hint = {
            401: unauthorised,
            403: "the token may not write to this repo: use a token with write access to it",
            404: "the repo or revision does not exist and could not be created",
        }.get(status, "see the server's message above")
        raise HubPushError(f"upload of {folder} to {repo_id} at {where} failed ({status}): "
                           f"{_without(str(exc).splitlines()[0], used)}; {hint}") from exc
    except OSError as exc:
        raise HubPushError(f"cannot reach the Hub at {where}: {_without(str(exc), used)}; check --endpoint / "
                           "HF_ENDPOINT and the network") from exc
    except Exception as exc:
        if type(exc).__module__.startswith(("httpx", "httpcore", "h11", "requests", "urllib3")):
            raise HubPushError(f"cannot reach the Hub at {where}: {type(exc).__name__}: {_without(str(exc), used)}; "
                               "check --endpoint / HF_ENDPOINT and the network") from exc
        raise
    return str(getattr(info, "commit_url", info))

"""Pretrained weights from the Hub: fail at once, and clearly, when they cannot be had.

With no network, huggingface_hub retries a download it cannot start for about 23 s (its back-off on a missing
local file), then raises a generic ``LocalEntryNotFoundError``; timm tries two file names, so
``timm.create_model("convmixer_768_32", pretrained=True)`` waited ~47 s for an error that named neither the repo
nor ``HF_HUB_OFFLINE``. Before timm downloads, ``check_pretrained_available`` asks the Hub once, without retries,
through huggingface_hub's own client (so ``HF_ENDPOINT``, proxies, the token and ``HF_HUB_ETAG_TIMEOUT`` apply),
unless a copy is cached. Any answer from the Hub, even an error, lets timm go on and report it as usual; no
answer, or ``HF_HUB_OFFLINE=1``, with nothing cached raises ``PretrainedWeightsUnavailableError`` naming the repo,
``HF_HUB_OFFLINE`` and how to load a local file instead.

Every file timm reads into one of our models gets the bounds ``convmixer-timm convert`` has. timm reads
``checkpoint_path=`` (``load_checkpoint``), ``pretrained_cfg_overlay=dict(file=...)``, ``local-dir:`` and Hub
weights (``load_pretrained``) and ``--resume`` (``resume_checkpoint``) with ``torch.load`` before any code of ours
runs, so nothing in the model can stop a zip checkpoint that inflates a 1 MiB file to 1 GiB. ``install_load_guards``
therefore wraps those three functions of timm: for a ConvMixer they mark the load, and the wrapped ``_torch_load``
(timm's one ``torch.load`` call site for these paths) checks the zip's central directory first. Loads into any
other model run exactly as before. Tensors of the wrong kind (integer or complex weights) are refused by the
model's ``load_state_dict`` pre-hook (``checkpoint.check_shapes_before_load``), whatever path they came by.
"""
from __future__ import annotations

import contextvars
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

from huggingface_hub.errors import LocalEntryNotFoundError

from .checkpoint import check_zip_inflation

__all__ = ["PretrainedWeightsUnavailableError", "check_pretrained_available", "install_load_guards"]

# What timm's load_state_dict_from_hf tries when the pretrained config names no file: safetensors first.
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


class PretrainedWeightsUnavailableError(LocalEntryNotFoundError):
    """Hub weights that are neither cached nor reachable. A ``LocalEntryNotFoundError`` (so a ``FileNotFoundError``),
    as huggingface_hub raises in the same situation, so existing ``except`` clauses keep working."""


def _hub_source(model_name: str, kwargs: Mapping[str, Any]) -> tuple[str, str | None, tuple[str, ...]] | None:
    """``(repo_id, revision, file names)`` when timm would load this model's weights from the Hub, else None."""
    from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
    from timm.models._hub import hf_split

    # The same resolution build_model_with_cfg does next, so a file=, url= or state_dict= override (or a
    # local-dir: folder) is never second-guessed here.
    cfg = resolve_pretrained_cfg(model_name, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
    load_from, location = _resolve_pretrained_source(cfg.to_dict())
    if load_from != "hf-hub" or not location:
        return None
    if isinstance(location, tuple):
        hub_id, files = location[0], (location[1],)
    else:
        hub_id, files = location, _HUB_FILES
    repo_id, revision = hf_split(hub_id)
    return repo_id, revision, files


def _message(model_name: str, repo_id: str, files: tuple[str, ...], reason: str) -> str:
    local = "/path/to/model.safetensors"
    return (
        f"cannot load pretrained weights for {model_name}: they are on the Hugging Face Hub as {repo_id} "
        f"({' or '.join(files)}), {reason}, and no copy is in the local cache. Connect to the Hub (HF_ENDPOINT "
        "may name a mirror; HF_HUB_OFFLINE=1 uses only the cache, so unset it to download), or load a local file "
        f"instead: timm.create_model({model_name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={local!r})) "
        f"or timm.create_model({model_name!r}, checkpoint_path={local!r}) (train.py: --pretrained-path / "
        "--initial-checkpoint); pretrained=False builds the model with random weights."
    )


def check_pretrained_available(model_name: str, kwargs: Mapping[str, Any]) -> None:
    """Raise ``PretrainedWeightsUnavailableError`` at once when ``timm.create_model(model_name, pretrained=True,
    **kwargs)`` would have to download Hub weights and cannot; return otherwise (also when nothing is to be
    downloaded)."""
    source = _hub_source(model_name, kwargs)
    if source is None:
        return
    repo_id, revision, files = source

    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    cache_dir = kwargs.get("cache_dir")
    for filename in files:
        if isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision), str):
            return  # cached: huggingface_hub falls back to the copy without waiting
    if constants.is_offline_mode():
        raise PretrainedWeightsUnavailableError(_message(model_name, repo_id, files, "HF_HUB_OFFLINE is set"))
    endpoint = constants.ENDPOINT
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, files[0], revision=revision), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except HfHubHTTPError:
        return  # the Hub answered (missing repo, no access...): timm's own download reports it
    except OfflineModeIsEnabled as exc:
        raise PretrainedWeightsUnavailableError(
            _message(model_name, repo_id, files, "HF_HUB_OFFLINE is set")) from exc
    except Exception as exc:
        if not isinstance(exc, OSError) and not type(exc).__module__.startswith(("httpx", "httpcore")):
            raise
        reason = f"the Hub at {endpoint} cannot be reached ({type(exc).__name__}: {exc})"
        raise PretrainedWeightsUnavailableError(_message(model_name, repo_id, files, reason)) from exc


# ---------------------------------------------------------------------------------------------------- load guards

# True while timm loads a file into one of our models (set per thread and per task, so a load into another
# model elsewhere in the process is never affected).
_LOADING_CONVMIXER: contextvars.ContextVar[bool] = contextvars.ContextVar("convmixer_timm_loading", default=False)
_GUARD_MARK = "__convmixer_timm_guard__"


def _is_convmixer(model: Any) -> bool:
    """A ConvMixer, also inside torch.compile's or DistributedDataParallel's wrapper (what train.py may pass)."""
    from .convmixer import ConvMixer  # imported here: convmixer.py imports this module

    for _ in range(3):
        if isinstance(model, ConvMixer):
            return True
        model = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
    return False


def _mark_convmixer_loads(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a timm loader whose first argument is the model: for a ConvMixer, reads inside it are checked."""
    @functools.wraps(original)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_convmixer(model):
            return original(model, *args, **kwargs)
        token = _LOADING_CONVMIXER.set(True)
        try:
            return original(model, *args, **kwargs)
        finally:
            _LOADING_CONVMIXER.reset(token)

    setattr(wrapper, _GUARD_MARK, True)
    return wrapper


def _bound_torch_load(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap timm's ``_torch_load``: while a ConvMixer is being loaded, refuse a zip bomb before ``torch.load``."""
    @functools.wraps(original)
    def wrapper(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        if _LOADING_CONVMIXER.get() and isinstance(checkpoint_path, (str, os.PathLike)):
            check_zip_inflation(checkpoint_path)
        return original(checkpoint_path, *args, **kwargs)

    setattr(wrapper, _GUARD_MARK, True)
    return wrapper


def install_load_guards() -> None:
    """Put the bounds of ``convert`` on every timm path that reads a checkpoint file into a ConvMixer.

    Idempotent. Each of timm's modules that holds its own reference to a loader (``from ._helpers import
    load_checkpoint``) is updated, so callers reach the guarded version however they imported timm's function,
    provided they did so after the plugin registered (the start-up hook registers it when timm is imported).
    """
    import importlib

    wraps = {
        "load_checkpoint": _mark_convmixer_loads,
        "load_pretrained": _mark_convmixer_loads,
        "resume_checkpoint": _mark_convmixer_loads,
        "_torch_load": _bound_torch_load,
    }
    # timm.utils' helpers import _torch_load from _helpers when called, so they get the guarded one too.
    for module_name in ("timm.models._helpers", "timm.models._builder", "timm.models._hub", "timm.models._factory",
                        "timm.models"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a timm without this module: nothing there to guard
            continue
        for name, wrap in wraps.items():
            current = getattr(module, name, None)
            if callable(current) and not getattr(current, _GUARD_MARK, False):
                setattr(module, name, wrap(current))


install_load_guards()

"""Pretrained weights from the Hub: fail at once, and clearly, when they cannot be had.

With no network, huggingface_hub retries a download it cannot start for about 23 s (its back-off on a missing
local file), then raises a generic ``LocalEntryNotFoundError``; timm tries two file names, so
``timm.create_model("convmixer_768_32", pretrained=True)`` waited ~47 s for an error that named neither the repo
nor ``HF_HUB_OFFLINE``. Before timm downloads, ``check_pretrained_available`` asks the Hub once, without retries,
through huggingface_hub's own client (so ``HF_ENDPOINT``, proxies, the token and ``HF_HUB_ETAG_TIMEOUT`` apply),
unless a copy is cached. Any answer from the Hub, even an error, lets timm go on and report it as usual; no
answer, or ``HF_HUB_OFFLINE=1``, with nothing cached raises ``PretrainedWeightsUnavailableError`` naming the repo,
``HF_HUB_OFFLINE`` and how to load a local file instead.

timm's loaders themselves are left as they are: they read a file for a ConvMixer as for any timm model. What the
model adds on every path is its ``load_state_dict`` pre-hook (``checkpoint.check_shapes_before_load``: layouts,
shapes, and tensors of the wrong kind, such as integer or complex weights) and, for pretrained weights, the
layout conversion of ``checkpoint.checkpoint_filter_fn``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from huggingface_hub.errors import LocalEntryNotFoundError

__all__ = ["PretrainedWeightsUnavailableError", "check_pretrained_available"]

# What timm's load_state_dict_from_hf tries when the pretrained config names no file: safetensors first.
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


class PretrainedWeightsUnavailableError(LocalEntryNotFoundError):
    """Hub weights that are neither cached nor reachable. A ``LocalEntryNotFoundError`` (so a ``FileNotFoundError``),
    as huggingface_hub raises in the same situation, so existing ``except`` clauses keep working."""


def _hub_source(model_name: str, kwargs: Mapping[str, Any]) -> tuple[str, str | None, tuple[str, ...]] | None:
    """``(repo_id, revision, file names)`` when timm would load this model's weights from the Hub, else None
    (also on a timm without the private helpers read here: then timm's own download reports what it finds)."""
    from timm.models import resolve_pretrained_cfg

    try:
        from timm.models._builder import _resolve_pretrained_source
        from timm.models._hub import hf_split
    except ImportError:
        return None

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

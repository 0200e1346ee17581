"""Point ``huggingface_hub`` (in this process and in child processes) at a given Hub endpoint and cache.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``... once, into
``huggingface_hub.constants``, when it is first imported; ``import timm`` (and so ``import convmixer_timm``)
already imports it. Setting environment variables afterwards therefore only reaches child processes.
``hub_environment`` sets the variables *and* patches every import-time copy that matters in 2.4:

* ``constants.ENDPOINT`` and ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (``hf_hub_download`` URLs);
* ``huggingface_hub.hf_api.api.endpoint``: the module-level ``HfApi`` behind ``huggingface_hub.model_info``,
  ``create_repo``, ``upload_folder``... (``HfApi()`` objects built earlier keep their old endpoint);
* the trusted-host sets (``constants.HF_URL_HOSTS``, ``utils._http._HUB_ORIGINS``);
* cache and token paths (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ASSETS_CACHE``, ``HF_XET_CACHE``,
  ``HF_TOKEN_PATH``, plus the copies in ``utils._cache_manager`` / ``utils._cache_assets``), so a developer's
  real cache and stored token are never touched or sent;
* ``HF_HUB_OFFLINE`` forced off and telemetry forced off.

Everything is restored on exit, and the shared HTTP client is closed on entry and exit so no pooled
connection to another server is reused.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["HubEnvironment", "hub_env_vars", "hub_environment"]

# Variables that would override ours or leak the developer's setup into the test.
_UNSET_VARS = (
    "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HUGGINGFACE_CO_STAGING",
    "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN", "HF_HUB_ETAG_TIMEOUT",
)


@dataclass(frozen=True)
class HubEnvironment:
    """Where ``hub_environment`` pointed the client."""

    endpoint: str
    home: Path
    hub_cache: Path
    token: str | None
    env: Mapping[str, str]

    def repo_cache(self, repo_id: str, repo_type: str = "model") -> Path:
        """The cache folder of one repo, e.g. ``<hub_cache>/models--org--name``."""
        return self.hub_cache / "--".join([f"{repo_type}s", *repo_id.split("/")])


def hub_env_vars(endpoint: str, cache_dir: str | os.PathLike[str], token: str | None = None) -> dict[str, str]:
    """Environment variables that point a *fresh* ``huggingface_hub`` process at ``endpoint``.

    ``cache_dir`` plays the role of ``HF_HOME``; the download cache is ``cache_dir/hub``. To run a child
    process, start from ``os.environ``, drop ``HF_TOKEN`` when ``token`` is None, and add these.
    """
    home = Path(cache_dir).resolve()
    env = {
        "HF_ENDPOINT": endpoint.rstrip("/"),
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def _patch(target: Any, name: str, value: Any, saved: list[tuple[Any, str, Any]]) -> None:
    saved.append((target, name, getattr(target, name)))
    setattr(target, name, value)


@contextmanager
def hub_environment(
    endpoint: str, cache_dir: str | os.PathLike[str], token: str | None = None
) -> Iterator[HubEnvironment]:
    """Point ``huggingface_hub`` at ``endpoint`` with ``cache_dir`` as ``HF_HOME``, then restore everything.

    ``token`` becomes ``HF_TOKEN`` (sent as ``Authorization: Bearer <token>``); with None no token is sent.
    Child processes started inside the block inherit the same settings through the environment.
    """
    env = hub_env_vars(endpoint, cache_dir, token)
    home = Path(env["HF_HOME"])
    home.mkdir(parents=True, exist_ok=True)

    old_env = {key: os.environ.get(key) for key in (*env, "HF_TOKEN", *_UNSET_VARS)}
    saved: list[tuple[Any, str, Any]] = []
    try:
        for key in ("HF_TOKEN", *_UNSET_VARS):
            os.environ.pop(key, None)
        os.environ.update(env)

        from huggingface_hub import constants

        http = importlib.import_module("huggingface_hub.utils._http")
        hf_api = importlib.import_module("huggingface_hub.hf_api")
        cache_manager = importlib.import_module("huggingface_hub.utils._cache_manager")
        cache_assets = importlib.import_module("huggingface_hub.utils._cache_assets")

        url = env["HF_ENDPOINT"]
        host = (urlsplit(url).hostname or "").lower()
        for name, value in {
            "ENDPOINT": url,
            "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_URL_HOSTS": constants.HF_URL_HOSTS | {host},
            "HF_HOME": env["HF_HOME"],
            "HF_HUB_CACHE": env["HF_HUB_CACHE"],
            "HUGGINGFACE_HUB_CACHE": env["HF_HUB_CACHE"],
            "HF_ASSETS_CACHE": env["HF_ASSETS_CACHE"],
            "HUGGINGFACE_ASSETS_CACHE": env["HF_ASSETS_CACHE"],
            "HF_XET_CACHE": env["HF_XET_CACHE"],
            "HF_TOKEN_PATH": env["HF_TOKEN_PATH"],
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_ETAG_TIMEOUT": constants.DEFAULT_ETAG_TIMEOUT,
        }.items():
            _patch(constants, name, value, saved)
        _patch(http, "_HUB_ORIGINS", http._HUB_ORIGINS | {http._url_origin(url)}, saved)
        _patch(hf_api.api, "endpoint", url, saved)
        _patch(cache_manager, "HF_HUB_CACHE", env["HF_HUB_CACHE"], saved)
        _patch(cache_assets, "HF_ASSETS_CACHE", env["HF_ASSETS_CACHE"], saved)
        http.close_session()

        yield HubEnvironment(
            endpoint=url, home=home, hub_cache=Path(env["HF_HUB_CACHE"]), token=token, env=dict(env)
        )
    finally:
        for target, name, value in reversed(saved):
            setattr(target, name, value)
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if saved:
            importlib.import_module("huggingface_hub.utils._http").close_session()

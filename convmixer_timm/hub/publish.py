"""Publishing a Hub folder: token checks that never quote the token, and the upload with huggingface_hub."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .folder import verify_hub_folder
from .format import CONFIG_NAME, WEIGHTS_NAME, HubFolderError

__all__ = ["HubPushError", "check_push_target", "malformed_token", "push_hub_folder", "token_source"]


class HubPushError(RuntimeError):
    """Publishing a folder to the Hub failed; the message names the cause and the fix."""


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


def token_source() -> str:
    """Where huggingface_hub's ``get_token()`` finds the token when none is passed (for messages)."""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HF_TOKEN" if os.environ.get("HF_TOKEN") else "HUGGING_FACE_HUB_TOKEN"
    return "the stored login (`hf auth login`)"


def check_push_target(repo_id: str, endpoint: str | None = None, revision: str | None = None) -> None:
    """Refuse, before anything is sent, a repo id the Hub would refuse, an endpoint that is no http(s) URL and
    a revision holding control characters; raises ``ValueError`` naming the value and the fix."""
    from urllib.parse import urlsplit

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from ..labels import check_text

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        reason = (str(exc).splitlines() or ["invalid"])[0]
        raise ValueError(f"{repo_id!r} is not a Hub repo id ({reason}); give ORG/NAME, e.g. me/convmixer_768_32") \
            from None
    if endpoint:
        try:
            parts = urlsplit(endpoint)
            parts.port  # noqa: B018 (raises ValueError for a port that is not a number in range)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            valid = False
        if not valid or any(c.isspace() or ord(c) < 0x20 for c in endpoint):
            raise ValueError(f"the endpoint {endpoint!r} is not an http(s) URL; give one like https://huggingface.co")
    if revision is not None:
        check_text(revision, "the revision")
        if not revision.strip():
            raise ValueError("the revision is empty; name a branch, e.g. main")


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
    a space) is refused before anything is sent, and no message quotes a token; so are a repo id, endpoint or
    revision that ``check_push_target`` refuses (``ValueError``).
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from ..models.checkpoint import non_finite_message, non_finite_tensors

    check_push_target(repo_id, endpoint, revision)
    used = token or get_token()
    problem = used and malformed_token(used, "the token argument" if token else token_source())
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

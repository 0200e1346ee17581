"""Offline is clear and quick: ``pretrained=True`` with no network fails at once, naming the
Hub repo, ``HF_HUB_OFFLINE`` and how to load a local file; cached weights and local files still load.

"No network" is real here: a closed port on 127.0.0.1 (connection refused), ``HF_HUB_OFFLINE=1``, and a listener
that accepts connections but never answers (a black-holed network), which also counts the attempts: one, with no
retries.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from hub_env import hub_env_vars, hub_environment
from hub_server import LocalHub
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError

from convmixer_timm.models.pretrained import PretrainedWeightsUnavailableError

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(dim=16, depth=1)

_SCRIPT = textwrap.dedent("""
    import json, timm
    try:
        timm.create_model("convmixer_768_32", pretrained=True)
    except Exception as exc:
        print(json.dumps({"mro": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}))
    else:
        print(json.dumps({"mro": None}))
""")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_clear(message: str, repo_id: str, model_name: str) -> None:
    assert f"cannot load pretrained weights for {model_name}" in message
    assert f"on the Hugging Face Hub as {repo_id}" in message
    assert "HF_HUB_OFFLINE" in message
    assert "pretrained_cfg_overlay=dict(file=" in message and "checkpoint_path=" in message


@pytest.mark.slow
def test_hf_hub_offline_fails_at_once_naming_repo_and_local_files(tmp_path):
    """The issue's own call, in a fresh process (huggingface_hub reads HF_HUB_OFFLINE when imported)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    env.update(hub_env_vars("https://huggingface.co", tmp_path / "offline"), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO_ROOT))
    # The timeout is a hang guard, not a speed check.
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["mro"] and outcome["mro"][:2] == ["PretrainedWeightsUnavailableError", "LocalEntryNotFoundError"]
    assert_clear(outcome["message"], "timm/convmixer_768_32.in1k", "convmixer_768_32")
    assert "HF_HUB_OFFLINE is set" in outcome["message"]


def test_refused_connection_fails_at_once_naming_repo_offline_and_local_files(tmp_path):
    port = closed_port()
    with hub_environment(f"http://127.0.0.1:{port}", tmp_path / "home"):
        with pytest.raises(LocalEntryNotFoundError) as info:  # what huggingface_hub raises here, made clear
            timm.create_model("convmixer_768_32", pretrained=True)
    assert type(info.value) is PretrainedWeightsUnavailableError
    message = str(info.value)
    assert_clear(message, "timm/convmixer_768_32.in1k", "convmixer_768_32")
    assert f"the Hub at http://127.0.0.1:{port} cannot be reached (ConnectError" in message
    assert "Connection refused" in message


@pytest.fixture
def black_hole() -> Iterator[dict]:
    """A TCP listener that accepts every connection and never answers; counts the connections."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    state: dict = {"accepted": 0, "conns": [], "port": server.getsockname()[1]}

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            state["accepted"] += 1
            state["conns"].append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield state
    server.close()
    for conn in state["conns"]:
        conn.close()


def test_unanswered_hub_is_asked_once_without_retries(black_hole, tmp_path):
    endpoint = f"http://127.0.0.1:{black_hole['port']}"
    with hub_environment(endpoint, tmp_path / "home"):
        saved = constants.HF_HUB_ETAG_TIMEOUT
        constants.HF_HUB_ETAG_TIMEOUT = 1  # HF_HUB_ETAG_TIMEOUT bounds the one attempt
        try:
            with pytest.raises(PretrainedWeightsUnavailableError) as info:
                timm.create_model("convmixer_768_32", pretrained=True, **SMALL)
        finally:
            constants.HF_HUB_ETAG_TIMEOUT = saved
    assert_clear(str(info.value), "timm/convmixer_768_32.in1k", "convmixer_768_32")
    assert f"the Hub at {endpoint} cannot be reached" in str(info.value)
    assert black_hole["accepted"] == 1


def test_cached_weights_and_local_files_still_load_without_network(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("convmixer_768_32", **SMALL).eval()
    data = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})
    overlay = dict(hf_hub_id="org/small")
    with LocalHub(tmp_path / "hub") as hub, hub_environment(hub.endpoint, tmp_path / "home"):
        hub.add_file("org/small", "model.safetensors", data)
        first = timm.create_model("convmixer_768_32", pretrained=True, pretrained_cfg_overlay=overlay, **SMALL)
        hub.stop()  # from here on: connection refused
        cached = timm.create_model("convmixer_768_32", pretrained=True, pretrained_cfg_overlay=overlay, **SMALL)
        with pytest.raises(LocalEntryNotFoundError, match="org/other"):
            timm.create_model("convmixer_768_32", pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id="org/other"),
                              **SMALL)
        path = tmp_path / "local.safetensors"
        path.write_bytes(data)
        local = timm.create_model("convmixer_768_32", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                  **SMALL)
        direct = timm.create_model("convmixer_768_32", checkpoint_path=str(path), **SMALL)
    expected = model.state_dict()
    for loaded in (first, cached, local, direct):
        state = loaded.state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected.items())

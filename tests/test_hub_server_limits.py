"""The test Hub server behaves like a server (issue 9, item 7): tokens checked before bodies are read, bounded
bodies, repos written and deleted only by their owner, 4xx for bad requests, and a start that imports no torch.

Raw requests go through ``http.client`` to a real ``LocalHub`` on 127.0.0.1; the client side of ownership goes
through the real ``huggingface_hub`` client.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from convmixer_timm.testing.hub_env import hub_environment
from convmixer_timm.testing.hub_server import LocalHub

REPO_ROOT = Path(__file__).resolve().parents[1]
ALICE, BOB = "hf_alice_token", "hf_bob_token"
LIMIT = 1 << 20


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LocalHub]:
    with LocalHub(tmp_path / "root", tokens={ALICE: "alice", BOB: "bob"}, max_body_bytes=LIMIT) as server:
        yield server


def connect(hub: LocalHub) -> http.client.HTTPConnection:
    # The timeout is a hang guard: a server that waited for the body would never answer.
    return http.client.HTTPConnection("127.0.0.1", hub.port, timeout=30)


def send_headers_only(hub: LocalHub, method: str, path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    """Send a request's headers and none of the body they announce, then read the answer."""
    conn = connect(hub)
    conn.putrequest(method, path)
    for key, value in headers.items():
        conn.putheader(key, value)
    conn.endheaders()
    response = conn.getresponse()
    response.read()
    return response


def request(hub: LocalHub, method: str, path: str, body: bytes = b"", token: str | None = ALICE,
            headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = connect(hub)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=all_headers)
    response = conn.getresponse()
    data = response.read()
    return response.status, json.loads(data) if data else {}


# ---------------------------------------------------------------------------------------------------- bodies


@pytest.mark.parametrize("path", ["/api/repos/create", "/api/models/alice/repo/commit/main",
                                  "/api/models/alice/repo/preupload/main"])
def test_unauthenticated_large_post_is_refused_before_the_body_is_read(hub, path):
    hub.create_repo("alice/repo", owner_token=ALICE)
    response = send_headers_only(hub, "POST", path, {"Content-Length": str(300 << 20)})
    assert response.status == 401
    assert response.getheader("Connection") == "close"  # the unread body must not be taken for a request
    assert hub.requests[-1].path == path


def test_non_owner_large_commit_is_refused_before_the_body_is_read(hub):
    hub.create_repo("alice/repo", owner_token=ALICE)
    response = send_headers_only(hub, "POST", "/api/models/alice/repo/commit/main",
                                 {"Authorization": f"Bearer {BOB}", "Content-Length": str(300 << 20)})
    assert response.status == 403
    response = send_headers_only(hub, "POST", "/api/models/alice/repo/commit/main",
                                 {"Authorization": "Bearer not-a-known-token", "Content-Length": str(300 << 20)})
    assert response.status == 401


def test_bodies_over_the_limit_get_413_unread(hub):
    hub.create_repo("alice/repo", owner_token=ALICE)
    response = send_headers_only(hub, "POST", "/api/models/alice/repo/commit/main",
                                 {"Authorization": f"Bearer {ALICE}", "Content-Length": str(LIMIT + 1)})
    assert response.status == 413
    assert f"{LIMIT:,} bytes" in response.getheader("X-Error-Message")

    # A chunked body announcing a chunk beyond the limit is refused at the chunk header.
    conn = connect(hub)
    conn.putrequest("POST", "/api/models/alice/repo/commit/main")
    conn.putheader("Authorization", f"Bearer {ALICE}")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(f"{LIMIT + 1:x}\r\n".encode())
    response = conn.getresponse()
    response.read()
    assert response.status == 413

    # At the limit, a commit is read and applied.
    line = json.dumps({"key": "header", "value": {"summary": "small"}}).encode()
    status, payload = request(hub, "POST", "/api/models/alice/repo/commit/main", line,
                              headers={"Content-Type": "application/x-ndjson"})
    assert status == 200 and payload["success"] is True


# ---------------------------------------------------------------------------------------------------- owners


def test_only_the_owner_writes_deletes_or_reads_private(hub, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with hub_environment(hub.endpoint, tmp_path / "alice", token=ALICE):
        assert HfApi().whoami()["name"] == "alice"
        HfApi().create_repo("alice/model", private=True)
        HfApi().upload_folder(repo_id="alice/model", folder_path=folder)
    with hub_environment(hub.endpoint, tmp_path / "bob", token=BOB):
        api = HfApi()
        assert api.whoami()["name"] == "bob"
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("alice/model")  # private: hidden from everyone but its owner
        with pytest.raises(HfHubHTTPError) as denied:
            api.upload_folder(repo_id="alice/model", folder_path=folder, commit_message="bob was here")
        assert denied.value.response.status_code in (403, 404)
        with pytest.raises(HfHubHTTPError) as denied:
            api.delete_repo("alice/model")
        assert denied.value.response.status_code == 403
    assert hub.list_files("alice/model") == [".gitattributes", "config.json"]

    # A public repo (seeded from Python with an owner): Bob reads it, still cannot write or delete it.
    hub.create_repo("alice/public", owner_token=ALICE)
    status, _ = request(hub, "GET", "/api/models/alice/public", token=BOB)
    assert status == 200
    line = json.dumps({"key": "header", "value": {"summary": "x"}}).encode()
    assert request(hub, "POST", "/api/models/alice/public/commit/main", line, token=BOB)[0] == 403
    assert request(hub, "DELETE", "/api/repos/delete", json.dumps({"name": "alice/public"}).encode(),
                   token=BOB)[0] == 403
    # Seeded without an owner: readable by all, writable by none.
    hub.add_file("org/seeded", "config.json", b"{}")
    assert request(hub, "POST", "/api/models/org/seeded/commit/main", line)[0] == 403
    assert request(hub, "DELETE", "/api/repos/delete", json.dumps({"name": "public", "organization": "alice"})
                   .encode())[0] == 200
    assert request(hub, "GET", "/api/models/alice/public", token=None)[0] == 404


def test_unknown_tokens_are_refused_everywhere(hub):
    hub.add_file("org/seeded", "config.json", b"{}")
    assert request(hub, "GET", "/api/models/org/seeded", token=None)[0] == 200
    assert request(hub, "GET", "/api/models/org/seeded", token="forged")[0] == 401
    assert request(hub, "GET", "/api/whoami-v2", token="forged")[0] == 401
    assert request(hub, "POST", "/api/repos/create", json.dumps({"name": "x"}).encode(), token="forged")[0] == 401


# ---------------------------------------------------------------------------------------------------- bad requests


BAD_REQUESTS = {
    "unknown repo type on create": ("POST", "/api/repos/create", {"name": "x", "type": "rocket"}),
    "unknown repo type on delete": ("DELETE", "/api/repos/delete", {"name": "x", "type": "rocket"}),
    "repo name not a string": ("POST", "/api/repos/create", {"name": 3}),
    "organization not a string": ("POST", "/api/repos/create", {"name": "x", "organization": ["a"]}),
    "invalid repo name": ("POST", "/api/repos/create", {"name": "../../etc"}),
    "delete without a name": ("DELETE", "/api/repos/delete", {}),
    "body is a list": ("POST", "/api/repos/create", ["x"]),
    "body is not JSON": ("POST", "/api/repos/create", b"{nope"),
    "commit line not an object": ("POST", "/api/models/alice/repo/commit/main", b"[1, 2]"),
    "commit value not an object": ("POST", "/api/models/alice/repo/commit/main", {"key": "file", "value": 3}),
    "commit file without path": ("POST", "/api/models/alice/repo/commit/main", {"key": "file", "value": {}}),
    "commit content not base64": (
        "POST", "/api/models/alice/repo/commit/main",
        b'{"key": "header", "value": {"summary": "s"}}\n{"key": "file", "value": {"path": "a", "content": "%%"}}'),
    "unknown route": ("GET", "/api/rockets/x", None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_4xx_not_500(hub, case):
    hub.create_repo("alice/repo", owner_token=ALICE)
    method, path, payload = BAD_REQUESTS[case]
    body = payload if isinstance(payload, bytes) else b"" if payload is None else json.dumps(payload).encode()
    status, answer = request(hub, method, path, body)
    assert 400 <= status < 500, (status, answer)
    assert "internal error" not in json.dumps(answer)


def test_invalid_content_length_is_400(hub):
    response = send_headers_only(hub, "POST", "/api/repos/create",
                                 {"Authorization": f"Bearer {ALICE}", "Content-Length": "lots"})
    assert response.status == 400


# ---------------------------------------------------------------------------------------------------- start-up


def test_server_module_starts_without_importing_torch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "convmixer_timm.testing.hub_server", "--root",
         str(tmp_path / "root"), "--token", f"{ALICE}=alice"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = process.stdout.readline()  # blocks until the server prints its address (or exits)
        assert first.startswith("LocalHub serving"), (first, process.stderr.read() if process.poll() else "")
        endpoint = first.split(" at ")[1].strip()
        conn = http.client.HTTPConnection(endpoint.removeprefix("http://"), timeout=30)
        conn.request("GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {ALICE}"})
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["name"] == "alice"
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    assert {"convmixer_timm", "convmixer_timm.testing"} <= imported  # run as __main__, the server is not listed
    heavy = sorted(name for name in imported if name.split(".")[0] in ("torch", "timm", "huggingface_hub",
                                                                       "numpy", "safetensors"))
    assert heavy == [], heavy
    assert ALICE not in stderr and ALICE not in stdout


def test_importing_the_package_registers_with_timm_when_timm_loads():
    """Lazy package import: nothing heavy at `import convmixer_timm`, models registered as timm loads."""
    code = ("import sys, convmixer_timm; assert 'torch' not in sys.modules, 'torch imported';"
            "import timm; print('convmixer_256_8_ks5_p2' in timm.list_models(),"
            " convmixer_timm.ConvMixer.__module__, convmixer_timm.__version__)")
    env = {**os.environ, "CONVMIXER_TIMM_AUTOLOAD": "0", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "convmixer_timm.models.convmixer", "0.1.0"]

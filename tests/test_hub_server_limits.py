"""The test Hub server behaves like a server (issue 9, item 7; issue 13, item 4): tokens checked before bodies
are read, bounded bodies, repos created only in the caller's namespace and written and deleted only by their
owner, every acknowledged commit kept, many clients at once, slow clients dropped, 4xx for bad requests, and a
start that imports no torch.

Raw requests go through ``http.client`` to a real ``LocalHub`` on 127.0.0.1; the client side of ownership and
commits goes through the real ``huggingface_hub`` client. Waits are bounded by counts (``waiting.py``); the
socket timeouts are hang guards only.
"""
from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hub_server
import pytest
from hub_env import hub_environment
from hub_server import HubError, LocalHub
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[1]
ALICE, BOB = "hf_alice_token", "hf_bob_token"
LIMIT = 1 << 20


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LocalHub]:
    with LocalHub(tmp_path / "root", tokens={ALICE: "alice", BOB: "bob"}, orgs={"bob": ["team"]},
                  max_body_bytes=LIMIT) as server:
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
    conn.close()  # a kept-alive connection would hold one of the server's connection slots a while
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


def test_repos_are_created_only_in_the_callers_namespace_or_its_organizations(hub, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text('{"by": "alice"}')
    with hub_environment(hub.endpoint, tmp_path / "alice", token=ALICE):
        HfApi().create_repo("alice/model")
        HfApi().upload_folder(repo_id="alice/model", folder_path=folder)
        with pytest.raises(HfHubHTTPError) as denied:
            HfApi().create_repo("team/alice-was-here")  # an organization alice is not a member of
        assert denied.value.response.status_code == 403
    with hub_environment(hub.endpoint, tmp_path / "bob", token=BOB):
        api = HfApi()
        assert [org["name"] for org in api.whoami()["orgs"]] == ["team"]
        for squat in ("alice/other", "local-user/x", "team2/x"):
            with pytest.raises(HfHubHTTPError) as denied:
                api.create_repo(squat)
            assert denied.value.response.status_code == 403, squat
        assert api.create_repo("bob/own").repo_id == "bob/own"
        assert api.create_repo("team/shared").repo_id == "team/shared"
        assert api.create_repo("implicit").repo_id == "bob/implicit"  # no namespace: the caller's own
    # The raw form of the squat, with the organization as a separate field.
    status, answer = request(hub, "POST", "/api/repos/create", json.dumps({"name": "x", "organization": "alice"})
                             .encode(), token=BOB)
    assert status == 403, answer
    with pytest.raises(HubError) as missing:
        hub.head("alice/x")
    assert missing.value.status == 404
    with pytest.raises(HubError):
        hub.head("alice/other")
    assert hub.read_file("alice/model", "config.json") == b'{"by": "alice"}'


def commit_body(summary: str, files: dict[str, bytes]) -> bytes:
    lines = [{"key": "header", "value": {"summary": summary}}]
    lines += [{"key": "file", "value": {"path": path, "encoding": "base64",
                                        "content": base64.b64encode(data).decode()}} for path, data in files.items()]
    return b"\n".join(json.dumps(line).encode() for line in lines)


def test_a_commit_is_applied_on_the_head_of_the_moment_it_is_applied(hub):
    """A commit whose body arrives after another commit landed keeps that commit's files (no stale parent)."""
    hub.create_repo("alice/repo", owner_token=ALICE)
    path = "/api/models/alice/repo/commit/main"
    slow_body = commit_body("slow", {"slow.txt": b"slow"})
    slow = connect(hub)
    slow.putrequest("POST", path)
    for key, value in {"Authorization": f"Bearer {ALICE}", "Content-Type": "application/x-ndjson",
                       "Content-Length": str(len(slow_body))}.items():
        slow.putheader(key, value)
    slow.endheaders()  # headers only: the server checks the owner, then waits for the body
    wait_until(lambda: any(r.path == path for r in hub.requests), "the server receiving the slow commit's headers")

    status, answer = request(hub, "POST", path, commit_body("fast", {"fast.txt": b"fast"}),
                             headers={"Content-Type": "application/x-ndjson"})
    assert status == 200, answer
    slow.send(slow_body)
    response = slow.getresponse()
    answer = json.loads(response.read())
    assert response.status == 200, answer
    assert hub.head("alice/repo") == answer["commitOid"]
    assert hub.list_files("alice/repo") == [".gitattributes", "fast.txt", "slow.txt"]


def test_concurrent_commits_answered_200_are_all_on_main(hub, tmp_path):
    hub.create_repo("alice/many", owner_token=ALICE)
    names = [f"file-{i:02d}.txt" for i in range(20)]
    with hub_environment(hub.endpoint, tmp_path / "alice", token=ALICE):
        api = HfApi()

        def upload(name: str) -> str:
            return api.upload_file(path_or_fileobj=name.encode(), path_in_repo=name, repo_id="alice/many").oid

        with ThreadPoolExecutor(len(names)) as pool:
            oids = list(pool.map(upload, names))
    assert len(set(oids)) == len(names)  # every upload made its own commit, and was answered
    assert hub.list_files("alice/many") == [".gitattributes", *names]
    for name in names:
        assert hub.read_file("alice/many", name) == name.encode()


def test_a_burst_of_fifty_connections_waits_in_the_listen_queue(tmp_path):
    # The server's socket is listening but nothing accepts yet, as when a burst arrives faster than the accept
    # loop: every handshake must still complete in the kernel's queue. With socketserver's default backlog of 5
    # the sixth and later connects are dropped (then reset, or stuck until the hang guard fires).
    server = hub_server._Server(("127.0.0.1", 0), hub_server._Handler)
    server.hub = LocalHub(tmp_path / "root")
    clients: list[socket.socket] = []
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    try:
        for _ in range(50):
            clients.append(socket.create_connection(server.server_address, timeout=30))  # 30 s: hang guard
        serving.start()
        for sock in clients:
            sock.sendall(b"GET /api/whoami-v2 HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer t\r\n"
                         b"Connection: close\r\n\r\n")
        for sock in clients:
            answer = b"".join(iter(lambda sock=sock: sock.recv(65536), b""))
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    finally:
        if serving.is_alive():  # shutdown() waits for serve_forever, forever if it never started
            server.shutdown()
        server.server_close()
        for sock in clients:
            sock.close()


def test_connections_beyond_the_limit_get_503_instead_of_a_thread(tmp_path):
    with LocalHub(tmp_path / "root", max_connections=2) as hub:
        # Two clients connect and send nothing: each holds one of the two connections served at once.
        idle = [socket.create_connection(("127.0.0.1", hub.port), timeout=30) for _ in range(2)]
        status, answer = request(hub, "GET", "/api/whoami-v2")
        assert status == 503, answer
        for sock in idle:
            sock.close()
        # Their threads end with their connections; then requests are served again.
        wait_until(lambda: request(hub, "GET", "/api/whoami-v2")[0] == 200, "a connection freeing up")


def test_idle_and_stalled_clients_are_dropped_after_the_timeout(tmp_path):
    with LocalHub(tmp_path / "root", timeout=1.0) as hub:
        # Half a request line, then nothing: the server closes the connection once its timeout passes.
        stalled = socket.create_connection(("127.0.0.1", hub.port), timeout=120)  # 120 s: hang guard
        stalled.sendall(b"GET /api/whoami-v2 HT")
        assert stalled.recv(1024) == b""
        stalled.close()
        wait_until(lambda: hub.open_connections == 0, "the stalled client's thread ending")
        # A body announced and never sent: dropped the same way, with nothing created.
        conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=120)
        conn.putrequest("POST", "/api/repos/create")
        for key, value in {"Authorization": f"Bearer {ALICE}", "Content-Length": "100"}.items():
            conn.putheader(key, value)
        conn.endheaders()
        conn.send(b'{"name": ')
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            conn.getresponse()
        wait_until(lambda: hub.open_connections == 0, "the stalled upload's thread ending")
        assert not (hub.root / "models").exists()


# ---------------------------------------------------------------------------------------------------- bad requests


BAD_REQUESTS = {
    "unknown repo type on create": ("POST", "/api/repos/create", {"name": "x", "type": "rocket"}),
    "unknown repo type on delete": ("DELETE", "/api/repos/delete", {"name": "x", "type": "rocket"}),
    "repo name not a string": ("POST", "/api/repos/create", {"name": 3}),
    "organization not a string": ("POST", "/api/repos/create", {"name": "x", "organization": ["a"]}),
    "invalid repo name": ("POST", "/api/repos/create", {"name": "../../etc"}),
    "repo type not a string on create": ("POST", "/api/repos/create", {"name": "x", "type": ["model"]}),
    "repo type not a string on delete": ("DELETE", "/api/repos/delete", {"name": "x", "type": {"a": 1}}),
    "private not a boolean": ("POST", "/api/repos/create", {"name": "x", "private": "yes"}),
    "unknown visibility": ("POST", "/api/repos/create", {"name": "x", "visibility": "secret"}),
    "empty organization": ("POST", "/api/repos/create", {"name": "x", "organization": ""}),
    "JSON nested too deep": ("POST", "/api/repos/create", b"[" * 100_000 + b"]" * 100_000),
    "preupload files not a list": ("POST", "/api/models/alice/repo/preupload/main", {"files": "a"}),
    "preupload file not an object": ("POST", "/api/models/alice/repo/preupload/main", {"files": [3]}),
    "preupload file without path": ("POST", "/api/models/alice/repo/preupload/main", {"files": [{"size": 3}]}),
    "commit summary not a string": ("POST", "/api/models/alice/repo/commit/main",
                                    {"key": "header", "value": {"summary": ["s"]}}),
    "commit parent not a string": ("POST", "/api/models/alice/repo/commit/main",
                                   {"key": "header", "value": {"summary": "s", "parentCommit": 5}}),
    "commit description not a string": ("POST", "/api/models/alice/repo/commit/main",
                                        {"key": "header", "value": {"summary": "s", "description": {}}}),
    "commit file encoding unknown": (
        "POST", "/api/models/alice/repo/commit/main",
        b'{"key": "header", "value": {"summary": "s"}}\n'
        b'{"key": "file", "value": {"path": "a", "content": "x", "encoding": 7}}'),
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


@pytest.mark.parametrize("length", ["lots", "-5"])
def test_invalid_content_length_is_400(hub, length):
    response = send_headers_only(hub, "POST", "/api/repos/create",
                                 {"Authorization": f"Bearer {ALICE}", "Content-Length": length})
    assert response.status == 400


def test_negative_chunk_size_is_400(hub):
    conn = connect(hub)
    conn.putrequest("POST", "/api/repos/create")
    conn.putheader("Authorization", f"Bearer {ALICE}")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"-5\r\n")
    response = conn.getresponse()
    response.read()
    assert response.status == 400


# ---------------------------------------------------------------------------------------------------- start-up


def test_the_test_server_is_not_part_of_the_package():
    assert importlib.util.find_spec("convmixer_timm.testing") is None


def test_server_script_starts_without_importing_torch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", str(Path(__file__).with_name("hub_server.py")), "--root",
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
    assert "http.server" in imported  # the listing is there (the script itself runs as __main__, unlisted)
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

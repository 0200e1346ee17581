"""The offline Hub server against the real ``huggingface_hub`` client: downloads, uploads, errors, faults."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from hub_env import HubEnvironment, hub_environment
from hub_server import LocalHub
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

TOKEN = "hf_local_test_token"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LocalHub]:
    with LocalHub(tmp_path / "hub-root") as server:
        yield server


@pytest.fixture
def hf_env(hub: LocalHub, tmp_path: Path) -> Iterator[HubEnvironment]:
    with hub_environment(hub.endpoint, tmp_path / "hf-home", token=TOKEN) as env:
        yield env


def _files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def test_download_seeded_file(hub: LocalHub, hf_env: HubEnvironment) -> None:
    config = json.dumps({"architecture": "convmixer_768_32"}).encode()
    weights = os.urandom(4096)
    hub.add_file("org/convmixer", "config.json", config)
    sha = hub.add_file("org/convmixer", "model.safetensors", weights)

    config_path = Path(hf_hub_download("org/convmixer", "config.json"))
    weights_path = Path(hf_hub_download("org/convmixer", "model.safetensors"))

    assert config_path.read_bytes() == config
    assert weights_path.read_bytes() == weights
    assert config_path.parent == hf_env.repo_cache("org/convmixer") / "snapshots" / sha
    # As on the Hub: LFS-pattern files are cached under their sha256, others under their git blob id.
    blobs = hf_env.repo_cache("org/convmixer") / "blobs"
    assert weights_path.resolve() == blobs / hashlib.sha256(weights).hexdigest()
    assert config_path.resolve().parent == blobs
    assert hub.last_authorization == f"Bearer {TOKEN}"


def test_create_repo_upload_folder_round_trip(hub: LocalHub, hf_env: HubEnvironment, tmp_path: Path) -> None:
    api = HfApi()
    repo_url = api.create_repo("uploaded", exist_ok=True)
    assert repo_url.repo_id == "local-user/uploaded"  # the token's user is the implicit namespace
    assert api.create_repo("local-user/uploaded", exist_ok=True).repo_id == "local-user/uploaded"
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("local-user/uploaded")
    assert conflict.value.response.status_code == 409

    folder = tmp_path / "export"
    (folder / "sub").mkdir(parents=True)
    files = {
        "README.md": b"---\nlicense: mit\ntags:\n- timm\n- image-classification\n---\n# ConvMixer\n",
        "config.json": b'{"num_classes": 10}',
        "sub/model.safetensors": os.urandom(50_000),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    commit = api.upload_folder(repo_id="local-user/uploaded", folder_path=folder, commit_message="add weights")

    assert commit.oid == hub.head("local-user/uploaded")
    assert api.list_repo_files("local-user/uploaded") == [".gitattributes", *sorted(files)]
    info = api.model_info("local-user/uploaded")
    assert info.sha == commit.oid
    assert info.card_data is not None and info.card_data["license"] == "mit"
    assert info.tags == ["timm", "image-classification"]
    for name, content in files.items():
        assert Path(hf_hub_download("local-user/uploaded", name)).read_bytes() == content
        assert hub.read_file("local-user/uploaded", name) == content
    writes = [r for r in hub.requests if r.method == "POST"]
    assert writes and all(r.authorization == f"Bearer {TOKEN}" for r in writes)

    # Re-uploading identical content is detected through the oids the preupload call returns.
    again = api.upload_folder(repo_id="local-user/uploaded", folder_path=folder)
    assert again.oid == commit.oid


def test_old_revisions_stay_downloadable(hub: LocalHub, hf_env: HubEnvironment) -> None:
    first = hub.add_file("org/history", "weights.pth", b"v1")
    hub.add_file("org/history", "weights.pth", b"v2")

    assert Path(hf_hub_download("org/history", "weights.pth")).read_bytes() == b"v2"
    assert Path(hf_hub_download("org/history", "weights.pth", revision=first)).read_bytes() == b"v1"
    snapshot = Path(snapshot_download("org/history", revision=first))
    assert (snapshot / "weights.pth").read_bytes() == b"v1"
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/history", "weights.pth", revision="no-such-branch")


def test_missing_repo_raises_repository_not_found(hub: LocalHub, hf_env: HubEnvironment) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/does-not-exist", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("org/does-not-exist")


def test_missing_file_raises_entry_not_found(hub: LocalHub, hf_env: HubEnvironment) -> None:
    sha = hub.add_file("org/convmixer", "config.json", b"{}")

    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/convmixer", "pytorch_model.bin")
    # The client remembers the miss for this commit, from the X-Repo-Commit header of the 404.
    assert (hf_env.repo_cache("org/convmixer") / ".no_exist" / sha / "pytorch_model.bin").is_file()


def test_dropped_connection_is_resumed_by_the_client(hub: LocalHub, hf_env: HubEnvironment) -> None:
    # huggingface_hub retries a body cut short by a clean close (after a 1 s pause). It keeps only whole
    # DOWNLOAD_CHUNK_SIZE (10 MiB) chunks, so a file cut after 10.5 MiB resumes with a Range request; a
    # smaller one is downloaded again from the start.
    data = bytes(range(256)) * (21 * 4096)  # 21 MiB
    hub.add_file("org/big", "model.safetensors", data)
    hub.fail_midway("model.safetensors")

    path = Path(hf_hub_download("org/big", "model.safetensors"))

    assert path.read_bytes() == data
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert [r.headers.get("range") for r in gets] == [None, f"bytes={constants.DOWNLOAD_CHUNK_SIZE}-"]


def test_reset_midway_raises_and_leaves_no_partial_file(hub: LocalHub, hf_env: HubEnvironment) -> None:
    data = os.urandom(200_000)
    sha = hub.add_file("org/convmixer", "model.safetensors", data)
    hub.fail_midway("model.safetensors", reset=True)

    # A reset (unlike a clean close) is not retried: the error reaches the caller.
    with pytest.raises(httpx2.ReadError):
        hf_hub_download("org/convmixer", "model.safetensors")

    # The client downloads into blobs/<etag>.<random>.incomplete and deletes it on failure: nothing is
    # left in blobs/, and the snapshot folder exists but holds no link to the file.
    repo_cache = hf_env.repo_cache("org/convmixer")
    assert _files_under(repo_cache / "blobs") == []
    assert _files_under(repo_cache / "snapshots") == []
    assert (repo_cache / "snapshots" / sha).is_dir()

    path = Path(hf_hub_download("org/convmixer", "model.safetensors"))
    assert path.read_bytes() == data
    assert _files_under(repo_cache / "blobs") == [hashlib.sha256(data).hexdigest()]


def test_stopped_server_gives_connection_refused(hub: LocalHub, hf_env: HubEnvironment) -> None:
    hub.add_file("org/convmixer", "config.json", b"{}")
    cached = hf_hub_download("org/convmixer", "config.json")
    hub.stop()
    assert not hub.running

    with pytest.raises(httpx2.ConnectError, match="Connection refused"):
        HfApi().model_info("org/convmixer")
    # With the file cached, the client falls back to the cache without waiting.
    assert hf_hub_download("org/convmixer", "config.json") == cached


def test_writes_and_private_repos_need_a_token(hub: LocalHub, tmp_path: Path) -> None:
    hub.create_repo("org/secret", private=True)
    hub.add_file("org/public", "config.json", b"{}")
    with hub_environment(hub.endpoint, tmp_path / "anonymous", token=None):
        with pytest.raises(HfHubHTTPError) as denied:
            HfApi().create_repo("org/new")
        assert denied.value.response.status_code == 401
        with pytest.raises(RepositoryNotFoundError):
            HfApi().model_info("org/secret")
        assert Path(hf_hub_download("org/public", "config.json")).read_bytes() == b"{}"
    assert all(r.authorization is None for r in hub.requests)
    assert hub.last_authorization is None


def test_child_process_uses_the_environment(hub: LocalHub, hf_env: HubEnvironment) -> None:
    hub.add_file("org/convmixer", "config.json", b'{"from": "child"}')
    code = "from huggingface_hub import hf_hub_download; print(hf_hub_download('org/convmixer', 'config.json'))"

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)

    path = Path(out.stdout.strip())
    assert path.is_relative_to(hf_env.hub_cache)
    assert path.read_bytes() == b'{"from": "child"}'


def test_hub_environment_restores_everything(tmp_path: Path) -> None:
    before = (constants.ENDPOINT, constants.HF_HUB_CACHE, os.environ.get("HF_ENDPOINT"), os.environ.get("HF_TOKEN"))
    with hub_environment("http://127.0.0.1:9", tmp_path, token="t") as env:
        assert constants.ENDPOINT == "http://127.0.0.1:9" == os.environ["HF_ENDPOINT"]
        assert constants.HF_HUB_CACHE == str(env.hub_cache) == str(tmp_path.resolve() / "hub")
        assert os.environ["HF_TOKEN"] == "t"
    after = (constants.ENDPOINT, constants.HF_HUB_CACHE, os.environ.get("HF_ENDPOINT"), os.environ.get("HF_TOKEN"))
    assert after == before


def test_the_test_server_is_not_part_of_the_package() -> None:
    import importlib.util

    assert importlib.util.find_spec("convmixer_timm.testing") is None

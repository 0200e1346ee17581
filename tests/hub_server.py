"""A local, offline stand-in for the Hugging Face Hub HTTP API, for this project's tests only.

It lives in ``tests/`` and is not part of the installed package: it is a test fixture, not a server to offer
users (no TLS, repos on a local disk, a fixed set of tokens).

``LocalHub`` serves the subset of the Hub API that ``huggingface_hub`` 2.4 uses to download files
(``hf_hub_download``, ``snapshot_download``), inspect repos (``model_info``, ``repo_info``,
``list_repo_files``, ``file_exists``) and upload (``create_repo``, ``upload_file``, ``upload_folder``,
``create_commit``). Repos live on disk under ``root_dir`` and keep their full commit history, so downloads
pinned to an old commit keep working. Point the client at it with ``hub_environment`` (see ``hub_env.py``)
or ``HF_ENDPOINT``.

Endpoints (``{type}s`` is ``models``, ``datasets`` or ``spaces``; dataset/space file URLs get that prefix):

* ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}`` (ETag, X-Repo-Commit, X-Linked-Etag/Size, Range)
* ``GET /api/{type}s/{repo_id}[/revision/{revision}]`` (repo info, ``?blobs=true`` for sizes/LFS info)
* ``GET /api/{type}s/{repo_id}/tree/{revision}[/{path}]`` (``?recursive=true``)
* ``POST /api/{type}s/{repo_id}/preupload/{revision}`` and ``POST .../commit/{revision}`` (NDJSON)
* ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``GET /api/whoami-v2``,
  ``POST /api/validate-yaml``, ``GET /api/agent-harnesses``

Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) so the client
raises ``RepositoryNotFoundError``, ``RevisionNotFoundError`` and ``EntryNotFoundError``.

Simplifications compared with the real Hub, on purpose:

* The preupload endpoint answers ``"regular"`` for every file, so the client sends all content inline in
  the commit call (base64) and never talks to LFS or Xet storage. Files whose name matches the Hub's
  default LFS patterns (``*.safetensors``, ``*.bin``, ...) are still *described* as LFS files (sha256 in
  ``X-Linked-Etag``, ``lfs`` in listings), as on the Hub, so the client cache names their blobs by sha256.
* Downloads are served directly, without the redirect to a CDN.
* Tokens: with ``tokens={"tok": "alice"}`` only those are valid (another gets 401) and each names its user;
  by default any bearer token is valid and names ``username``. Over HTTP a user creates repos only in its own
  namespace or in an organization ``orgs`` says it belongs to (403 elsewhere, as on the Hub). A repo belongs to
  the token that created it over HTTP (or ``owner_token=`` from Python): only that token may write to it,
  delete it or read it while private (403 for writes and deletes, 404 for private reads, as on the Hub). Repos
  seeded from Python, in any namespace, without an owner are readable by all and writable by none. There are
  no pull requests, branches other than those created from Python, tags, or gated repos.

Like a real server it checks the token (and, for commits, the repo's owner) before it reads a request body,
refuses bodies over ``max_body_bytes`` with 413 without reading them, and answers malformed requests with
4xx. Commits to one repo are applied one at a time, each on the branch head current when it is applied, so
every commit answered 200 is on its branch. Connections get ``timeout`` seconds per read or write, at most
``max_connections`` are served at once (503 beyond), and the listen queue holds ``_Server.request_queue_size``.

Standard library only (it imports no torch). ``python tests/hub_server.py --root DIR`` runs it by hand, for
debugging the tests.
"""

from __future__ import annotations

import argparse
import array
import base64
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import socketserver
import struct
import termios
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubError", "LocalHub", "RecordedRequest", "main"]

_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_PLURAL_TO_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}

# Mirrors the .gitattributes the Hub writes into every new repo: these files are LFS-tracked there.
_LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gz", ".h5", ".joblib", ".mlmodel", ".model",
    ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt", ".pth", ".rar",
    ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip", ".zst",
)
_GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in _LFS_SUFFIXES).encode()

# Path segments that follow a one-segment repo id ("gpt2/tree/main") in /api/{type}s/... URLs.
_REPO_SUBROUTES = {"revision", "tree", "preupload", "commit", "paths-info", "refs", "resolve"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_CHUNK = 1 << 20


class HubError(Exception):
    """An API error, answered as JSON with the ``X-Error-Code`` header the client maps to its exceptions."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


@dataclass
class RecordedRequest:
    """One request the server received (for assertions in tests); header names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    authorization: str | None = None


@dataclass
class _Fault:
    repo_id: str | None
    times: int
    reset: bool


@dataclass
class _FileInfo:
    path: str
    oid: str
    size: int
    sha256: str
    lfs: bool


@dataclass
class _Repo:
    repo_id: str
    repo_type: str
    folder: Path
    meta: dict[str, Any] = field(default_factory=dict)


def _now_iso() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _header_safe(value: str) -> str:
    return value.encode("ascii", "backslashreplace").decode("ascii")


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str) -> bool:
    return path.lower().endswith(_LFS_SUFFIXES)


def _check_path_in_repo(path: str) -> str:
    path = path.strip("/")
    parts = path.split("/")
    if not path or any(p in ("", ".", "..") for p in parts) or "\\" in path or "\0" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _fingerprint(token: str) -> str:
    # Repos record who owns them by a digest, so the token itself is never written to disk.
    return hashlib.sha256(token.encode()).hexdigest()


def _check_repo_id(repo_id: str) -> str:
    parts = repo_id.split("/")
    if not 1 <= len(parts) <= 2 or not all(_NAME_RE.match(p) and ".." not in p and "--" not in p for p in parts):
        raise HubError(400, f"Invalid repo id: {repo_id!r}")
    return repo_id


def _parse_card_data(readme: bytes) -> dict[str, Any]:
    """Flat ``key: value`` and ``key: [list]`` entries of a model card's YAML header; nested maps are skipped."""
    text = readme.decode("utf-8", errors="replace")
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    card: dict[str, Any] = {}
    nested: set[str] = set()
    current: str | None = None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t-":  # belongs to the key above: a list item, or part of a nested structure
            item = re.match(r"^\s*-\s+(.*)$", line)
            if current is not None and item and not re.match(r"^[\w.-]+:(\s|$)", item.group(1)):
                card[current].append(item.group(1).strip().strip("'\""))
            elif current is not None:
                nested.add(current)
            continue
        entry = re.match(r"^([\w.-]+):\s*(.*)$", line)
        current = None
        if entry:
            key, value = entry.group(1), entry.group(2).strip()
            if value.startswith("[") and value.endswith("]"):
                card[key] = [v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip()]
            elif value:
                card[key] = value.strip("'\"")
            else:
                card[key] = []
                current = key
    return {k: v for k, v in card.items() if k not in nested and v != []}


class LocalHub:
    """An offline Hugging Face Hub on ``127.0.0.1``, storing repos under ``root_dir``.

    Use as a context manager (``with LocalHub(tmp) as hub: ... hub.endpoint``) or call ``start()``/``stop()``.
    Repos can be seeded from Python with ``add_file``/``add_files`` and inspected with ``read_file``,
    ``list_files`` and ``head``; those raise ``HubError`` (e.g. status 404) for missing repos, revisions or
    files. ``requests`` records the last 10,000 requests received; ``last_authorization`` holds the most
    recent ``Authorization`` header seen. ``orgs`` maps a user to the organizations it belongs to; ``timeout``
    bounds each read and write on a connection (an idle or stalled client is dropped after it), and
    ``max_connections`` the connections served at once. ``clock`` (seconds, monotonic) is what the server's own
    deadlines read: draining a refused connection, delivering what precedes a reset.
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        *,
        port: int = 0,
        username: str = "local-user",
        gitattributes: bool = True,
        tokens: Mapping[str, str] | None = None,
        orgs: Mapping[str, Iterable[str]] | None = None,
        max_body_bytes: int = 1 << 30,
        timeout: float = 30.0,
        max_connections: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0 or max_connections < 1:
            raise ValueError("timeout must be > 0 and max_connections >= 1")
        self.root = Path(root_dir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.username = username
        self.tokens = dict(tokens) if tokens is not None else None
        # user -> the organizations it belongs to: the namespaces, besides its own, it may create repos in.
        self.orgs = {user: frozenset(names) for user, names in (orgs or {}).items()}
        self.max_body_bytes = max_body_bytes
        self.timeout = timeout
        self.clock = clock  # the deadlines of closing and aborted connections read this, never the wall clock
        self.max_connections = max_connections
        self.gitattributes = gitattributes
        self.requests: deque[RecordedRequest] = deque(maxlen=10_000)
        self.last_authorization: str | None = None
        self._port = port
        self._lock = threading.RLock()
        self._faults: dict[str, list[_Fault]] = {}
        self._file_meta: dict[tuple[str, str], tuple[int, str]] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._endpoint: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> LocalHub:
        """Bind ``127.0.0.1`` (port 0 picks a free one) and serve in a background thread."""
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.hub = self
        self._server = server
        self._endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open connections: from now on clients get "connection refused"."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        # Keep-alive connections would otherwise keep answering the client's pooled sockets.
        server.close_all_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``; stays valid (and refused) after ``stop()``."""
        if self._endpoint is None:
            raise RuntimeError("LocalHub is not started: use it as a context manager or call start().")
        return self._endpoint

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return int(self.endpoint.rsplit(":", 1)[1])

    @property
    def open_connections(self) -> int:
        """The connections being served now (each holds a thread; at most ``max_connections``)."""
        server = self._server
        return server.active_connections if server is not None else 0

    @property
    def running(self) -> bool:
        """Whether the server currently accepts connections."""
        return self._server is not None

    # -- fault injection -------------------------------------------------------------------------------

    def fail_midway(self, filename: str, *, times: int = 1, reset: bool = False, repo_id: str | None = None) -> None:
        """Cut the next ``times`` GET downloads of ``filename`` (path in repo) after half of their bytes.

        Headers, including the full ``Content-Length``, are sent as usual. With ``reset=False`` the server then
        closes the connection cleanly: huggingface_hub 2.4 sees a truncated body, waits 1 s and retries (from
        the last whole 10 MiB chunk, with a Range request), up to 5 times. With ``reset=True`` it aborts the
        connection with a TCP RST: the client does not retry and raises ``httpx2.ReadError``. ``repo_id``
        limits the fault to one repo.
        """
        if times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._faults.setdefault(filename, []).append(_Fault(repo_id=repo_id, times=times, reset=reset))

    def clear_faults(self) -> None:
        """Drop all pending injected faults."""
        with self._lock:
            self._faults.clear()

    def _take_fault(self, repo_id: str, filename: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults.get(filename, []):
                if fault.repo_id in (None, repo_id):
                    fault.times -= 1
                    if fault.times == 0:
                        self._faults[filename].remove(fault)
                    return fault
        return None

    # -- repo storage ----------------------------------------------------------------------------------

    def _folder(self, repo_id: str, repo_type: str) -> Path:
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Unsupported repo type: {repo_type!r}")
        # One flat folder per repo ("org--name", as in the client cache) so "org" and "org/name" never nest.
        return self.root / f"{repo_type}s" / _check_repo_id(repo_id).replace("/", "--")

    def _get_repo(self, repo_id: str, repo_type: str = "model") -> _Repo:
        folder = self._folder(repo_id, repo_type)
        meta_path = folder / "repo.json"
        if not meta_path.is_file():
            raise HubError(404, "Repository not found", "RepoNotFound")
        return _Repo(repo_id, repo_type, folder, json.loads(meta_path.read_text()))

    def _save_meta(self, repo: _Repo) -> None:
        tmp = repo.folder / f"repo.json.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(repo.meta, indent=1))
        os.replace(tmp, repo.folder / "repo.json")

    def user_of(self, token: str) -> str | None:
        """The user a token authenticates as; None for a token this server does not accept."""
        if not token:
            return None
        if self.tokens is None:
            return self.username
        return self.tokens.get(token)

    def create_repo(
        self, repo_id: str, *, repo_type: str = "model", private: bool = False, exist_ok: bool = True,
        owner_token: str | None = None,
    ) -> str:
        """Create a repo with an initial commit (holding ``.gitattributes``, as on the Hub); return its sha.

        ``owner_token`` is the token that may write to and delete the repo over HTTP (None: no one).
        """
        with self._lock:
            folder = self._folder(repo_id, repo_type)
            if (folder / "repo.json").is_file():
                if not exist_ok:
                    raise HubError(409, f"You already created this {repo_type} repo")
                return self.head(repo_id, repo_type=repo_type)
            (folder / "commits").mkdir(parents=True, exist_ok=True)
            (folder / "objects").mkdir(exist_ok=True)
            meta = {"private": private, "createdAt": _now_iso(), "refs": {},
                    "owner": _fingerprint(owner_token) if owner_token else None}
            repo = _Repo(repo_id, repo_type, folder, meta)
            self._save_meta(repo)
            files = {".gitattributes": _GITATTRIBUTES} if self.gitattributes else {}
            return self._commit(repo, "main", files, title="initial commit", create_branch=True)

    def delete_repo(self, repo_id: str, *, repo_type: str = "model") -> None:
        """Delete a repo and all its history."""
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            shutil.rmtree(repo.folder)

    def add_file(
        self,
        repo_id: str,
        path_in_repo: str,
        content: bytes | str | os.PathLike[str],
        *,
        repo_type: str = "model",
        revision: str = "main",
        commit_message: str | None = None,
    ) -> str:
        """Commit one file (bytes, or a local file path) to a repo, creating the repo if needed; return the sha."""
        return self.add_files(
            repo_id, {path_in_repo: content}, repo_type=repo_type, revision=revision,
            commit_message=commit_message or f"Upload {path_in_repo}",
        )

    def add_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | os.PathLike[str]],
        *,
        repo_type: str = "model",
        revision: str = "main",
        commit_message: str = "Upload files",
        delete: Iterable[str] = (),
    ) -> str:
        """Commit several files (and deletions) in one commit, creating the repo if needed; return the sha."""
        blobs = {path: content if isinstance(content, bytes) else Path(content).read_bytes()
                 for path, content in files.items()}
        with self._lock:
            self.create_repo(repo_id, repo_type=repo_type, exist_ok=True)
            repo = self._get_repo(repo_id, repo_type)
            return self._commit(repo, revision, blobs, deletions=list(delete), title=commit_message,
                                create_branch=True)

    def create_branch(self, repo_id: str, branch: str, *, repo_type: str = "model", revision: str = "main") -> str:
        """Point a new branch at ``revision``; return the commit sha."""
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            sha = self._resolve(repo, revision)
            repo.meta["refs"][branch] = sha
            self._save_meta(repo)
            return sha

    def head(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> str:
        """The commit sha ``revision`` (a branch or a commit) points to."""
        with self._lock:
            return self._resolve(self._get_repo(repo_id, repo_type), revision)

    def list_files(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> list[str]:
        """Sorted paths of the files in a repo at ``revision``."""
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            return sorted(self._load_commit(repo, self._resolve(repo, revision))["files"])

    def read_file(
        self, repo_id: str, path_in_repo: str, *, repo_type: str = "model", revision: str = "main"
    ) -> bytes:
        """Content of a file in a repo at ``revision``."""
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            info = self._file_info(repo, self._resolve(repo, revision), path_in_repo)
            return (repo.folder / "objects" / info.oid).read_bytes()

    def _resolve(self, repo: _Repo, revision: str) -> str:
        refs: dict[str, str] = repo.meta["refs"]
        if revision in refs:
            return refs[revision]
        if _SHA_RE.match(revision):
            if len(revision) == 40 and (repo.folder / "commits" / f"{revision}.json").is_file():
                return revision
            matches = [p.stem for p in (repo.folder / "commits").glob(f"{revision}*.json")]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _load_commit(self, repo: _Repo, sha: str) -> dict[str, Any]:
        return json.loads((repo.folder / "commits" / f"{sha}.json").read_text())

    def _file_info(self, repo: _Repo, sha: str, path: str) -> _FileInfo:
        oid = self._load_commit(repo, sha)["files"].get(path)
        if oid is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        return self._describe(repo, path, oid)

    def _describe(self, repo: _Repo, path: str, oid: str) -> _FileInfo:
        key = (str(repo.folder), oid)
        if key not in self._file_meta:
            data = (repo.folder / "objects" / oid).read_bytes()
            self._file_meta[key] = (len(data), hashlib.sha256(data).hexdigest())
        size, sha256 = self._file_meta[key]
        return _FileInfo(path=path, oid=oid, size=size, sha256=sha256, lfs=_is_lfs(path))

    def _commit(
        self,
        repo: _Repo,
        branch: str,
        additions: Mapping[str, bytes],
        *,
        deletions: Sequence[str] = (),
        deleted_folders: Sequence[str] = (),
        title: str,
        description: str = "",
        parent_commit: str | None = None,
        create_branch: bool = False,
    ) -> str:
        with self._lock:
            # The caller's copy of repo.json may be older than the last commit (read before it took the lock):
            # building on its branch head would drop that commit's files, so read the current one.
            repo.meta = self._get_repo(repo.repo_id, repo.repo_type).meta
            parent = repo.meta["refs"].get(branch)
            if parent is None and not create_branch:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent_commit is not None and (parent is None or not parent.startswith(parent_commit)):
                raise HubError(412, f"Parent commit {parent_commit} is not the head of {branch} ({parent})")
            files: dict[str, str] = dict(self._load_commit(repo, parent)["files"]) if parent else {}
            for path in deletions:
                if files.pop(_check_path_in_repo(path), None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            for folder in deleted_folders:
                prefix = _check_path_in_repo(folder) + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            for path, data in additions.items():
                path = _check_path_in_repo(path)
                oid = _git_oid(data)
                obj = repo.folder / "objects" / oid
                if not obj.exists():
                    tmp = obj.with_name(f"{oid}.{uuid.uuid4().hex}.tmp")
                    tmp.write_bytes(data)
                    os.replace(tmp, obj)
                files[path] = oid
            record = {
                "parents": [parent] if parent else [],
                "title": title,
                "message": description,
                "date": _now_iso(),
                "files": dict(sorted(files.items())),
            }
            sha = hashlib.sha1(json.dumps({**record, "nonce": uuid.uuid4().hex}).encode()).hexdigest()
            (repo.folder / "commits" / f"{sha}.json").write_text(json.dumps({"id": sha, **record}, indent=1))
            repo.meta["refs"][branch] = sha
            self._save_meta(repo)
            return sha

    # -- API payloads ----------------------------------------------------------------------------------

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"

    def _repo_info(self, repo: _Repo, revision: str, with_blobs: bool) -> dict[str, Any]:
        sha = self._resolve(repo, revision)
        commit = self._load_commit(repo, sha)
        infos = [self._describe(repo, path, oid) for path, oid in commit["files"].items()]
        siblings: list[dict[str, Any]] = []
        for info in infos:
            sibling: dict[str, Any] = {"rfilename": info.path}
            if with_blobs:
                sibling.update(size=info.size, blobId=info.oid)
                if info.lfs:
                    sibling["lfs"] = {"size": info.size, "sha256": info.sha256, "pointerSize": 134}
            siblings.append(sibling)
        card: dict[str, Any] = {}
        if "README.md" in commit["files"]:
            card = _parse_card_data((repo.folder / "objects" / commit["files"]["README.md"]).read_bytes())
        namespace = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        info: dict[str, Any] = {
            "_id": hashlib.md5(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": namespace,
            "sha": sha,
            "lastModified": commit["date"],
            "createdAt": repo.meta["createdAt"],
            "private": repo.meta["private"],
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(card.get("tags", [])) if isinstance(card.get("tags"), list) else [],
            "siblings": siblings,
            "usedStorage": sum(i.size for i in infos),
        }
        if card:
            info["cardData"] = card
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            for key in ("library_name", "pipeline_tag"):
                if isinstance(card.get(key), str):
                    info[key] = card[key]
        return info

    def _tree(self, repo: _Repo, revision: str, path: str, recursive: bool) -> list[dict[str, Any]]:
        sha = self._resolve(repo, revision)
        files: dict[str, str] = self._load_commit(repo, sha)["files"]
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for file_path, oid in files.items():
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix):].split("/")
            depth = len(rest) if recursive else 1
            for i in range(1, min(depth, len(rest) - 1) + 1):
                folder = prefix + "/".join(rest[:i])
                folder_oid = hashlib.sha1(f"tree:{sha}:{folder}".encode()).hexdigest()
                entries.setdefault(folder, {"type": "directory", "oid": folder_oid, "size": 0, "path": folder})
            if recursive or len(rest) == 1:
                info = self._describe(repo, file_path, oid)
                entry: dict[str, Any] = {"type": "file", "oid": info.oid, "size": info.size, "path": file_path}
                if info.lfs:
                    entry["lfs"] = {"oid": info.sha256, "size": info.size, "pointerSize": 134}
                entries[file_path] = entry
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound", {"X-Repo-Commit": sha})
        return [entries[k] for k in sorted(entries)]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog of 5 resets connections when a few dozen clients connect at once; the
    # kernel caps this at net.core.somaxconn, so the queue stays bounded either way.
    request_queue_size = 128
    hub: LocalHub

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._active = 0
        self._closing: list[tuple[socket.socket, float]] = []  # refused connections, drained until EOF or deadline
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        # One thread per connection, up to hub.max_connections: beyond that a client gets a 503 at once
        # instead of a thread (slow or idle clients could otherwise hold any number of them).
        with self._connections_lock:
            full = self._active >= self.hub.max_connections
            if not full:
                self._active += 1
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    @property
    def active_connections(self) -> int:
        with self._connections_lock:
            return self._active

    def _release(self) -> None:
        with self._connections_lock:
            self._active -= 1

    def _refuse(self, request: socket.socket) -> None:
        body = json.dumps({"error": f"LocalHub is serving {self.hub.max_connections} connections already"})
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: "
                f"{len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n")
        try:
            # A fresh socket's send buffer takes these few bytes without waiting on the client; the timeout is
            # there so that the accepting thread can never stall on one.
            request.settimeout(self.hub.timeout)
            request.sendall((head + body).encode())
            request.shutdown(socket.SHUT_WR)
            request.setblocking(False)
        except OSError:
            request.close()
            return
        # Closing a socket with the client's request unread sends a reset, which can destroy the 503 before the
        # client reads it: keep reading and dropping what it sends until it closes (service_actions, between
        # polls of the accept loop), for at most the timeout.
        self._closing.append((request, self.hub.clock() + self.hub.timeout))

    def service_actions(self) -> None:
        super().service_actions()
        still_open = []
        for sock, deadline in self._closing:
            try:
                while sock.recv(65536):
                    pass
            except BlockingIOError:
                if self.hub.clock() < deadline:
                    still_open.append((sock, deadline))
                    continue
            except OSError:
                pass
            sock.close()
        self._closing = still_open

    def server_close(self) -> None:
        super().server_close()
        for sock, _ in self._closing:
            sock.close()
        self._closing = []

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that can stall on offline machines.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._connections_lock:
            (self._connections.add if alive else self._connections.discard)(conn)

    def close_all_connections(self) -> None:
        with self._connections_lock:
            conns = list(self._connections)
            self._connections.clear()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Dropped connections are expected here (fault injection, stop()); stay quiet about them.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    server_version = "LocalHub/1.0"

    def setup(self) -> None:
        # StreamRequestHandler applies self.timeout to the socket: every read (request line, headers, body) and
        # write then gives up after it, and the connection is closed, so no client holds a thread for long.
        self.timeout = self.server.hub.timeout
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def end_headers(self) -> None:
        self._headers_sent = True
        super().end_headers()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing --------------------------------------------------------------------------------------

    @property
    def hub(self) -> LocalHub:
        return self.server.hub

    def _too_large(self, size: int) -> HubError:
        self.close_connection = True  # the rest of the body stays unread
        return HubError(413, f"Request body of {size:,} bytes or more exceeds this server's limit of "
                             f"{self.hub.max_body_bytes:,} bytes (LocalHub(max_body_bytes=...))")

    def _read_body(self) -> bytes:
        limit = self.hub.max_body_bytes
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                try:
                    size = int(self.rfile.readline(64).split(b";")[0].strip() or b"0", 16)
                except ValueError as exc:
                    self.close_connection = True
                    raise HubError(400, "Invalid chunk size in a chunked body") from exc
                if size < 0:
                    self.close_connection = True
                    raise HubError(400, "Invalid chunk size in a chunked body")
                total += size
                if total > limit:
                    raise self._too_large(total)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(64)
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError("negative")
        except ValueError as exc:
            self.close_connection = True
            raise HubError(400, f"Invalid Content-Length: {self.headers.get('Content-Length')!r}") from exc
        if length > limit:
            raise self._too_large(length)
        return self.rfile.read(length) if length > 0 else b""

    def _json_body(self, body: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(body or b"{}")
        except (ValueError, RecursionError) as exc:  # RecursionError: arrays or objects nested too deep
            raise HubError(400, f"Invalid JSON body: {exc}") from exc
        if not isinstance(payload, dict):
            raise HubError(400, f"Invalid JSON body: expected an object, got {type(payload).__name__}")
        return payload

    def _send(self, status: int, body: bytes, headers: Mapping[str, str], method: str) -> None:
        self.send_response(status)
        if self.close_connection:  # tell the client, so it does not reuse the socket
            self.send_header("Connection", "close")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, method: str, headers: Mapping[str, str] | None = None) -> None:
        hdrs = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        self._send(status, json.dumps(payload).encode(), hdrs, method)

    def _token(self) -> str | None:
        """The bearer token sent, if any; a token this server does not accept is a 401 wherever it is sent."""
        auth = (self.headers.get("Authorization") or "").strip()
        if not auth:
            return None
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if self.hub.user_of(token) is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _require_token(self) -> str:
        token = self._token()
        if token is None:
            raise HubError(401, "Invalid username or password.")
        return token

    def _require_owner(self, repo: _Repo) -> None:
        token = self._require_token()
        owner = repo.meta.get("owner")
        if owner is None or owner != _fingerprint(token):
            raise HubError(403, f"You don't have the rights to write to or delete {repo.repo_type} repo "
                                f"{repo.repo_id}: only the token that created it may")

    def _check_read_access(self, repo: _Repo) -> None:
        token = self._token()
        if not repo.meta.get("private"):
            return
        # The Hub hides private repos from everyone but their owner behind a RepoNotFound error.
        if token is None:
            raise HubError(401, "Repository not found", "RepoNotFound")
        owner = repo.meta.get("owner")
        if owner is not None and owner != _fingerprint(token):
            raise HubError(404, "Repository not found", "RepoNotFound")

    def _body(self) -> bytes:
        """The request body, read on first use: routes call this only after their token and owner checks."""
        if self._body_cache is None:
            self._body_cache = self._read_body()
        return self._body_cache

    def _has_body(self) -> bool:
        return self.headers.get("Transfer-Encoding", "").lower() == "chunked" or \
            self.headers.get("Content-Length", "0").strip() not in ("", "0")

    def _dispatch(self, method: str) -> None:
        self._headers_sent = False
        self._body_cache: bytes | None = None
        auth = self.headers.get("Authorization")
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.hub.requests.append(RecordedRequest(method, self.path, headers, auth))
        if auth is not None:
            self.hub.last_authorization = auth
        try:
            self._route(method)
        except HubError as err:
            if self._body_cache is None and self._has_body():
                # The body was never read (refused before it): it must not be parsed as the next request.
                self.close_connection = True
            headers = {"X-Error-Message": _header_safe(err.message), **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send_json(err.status, {"error": err.message}, method, headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as exc:
            if self._headers_sent:  # too late for an error response: the client sees a truncated body
                self.close_connection = True
                raise
            # Report server bugs to the client instead of leaving it hanging.
            self.close_connection = True
            self._send_json(500, {"error": f"LocalHub internal error: {exc!r}"}, method)
            return
        if self._body_cache is None and self._has_body():
            self.close_connection = True

    def _route(self, method: str) -> None:
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        segments = split.path.strip("/").split("/")
        if segments[0] == "api":
            self._route_api(method, segments[1:], query)
            return
        repo_type = "model"
        if segments[0] in ("datasets", "spaces") and "resolve" in segments[2:4]:
            repo_type = _PLURAL_TO_TYPE[segments[0]]
            segments = segments[1:]
        if method in ("GET", "HEAD") and len(segments) >= 4 and "resolve" in segments[1:3]:
            i = segments.index("resolve", 1)
            repo_id = "/".join(unquote(s) for s in segments[:i])
            revision = unquote(segments[i + 1])
            filename = "/".join(unquote(s) for s in segments[i + 2:])
            self._resolve_file(method, repo_type, repo_id, revision, filename)
            return
        raise HubError(404, f"LocalHub does not implement {method} {split.path}")

    def _route_api(self, method: str, segments: list[str], query: dict[str, str]) -> None:
        hub = self.hub
        route = (method, "/".join(segments))
        if route == ("GET", "whoami-v2"):
            user = hub.user_of(self._require_token())
            assert user is not None  # _require_token accepted it
            self._send_json(200, {
                "type": "user", "id": hashlib.md5(user.encode()).hexdigest()[:24], "name": user,
                "fullname": user, "email": None, "emailVerified": False, "isPro": False,
                "orgs": [{"type": "org", "name": org} for org in sorted(hub.orgs.get(user, ()))],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            }, method)
        elif route == ("POST", "repos/create"):
            token = self._require_token()
            self._create_repo(self._json_body(self._body()), token, method)
        elif route == ("DELETE", "repos/delete"):
            self._require_token()
            payload = self._json_body(self._body())
            name, organization = payload.get("name"), payload.get("organization")
            if not isinstance(name, str) or not isinstance(organization, (str, type(None))):
                raise HubError(400, "Missing or invalid repo name")
            repo_type = self._repo_type(payload)
            with hub._lock:
                repo = hub._get_repo(f"{organization}/{name}" if organization else name, repo_type)
                self._require_owner(repo)
                shutil.rmtree(repo.folder)
            self._send_json(200, {}, method)
        elif route == ("POST", "validate-yaml"):
            self._body()  # bounded by max_body_bytes like any other
            self._send_json(200, {"errors": [], "warnings": []}, method)
        elif route == ("GET", "agent-harnesses"):
            # Fetched by the client to build its user agent; an empty registry means "no agent detected".
            self._send_json(200, {"standardEnvVars": [], "harnesses": {}}, method)
        elif segments and segments[0] in _PLURAL_TO_TYPE and len(segments) >= 2:
            repo_type = _PLURAL_TO_TYPE[segments[0]]
            rest = segments[1:]
            split_at = 1 if len(rest) >= 2 and rest[1] in _REPO_SUBROUTES else 2
            repo_id = "/".join(unquote(s) for s in rest[:split_at])
            tail = [unquote(s) for s in rest[split_at:]]
            self._repo_api(method, repo_type, repo_id, tail, query)
        else:
            raise HubError(404, f"LocalHub does not implement {method} /api/{'/'.join(segments)}")

    @staticmethod
    def _repo_type(payload: Mapping[str, Any]) -> str:
        repo_type = payload.get("type") or "model"
        if not isinstance(repo_type, str) or repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type!r}; expected one of {', '.join(_URL_PREFIX)}")
        return repo_type

    def _create_repo(self, payload: dict[str, Any], token: str, method: str) -> None:
        hub = self.hub
        name, organization = payload.get("name"), payload.get("organization")
        if not isinstance(name, str) or not isinstance(organization, (str, type(None))):
            raise HubError(400, "Missing or invalid repo name")
        user = hub.user_of(token)
        namespace = user if organization is None else organization
        repo_id = _check_repo_id(f"{namespace}/{name}")
        repo_type = self._repo_type(payload)
        private, visibility = payload.get("private"), payload.get("visibility")
        if not isinstance(private, (bool, type(None))) or visibility not in (None, "public", "private"):
            raise HubError(400, "Invalid visibility: 'private' takes true or false, 'visibility' public or private")
        if namespace != user and namespace not in hub.orgs.get(user, ()):
            # As on the Hub: only your own namespace, or an organization you are a member of.
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace "
                                f"{namespace!r}: it is neither yours ({user!r}) nor one of your organizations")
        private = visibility == "private" if visibility is not None else bool(private)
        url = hub._repo_url(repo_type, repo_id)
        with hub._lock:
            if (hub._folder(repo_id, repo_type) / "repo.json").is_file():
                # The client still reads "url" from the 409 body when called with exist_ok=True.
                self._send_json(409, {"error": f"You already created this {repo_type} repo", "url": url}, method,
                                {"X-Error-Message": f"You already created this {repo_type} repo"})
                return
            hub.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=False, owner_token=token)
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id}, method)

    def _repo_api(self, method: str, repo_type: str, repo_id: str, tail: list[str], query: dict[str, str]) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_id, repo_type)
        self._check_read_access(repo)
        action = tail[0] if tail else ""
        if method == "GET" and (not tail or (action == "revision" and len(tail) == 2)):
            revision = tail[1] if tail else "main"
            with hub._lock:
                payload = hub._repo_info(repo, revision, with_blobs=query.get("blobs", "").lower() == "true")
            self._send_json(200, payload, method)
        elif method == "GET" and action == "tree" and len(tail) >= 2:
            recursive = query.get("recursive", "false").lower() in ("1", "true")
            with hub._lock:
                entries = hub._tree(repo, tail[1], "/".join(tail[2:]), recursive)
            self._send_json(200, entries, method)
        elif method == "POST" and action == "preupload" and len(tail) == 2:
            self._require_owner(repo)
            self._preupload(repo, tail[1], self._json_body(self._body()), method)
        elif method == "POST" and action == "commit" and len(tail) == 2:
            self._require_owner(repo)
            if query.get("create_pr") in ("1", "true"):
                raise HubError(400, "LocalHub does not support pull requests (create_pr)")
            self._commit(repo, tail[1], self._body(), method)
        else:
            raise HubError(404, f"LocalHub does not implement {method} {self.path}")

    def _preupload(self, repo: _Repo, revision: str, payload: dict[str, Any], method: str) -> None:
        hub = self.hub
        with hub._lock:
            sha = hub._resolve(repo, revision)
            current = hub._load_commit(repo, sha)["files"]
        entries = payload.get("files", [])
        if not isinstance(entries, list) or not all(isinstance(f, dict) and isinstance(f.get("path"), str)
                                                    for f in entries):
            raise HubError(400, "Invalid preupload request: 'files' must be a list of objects with a 'path'")
        # "regular" for every file: content then travels base64-encoded in the commit call, no LFS/Xet upload.
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": current.get(f["path"])}
            for f in entries
        ]
        self._send_json(200, {"files": files, "commitOid": sha}, method)

    def _commit(self, repo: _Repo, revision: str, body: bytes, method: str) -> None:
        header: dict[str, Any] = {}
        additions: dict[str, bytes] = {}
        deletions: list[str] = []
        deleted_folders: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = self._json_body(line)
            key, value = item.get("key"), item.get("value") or {}
            if not isinstance(value, dict):
                raise HubError(400, f"Invalid commit operation {key!r}: its value is not an object")
            path = value.get("path")
            if key in ("file", "deletedFile", "deletedFolder") and not isinstance(path, str):
                raise HubError(400, f"Invalid commit operation {key!r}: missing path")
            if key == "header":
                header = value
            elif key == "file":
                content = value.get("content", "")
                encoding = value.get("encoding", "base64")
                if not isinstance(content, str) or encoding not in ("base64", "utf-8"):
                    raise HubError(400, f"Invalid content or encoding for {path!r}")
                if encoding == "base64":
                    try:
                        additions[path] = base64.b64decode(content, validate=True)
                    except ValueError as exc:
                        raise HubError(400, f"Invalid base64 content for {path!r}: {exc}") from exc
                else:
                    additions[path] = content.encode()
            elif key == "deletedFile":
                deletions.append(path)
            elif key == "deletedFolder":
                deleted_folders.append(path)
            elif key == "lfsFile":
                raise HubError(400, "LocalHub only accepts regular (inline) files; its preupload never asks for LFS")
            else:
                raise HubError(400, f"Unknown commit operation: {key!r}")
        if not header.get("summary") or not isinstance(header["summary"], str):
            raise HubError(400, "Commit summary is required (a string)")
        for key in ("description", "parentCommit"):
            if not isinstance(header.get(key), (str, type(None))):
                raise HubError(400, f"Invalid commit header: {key!r} must be a string")
        hub = self.hub
        with hub._lock:
            # The owner was checked before the body was read, without the lock: the repo may since have been
            # deleted, or deleted and created again by another token. Check again where it cannot change.
            repo = hub._get_repo(repo.repo_id, repo.repo_type)
            self._require_owner(repo)
            sha = hub._commit(
                repo, revision, additions, deletions=deletions, deleted_folders=deleted_folders,
                title=header["summary"], description=header.get("description") or "",
                parent_commit=header.get("parentCommit"),
            )
        url = f"{hub._repo_url(repo.repo_type, repo.repo_id)}/commit/{sha}"
        self._send_json(200, {"success": True, "commitOid": sha, "commitUrl": url, "hookOutput": ""}, method)

    # -- downloads -------------------------------------------------------------------------------------

    def _resolve_file(self, method: str, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_id, repo_type)
            self._check_read_access(repo)
            sha = hub._resolve(repo, revision)
            info = hub._file_info(repo, sha, filename)
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{info.oid}"',
            "X-Repo-Commit": sha,
            "Content-Disposition": _header_safe(f'inline; filename="{filename.rsplit("/", 1)[-1]}";'),
        }
        if info.lfs:
            headers["X-Linked-Etag"] = f'"{info.sha256}"'
            headers["X-Linked-Size"] = str(info.size)
        start, end = 0, info.size - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            parsed = self._parse_range(range_header, info.size)
            if parsed is None:
                raise HubError(416, f"Range not satisfiable: {range_header}",
                               headers={"Content-Range": f"bytes */{info.size}"})
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{info.size}"
        length = max(end - start + 1, 0)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if method == "HEAD":
            return
        fault = hub._take_fault(repo_id, filename)
        to_send = length // 2 if fault else length
        with open(repo.folder / "objects" / info.oid, "rb") as f:
            f.seek(start)
            while to_send > 0:
                chunk = f.read(min(_CHUNK, to_send))
                if not chunk:
                    break
                self.wfile.write(chunk)
                to_send -= len(chunk)
        if fault:
            self._abort_connection(reset=fault.reset)

    def _parse_range(self, value: str, size: int) -> tuple[int, int] | None:
        match = _RANGE_RE.match(value)
        if not match or not (match.group(1) or match.group(2)):
            return None
        if not match.group(1):
            suffix = int(match.group(2))
            return (max(size - suffix, 0), size - 1) if suffix > 0 and size > 0 else None
        start = int(match.group(1))
        end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
        return (start, end) if start <= end else None

    def _abort_connection(self, reset: bool) -> None:
        self.close_connection = True
        try:
            if reset:
                # A RST discards what the send queue still holds: wait until the client has it all.
                self._wait_until_delivered()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


    def _wait_until_delivered(self) -> None:
        """Until the client has acknowledged every byte sent (Linux's send-queue count), for at most the timeout."""
        deadline = self.server.hub.clock() + self.server.hub.timeout
        queued = array.array("i", [0])
        while self.server.hub.clock() < deadline:
            try:
                fcntl.ioctl(self.connection.fileno(), termios.TIOCOUTQ, queued)
            except OSError:
                return  # no such count here: reset at once
            if queued[0] == 0:
                return
            select.select([], [], [], 0.001)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a LocalHub until interrupted (Ctrl-C or SIGTERM)."""
    parser = argparse.ArgumentParser(
        prog="python tests/hub_server.py",
        description="Serve an offline Hugging Face Hub on 127.0.0.1 (point HF_ENDPOINT at it).",
    )
    parser.add_argument("--root", required=True, help="folder holding the repos (created if missing)")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: any free port)")
    parser.add_argument("--max-body-mib", type=float, default=1024,
                        help="largest request body accepted, in MiB (default: 1024); larger ones get 413")
    parser.add_argument("--token", action="append", default=[], metavar="TOKEN=USER",
                        help="accept only these tokens, each naming its user (repeatable; default: any token, "
                             "as user local-user)")
    args = parser.parse_args(argv)
    tokens = None
    if args.token:
        tokens = {}
        for item in args.token:
            token, sep, user = item.partition("=")
            if not sep or not token or not user:
                parser.error("--token expects TOKEN=USER (an item had no '=' or an empty side)")
            tokens[token] = user
    # SIGINT can arrive ignored (background jobs of a non-interactive shell); SIGTERM is what `kill` sends.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    hub = LocalHub(args.root, port=args.port, tokens=tokens, max_body_bytes=int(args.max_body_mib * 2**20))
    try:  # from the first line printed on, a signal may arrive (whoever reads it may stop the server at once)
        hub.start()
        print(f"LocalHub serving {hub.root} at {hub.endpoint}", flush=True)
        print(f"  export HF_ENDPOINT={hub.endpoint} "
              f"HF_TOKEN={'<one of your --token values>' if tokens else 'local-token'}", flush=True)
        while True:
            signal.pause()  # until SIGINT or SIGTERM
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

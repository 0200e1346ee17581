"""Tokens stay secret: ``push`` takes them from HF_TOKEN, the stored login or standard input;
``--token`` warns; no token reaches a process's argv, our output or the files we write.

Pushes go to a real ``LocalHub`` on 127.0.0.1 that accepts only the test's token.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from hub_env import hub_env_vars, hub_environment
from hub_server import LocalHub
from waiting import wait_until

from convmixer_timm import cli
from convmixer_timm.hub import save_hub_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR = "convmixer_256_8_ks5_p2"
SECRET = "hf_sEcReT0123456789abcdefTOKEN"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(CIFAR, dim=16, depth=1).eval()
    return save_hub_folder(model, tmp_path_factory.mktemp("folder") / "convmixer", CIFAR)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LocalHub]:
    with LocalHub(tmp_path / "hub-root", tokens={SECRET: "me"}) as server:
        yield server


def files_holding(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
@pytest.mark.slow
def test_token_from_stdin_never_reaches_argv_output_or_files(hub, folder, tmp_path):
    marker = tmp_path / "paused"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(hub_env_vars(hub.endpoint, tmp_path / "hf_home", token=None))
    env.update(PYTHONPATH=str(REPO_ROOT))
    # tests/pause_cli.py runs the real command line, stopped before the upload (see there).
    pause = [str(Path(__file__).with_name("pause_cli.py")), "before-upload", str(marker), "--"]
    process = subprocess.Popen(
        [sys.executable, *pause, "push", str(folder), "--repo-id", "me/secret", "--token-stdin"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    process.stdin.write(SECRET + "\n")
    process.stdin.close()
    process.stdin = None  # written and closed: communicate() below must not flush it
    wait_until(marker.exists, "push reaching the upload", process)
    # The token has been read and is about to be used: no process of the push shows it in its argv.
    pids = descendants(process.pid)
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert SECRET.encode() not in cmdline, (pid, cmdline)
    marker.unlink()  # let it upload
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr
    assert hub.last_authorization == f"Bearer {SECRET}"
    assert "model.safetensors" in hub.list_files("me/secret")
    assert SECRET not in stdout and SECRET not in stderr
    assert "warning: --token" not in stderr
    # Nothing we (or the client we drive) wrote holds it: the folder, the client's home, the server's store.
    assert files_holding(tmp_path, SECRET) == [] and files_holding(folder, SECRET) == []


def test_token_flag_warns_and_is_never_printed(hub, folder, tmp_path, capsys):
    with hub_environment(hub.endpoint, tmp_path / "hf_home", token=None):
        assert cli.main(["push", str(folder), "--repo-id", "me/flag", "--token", SECRET]) == 0
    captured = capsys.readouterr()
    assert "warning: --token puts the token on the command line, where every user of this machine can read " \
           "it" in captured.err
    assert "HF_TOKEN" in captured.err and "--token-stdin" in captured.err
    assert SECRET not in captured.err and SECRET not in captured.out
    assert hub.last_authorization == f"Bearer {SECRET}"


def test_token_dash_reads_stdin_and_a_rejected_token_is_not_echoed(hub, folder, tmp_path, capsys, monkeypatch):
    with hub_environment(hub.endpoint, tmp_path / "hf_home", token=None):
        monkeypatch.setattr(sys, "stdin", io.StringIO(SECRET + "\n"))
        assert cli.main(["push", str(folder), "--repo-id", "me/dash", "--token", "-"]) == 0
        assert "warning: --token" not in capsys.readouterr().err

        wrong = "hf_wrong_but_secret_value"
        monkeypatch.setattr(sys, "stdin", io.StringIO(wrong + "\n"))
        assert cli.main(["push", str(folder), "--repo-id", "me/dash", "--token-stdin"]) == 1
        captured = capsys.readouterr()
        assert "(401)" in captured.err and "the token was rejected" in captured.err
        assert wrong not in captured.err and wrong not in captured.out

        monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
        assert cli.main(["push", str(folder), "--repo-id", "me/dash", "--token-stdin"]) == 2
        assert "--token-stdin read an empty token" in capsys.readouterr().err


def test_token_flags_are_exclusive(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["push", "dir", "--repo-id", "me/x", "--token", SECRET, "--token-stdin"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with argument" in err and SECRET not in err


def _push_subprocess(folder: Path, hub: LocalHub, tmp_path: Path, *extra: str, stdin: str | None = None,
                     env_token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(hub_env_vars(hub.endpoint, tmp_path / "hf_home", token=env_token))
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "convmixer_timm", "push", str(folder), "--repo-id", "me/malformed", *extra],
        input=stdin, capture_output=True, text=True, env=env, timeout=300)


# A Windows line ending inside the value, a tab, a space: each would make the HTTP library refuse the
# Authorization header and quote it (h11's "Illegal header value b'Bearer hf_...'"), token and all.
MALFORMED = {"carriage-return": (SECRET[:10] + "\r" + SECRET[10:], "a control character (0x0d)", 11),
             "tab": (SECRET + "\tx", "a control character (0x09)", len(SECRET) + 1),
             "space": (SECRET[:5] + " " + SECRET[5:], "a space", 6),
             "non-ascii": (SECRET[:3] + "é" + SECRET[3:], "a non-ASCII character", 4)}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_token_from_stdin_is_one_line_that_never_quotes_it(hub, folder, tmp_path, case, capsys,
                                                                     monkeypatch):
    token, what, position = MALFORMED[case]
    with hub_environment(hub.endpoint, tmp_path / "hf_home", token=None):
        monkeypatch.setattr(sys, "stdin", io.StringIO(token + "\r\n"))
        code = cli.main(["push", str(folder), "--repo-id", "me/malformed", "--token-stdin"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.strip().splitlines()[-1] == (
        f"convmixer-timm push: error: the Hub token from --token-stdin is malformed: character {position} of "
        f"{len(token)} is {what}, and a token is printable ASCII with no spaces (hf_...); copy it again from "
        "https://huggingface.co/settings/tokens")
    for part in (SECRET[:10], SECRET[10:], SECRET[5:]):  # no piece of it either
        assert part not in captured.err and part not in captured.out
    assert not hub.requests, "the malformed token was sent"


# The real command line in a process of its own (the module entry point, the token from the environment).
@pytest.mark.slow
def test_malformed_token_in_hf_token_is_refused_before_anything_is_sent(hub, folder, tmp_path):
    token = SECRET[:10] + "\x1b" + SECRET[10:]  # huggingface_hub strips \r and \n from HF_TOKEN, not the rest
    result = _push_subprocess(folder, hub, tmp_path, env_token=token)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("convmixer-timm push: error: the Hub token from HF_TOKEN is malformed: character 11 of")
    assert "a control character (0x1b)" in last and "Traceback" not in result.stderr
    assert SECRET[:10] not in result.stderr + result.stdout and SECRET[10:] not in result.stderr + result.stdout
    assert not hub.requests


def test_a_windows_line_ending_around_the_token_is_not_part_of_it(hub, folder, tmp_path, capsys, monkeypatch):
    with hub_environment(hub.endpoint, tmp_path / "hf_home", token=None):
        monkeypatch.setattr(sys, "stdin", io.StringIO(SECRET + "\r\n"))
        assert cli.main(["push", str(folder), "--repo-id", "me/crlf", "--token-stdin", "-q"]) == 0
    assert hub.last_authorization == f"Bearer {SECRET}"
    captured = capsys.readouterr()
    assert SECRET not in captured.err + captured.out

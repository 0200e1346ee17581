"""Session set-up: the suite writes nothing into the developer's home folder.

For the whole session, this process and every process it starts get a fresh ``HOME``, removed at the end, with
the ``XDG_*`` folders and ``CONVMIXER_TIMM_CACHE`` unset so that they default to folders inside it: what
libraries write to "the user's" folders lands there and goes away. Found by running the tests with ``HOME`` set
to an empty folder:

* onnxruntime (1.32) telemetry: a device id and an event database in
  ``~/.cache/Microsoft/DeveloperTools/.onnxruntime``, on every ``InferenceSession``; ``ORT_DISABLE_TELEMETRY=1``
  switches it off (``tests/test_isolation.py`` checks both runtimes).
* OpenVINO telemetry: ``import openvino`` writes a Google Analytics client id and usage counts to ``~/intel``
  when no consent file is there. Its only switches are that consent file and CI markers; the session's home
  holds one that declines (``isolation.prepare_home``).
* the package's own cache (``~/.cache/convmixer_timm``: the demo's default output), pip's cache and what its
  builds run (rustup's settings), huggingface_hub's cache and stored token where a test does not set its own.

The checkout gets nothing either: timm's sdist (``test_timm_suite.py``) is kept in the virtual environment.

Tests run PyTorch on one thread (and the processes they start, through ``OMP_NUM_THREADS``): their tensors are
small, and where another program keeps a core busy every parallel region of two threads waits a scheduler slice
for the preempted one (a 4x4 float64 convolution took 60 ms instead of 0.2). The tests that prove the kernels'
split among threads set their thread counts themselves (``test_kernels.py``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from isolation import TELEMETRY_OFF, USER_DIRS, prepare_home

_saved: dict[str, str | None] = {}
_home: Path | None = None
_threads: int | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _home, _threads
    import torch

    _saved.update({key: os.environ.get(key) for key in (*USER_DIRS, *TELEMETRY_OFF, "OMP_NUM_THREADS")})
    _threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    _home = Path(tempfile.mkdtemp(prefix="convmixer-timm-tests-home-"))
    for key in USER_DIRS:
        os.environ.pop(key, None)
    os.environ["HOME"] = str(_home)
    os.environ.update(TELEMETRY_OFF)
    prepare_home(_home)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _threads is not None:
        import torch

        torch.set_num_threads(_threads)
    for key, value in _saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if _home is not None:
        shutil.rmtree(_home, ignore_errors=True)


@pytest.fixture(scope="session")
def user_env() -> dict[str, str]:
    """The user's own HOME and XDG_CONFIG_HOME (those that were set) from before the session: where to find
    their configuration (pip's, for the one download from the package registry)."""
    return {key: value for key in ("HOME", "XDG_CONFIG_HOME") if (value := _saved.get(key)) is not None}


@pytest.fixture(params=["kernels", "no-kernels"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the compiled kernels and with PyTorch's ops in their place (CONVMIXER_TIMM_KERNELS=0)."""
    from convmixer_timm import speed

    if request.param == "kernels" and speed.load() is None:
        pytest.skip("kernels not built")
    if request.param == "no-kernels":
        monkeypatch.setenv("CONVMIXER_TIMM_KERNELS", "0")
    return request.param


@pytest.fixture
def private_choice_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of the test's own for the choices optimize_for_inference remembers (the user's cache otherwise)."""
    monkeypatch.setenv("CONVMIXER_TIMM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"

"""timm's own model tests (tests/test_models.py of the installed timm's sdist) pass on every plugin model.

The sdist comes from the package registry (the one download this suite needs). timm's pretrained-weight tests
run too: a local Hub on 127.0.0.1 serves full-size (random) weights under the names the pretrained configs give,
so they exercise the real download path instead of being skipped.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import safetensors.torch
import timm
from hub_env import hub_env_vars
from hub_server import LocalHub

from convmixer_timm import VARIANTS

CACHE = Path(os.environ.get("CONVMIXER_TIMM_CACHE", Path(__file__).resolve().parents[1] / ".cache"))


def timm_tests_dir() -> Path:
    version = importlib.metadata.version("timm")
    target = CACHE / f"timm-{version}-tests"
    if (target / "tests" / "test_models.py").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"timm-{version}.tar.gz"
    if not sdist.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
               f"timm=={version}", "-d", str(CACHE)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0 and sdist.is_file(), (
            f"could not download timm=={version}'s sdist from the package registry: {done.stderr[-2000:]}")
    partial = target.with_suffix(".partial")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"timm-{version}/tests/")]
        tar.extractall(partial, members=members, filter="data")
    # Only tests/ is extracted, so `import timm` inside them resolves to the installed timm, plugin hook included.
    (partial / f"timm-{version}").rename(target)
    partial.rmdir()
    return target


def seed_pretrained_weights(hub: LocalHub, root: Path) -> list[str]:
    repos = []
    for variant in VARIANTS:
        if not variant.hf_hub_id:
            continue
        path = root / f"{variant.name}.safetensors"
        model = timm.create_model(variant.name)
        safetensors.torch.save_file(model.state_dict(), str(path))
        del model
        hub.add_file(variant.hf_hub_id, "model.safetensors", path)
        repos.append(variant.hf_hub_id)
    return repos


def test_timm_test_models_pass_on_every_plugin_model(tmp_path):
    tests = timm_tests_dir()
    names = [v.name for v in VARIANTS]
    # timm's prune contract test re-runs the model at every block index; timm's own CI leaves it out as slow
    # ("no marker, slow ... excluded from CI"), and here it runs on the 8-block CIFAR variants only.
    selection = f"({' or '.join(names)}) and not (prune_intermediate_layers_contract and not convmixer_256_8_)"
    with LocalHub(tmp_path / "hub") as hub:
        repos = seed_pretrained_weights(hub, tmp_path)
        env = {**os.environ, **hub_env_vars(hub.endpoint, tmp_path / "hf-home")}
        env.pop("GITHUB_ACTIONS", None)  # timm skips its pretrained tests there; here they run for real
        cmd = [sys.executable, "-m", "pytest", "tests/test_models.py", "-k", selection, "-q", "-rA",
               "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"]
        done = subprocess.run(cmd, cwd=tests, env=env, capture_output=True, text=True, timeout=1800)
    tail = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, tail
    passed = [line for line in done.stdout.splitlines() if line.startswith("PASSED")]
    for name in names:  # every plugin model went through timm's forward, backward, cfg and feature tests
        mine = [line for line in passed if f"-{name}]" in line or f"-{name}." in line]
        for test in ("test_model_forward[", "test_model_backward[", "test_model_default_cfgs_non_std[",
                     "test_model_forward_intermediates[", "test_model_forward_intermediates_features[",
                     "test_model_forward_torchscript[", "test_model_forward_fx[", "test_model_backward_fx[",
                     "test_model_forward_fx_torchscript["):
            assert any(test in line for line in mine), f"{name}: {test} did not pass\n{tail}"
    assert sum("test_prune_intermediate_layers_contract[convmixer_256_8_" in line for line in passed) == 3, tail
    for repo in repos:  # pretrained tests downloaded the weights from the local Hub and loaded them
        name = repo.split("/", 1)[1]
        assert any(f"test_model_load_pretrained[1-{name}]" in line for line in passed), tail
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    for line in skipped:  # timm skips only by input size; nothing else may be skipped
        assert "size" in line.lower() or "large" in line.lower(), line

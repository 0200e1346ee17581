"""The README's snippets run as written.

Every ```python block, in order, in one fresh interpreter (later blocks use what earlier ones imported), in an
empty working folder that holds what the README's user would have: the authors' original release
(``convmixer_768_32_ks7_p7_relu.pth.tar``, random weights in the authors' ``nn.Sequential`` layout) and a token
file. The bash lines that make files the Python blocks read (``convmixer-timm convert`` and ``push``) run first,
as written, through the installed console script. The Hub is ``LocalHub`` on 127.0.0.1, holding random weights
for ``timm/convmixer_768_32.in1k`` under the user ``me``.

Not run: the install lines, the CLI synopsis (its brackets are placeholders) and train.py / validate.py (timm's
repository scripts, replayed by ``test_timm_scripts.py``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hub_env import hub_env_vars
from hub_server import LocalHub
from reference import paper_convmixer

REPO_ROOT = Path(__file__).resolve().parents[1]
README = (REPO_ROOT / "README.md").read_text()
TOKEN = "local-readme-token"

pytestmark = pytest.mark.slow


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def readme_commands(program: str) -> list[str]:
    """Every line of the README's bash blocks that runs ``program`` (continuation lines joined)."""
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith(program + " ") and "[" not in line and "CHECKPOINT" not in line:
                commands.append(line.split("  #")[0].strip())
    return commands


def test_the_readme_has_the_snippets_this_test_runs():
    assert len(blocks("python")) >= 5
    assert any(" convert convmixer_768_32_ks7_p7_relu.pth.tar" in c for c in readme_commands("convmixer-timm"))
    assert any(" push " in c for c in readme_commands("convmixer-timm"))


def test_every_python_snippet_runs(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    torch.manual_seed(0)
    original = paper_convmixer(768, 32, kernel_size=7, patch_size=7, n_classes=1000, act=torch.nn.ReLU)
    torch.save(original.state_dict(), work / "convmixer_768_32_ks7_p7_relu.pth.tar")
    (work / "token-file").write_text(TOKEN + "\n")

    with LocalHub(tmp_path / "hub", username="me") as hub:
        import timm

        published = timm.create_model("convmixer_768_32")
        hub.add_file("timm/convmixer_768_32.in1k", "model.safetensors",
                     safetensors.torch.save({k: v.contiguous() for k, v in published.state_dict().items()}))
        del published
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env.update(hub_env_vars(hub.endpoint, tmp_path / "hf_home", TOKEN))
        env.pop("HF_TOKEN")  # push reads the token file, as the README shows
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")

        for command in readme_commands("convmixer-timm"):
            result = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                                    timeout=300)
            assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-2000:])

        script = "\n\n".join(blocks("python"))
        result = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    assert shutil.which("convmixer-timm", path=bin_dir)

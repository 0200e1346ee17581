"""``convert`` refuses what it should and survives kills.

Non-finite weights, extra and missing keys, zip checkpoints that would inflate far beyond their size, and real
SIGKILL/SIGTERM at named points of a write (real subprocesses, real signals): the output folder is always whole,
and the next run removes the leftovers of a killed one.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from reference import randomize_batchnorm, zip_bomb
from waiting import wait_until

from convmixer_timm import cli
from convmixer_timm.hub import recover_output
from convmixer_timm.models.checkpoint import (
    CheckpointError,
    describe_architecture,
    load_checkpoint_file,
    read_dimensions,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR = "convmixer_256_8_ks5_p2"
SMALL_ARGS = ["--model", CIFAR, "--model-kwargs", "dim=32", "depth=2"]


def small_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = randomize_batchnorm(timm.create_model(CIFAR, dim=32, depth=2), seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def entries(parent: Path) -> set[str]:
    return {p.name for p in parent.iterdir()}


# ---------------------------------------------------------------------------------------------------- refusals


def test_non_finite_weights_are_refused_naming_the_tensors(tmp_path, capsys):
    state = small_state(0)
    state["blocks.1.0.fn.0.weight"][0, 0, 0, :2] = float("nan")
    state["head.bias"][3] = float("inf")
    src = save(state, tmp_path / "nan.safetensors")
    parent = tmp_path / "hub"
    parent.mkdir()

    assert cli.main(["convert", str(src), "--out", str(parent / "out"), *SMALL_ARGS]) == 1
    err = capsys.readouterr().err
    assert "2 tensors hold NaN or infinite values" in err
    assert "blocks.1.0.fn.0.weight (2 NaN, 0 inf)" in err and "head.bias (0 NaN, 1 inf)" in err
    assert "--allow-non-finite" in err
    assert entries(parent) == set()

    assert cli.main(["convert", str(src), "--out", str(parent / "out"), "--allow-non-finite", *SMALL_ARGS]) == 0
    assert "warning: converting as asked (--allow-non-finite)" in capsys.readouterr().err
    loaded = safetensors.torch.load_file(parent / "out" / "model.safetensors")
    assert torch.isnan(loaded["blocks.1.0.fn.0.weight"]).sum() == 2 and torch.isinf(loaded["head.bias"]).sum() == 1


def test_extra_and_missing_keys_are_named_with_the_real_architecture(tmp_path, capsys):
    state = small_state(1)
    extra = {**state, "blocks.8.0.fn.0.extra": torch.zeros(3)}
    src = save(extra, tmp_path / "extra.safetensors")
    assert cli.main(["convert", str(src), "--out", str(tmp_path / "out"), *SMALL_ARGS]) == 1
    err = capsys.readouterr().err
    assert "1 unexpected key: blocks.8.0.fn.0.extra" in err
    assert "ConvMixer h=32, d=2, k=5, p=2" in err and "d=9" not in err
    assert "remove the keys named above" in err
    assert "Error(s) in loading state_dict" not in err

    missing = {k: v for k, v in state.items() if k != "blocks.1.3.running_var"}
    src = save(missing, tmp_path / "missing.safetensors")
    assert cli.main(["convert", str(src), "--out", str(tmp_path / "out"), *SMALL_ARGS]) == 1
    assert "1 missing key: blocks.1.3.running_var" in capsys.readouterr().err

    # A depth-2 checkpoint against the depth-8 default: the real depth, the missing blocks and the fix.
    src = save(state, tmp_path / "depth2.safetensors")
    assert cli.main(["convert", str(src), "--out", str(tmp_path / "out"), "--model", CIFAR, "--model-kwargs",
                     "dim=32"]) == 1
    err = capsys.readouterr().err
    assert "the checkpoint (ConvMixer h=32, d=2, k=5, p=2" in err and "h=32, d=8" in err
    assert "missing keys: blocks.2.0.fn.0.weight" in err
    assert "pass --model-kwargs dim=32 depth=2 kernel_size=5 patch_size=2 --num-classes 10" in err
    assert not (tmp_path / "out").exists()


def test_read_dimensions_counts_only_blocks_present():
    state = small_state(2)
    assert read_dimensions(state)[1] == 2
    stray = {**state, "blocks.8.0.fn.0.weight": state["blocks.0.0.fn.0.weight"], "blocks.x": torch.zeros(1)}
    assert read_dimensions(stray)[1] == 2  # a gap ends the count: blocks 2..7 are not there
    assert "d=2" in describe_architecture(stray)


def test_zip_bomb_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    bomb = zip_bomb(tmp_path / "bomb.pth", 64 << 20)
    assert bomb.stat().st_size < 1 << 20

    def never(*args, **kwargs):
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(bomb)
    message = str(info.value)
    assert f"would inflate to {(64 << 20) + 2:,} bytes" in message and "'archive/data.pkl'" in message
    assert "torch.save or as safetensors" in message


@pytest.mark.slow
def test_zip_bomb_memory_stays_bounded_in_a_fresh_process(tmp_path):
    """Peak memory, measured in a process of its own: a 256 MiB inflation must not happen."""
    bomb = zip_bomb(tmp_path / "bomb.pth", 256 << 20)
    code = textwrap.dedent(f"""
        import resource, sys
        from convmixer_timm.models.checkpoint import CheckpointError, load_checkpoint_file
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_checkpoint_file({str(bomb)!r})
        except CheckpointError as exc:
            print("refused:", exc)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print("grown_kib", grown)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "would inflate" in result.stdout
    grown_kib = int(result.stdout.split("grown_kib")[1])
    assert grown_kib < 32 * 1024, f"peak memory grew by {grown_kib} KiB"


def test_convert_reports_a_zip_bomb_and_leaves_nothing(tmp_path, capsys):
    bomb = zip_bomb(tmp_path / "bomb.pth", 16 << 20)
    parent = tmp_path / "hub"
    parent.mkdir()
    assert cli.main(["convert", str(bomb), "--out", str(parent / "out"), *SMALL_ARGS]) == 1
    assert "would inflate to" in capsys.readouterr().err
    assert entries(parent) == set()


# ---------------------------------------------------------------------------------------------------- kills

def _convert_until(point: str, src: Path, out: Path, marker: Path, *, exchange: bool = True) -> subprocess.Popen:
    # tests/pause_cli.py runs the real command line, stopped at `point` (see there).
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    pause = [str(Path(__file__).with_name("pause_cli.py")), *([] if exchange else ["--no-exchange"]), point,
             str(marker), "--"]
    process = subprocess.Popen(
        [sys.executable, *pause, "convert", str(src), "--out", str(out), "--overwrite", "-q", *SMALL_ARGS],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(marker.exists, f"convert reaching {point}", process)
    return process


KILL_CASES = [
    # (pause point, signal, renameat2 exchange available, which folder `out` holds right after the kill)
    ("staging-written", signal.SIGKILL, True, "old"),
    ("staging-written", signal.SIGTERM, True, "old"),
    ("after-exchange", signal.SIGKILL, True, "new"),
    ("after-exchange", signal.SIGTERM, True, "new"),
    ("after-first-rename", signal.SIGTERM, False, "old"),
    ("after-first-rename", signal.SIGKILL, False, None),  # only without renameat2: restored by the next run
]


@pytest.mark.parametrize(("point", "sig", "exchange", "holds"), KILL_CASES,
                         ids=[f"{c[0]}-{c[1].name}{'' if c[2] else '-no-renameat2'}" for c in KILL_CASES])
@pytest.mark.slow
def test_kill_during_overwrite_keeps_a_whole_output(tmp_path, capsys, point, sig, exchange, holds):
    parent = tmp_path / "hub"
    out = parent / "out"
    old_src, new_src = save(small_state(3), tmp_path / "old.safetensors"), save(small_state(4), tmp_path / "new.st")
    new_src = new_src.rename(tmp_path / "new.safetensors")
    assert cli.main(["convert", str(old_src), "--out", str(out), "-q", *SMALL_ARGS]) == 0
    old = folder_bytes(out)

    process = _convert_until(point, new_src, out, tmp_path / "marker", exchange=exchange)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == (128 + sig if sig == signal.SIGTERM else -sig), stderr

    if holds is None:
        assert not out.exists()  # the fallback's window: between its two renames
    else:
        assert folder_bytes(out) == old if holds == "old" else folder_bytes(out) != old
    if sig == signal.SIGTERM:
        assert "terminated (SIGTERM)" in stderr
        assert entries(parent) == {"out"}  # the handler cleaned up
    else:
        leftovers = entries(parent) - {"out"}  # hidden staging (and backup) folders of the killed run
        assert leftovers and all(name.startswith(f".out.{process.pid}.") for name in leftovers), leftovers

    # The next run (here one that is refused: the output exists) removes the leftovers of the dead process
    # and, where the kill left only the backup, puts the previous output back.
    assert cli.main(["convert", str(new_src), "--out", str(out), *SMALL_ARGS]) == 1
    assert "already exists" in capsys.readouterr().err
    assert entries(parent) == {"out"}
    expected_new = holds == "new"
    assert (folder_bytes(out) != old) if expected_new else (folder_bytes(out) == old)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert loaded.state_dict()["head.bias"].shape == (10,)


def test_recover_output_leaves_live_processes_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.{dead_pid}.0123abcd.partial"
    live = tmp_path / ".out.1.0123abcd.partial"  # pid 1 is always alive
    other = tmp_path / f".other.{dead_pid}.0123abcd.partial"  # another output's: not ours to judge
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    recover_output(out)
    assert entries(tmp_path) == {"out", live.name, other.name}


def test_overwrite_of_a_symlinked_output_keeps_the_link_target(tmp_path):
    parent = tmp_path / "hub"
    parent.mkdir()
    target = tmp_path / "elsewhere"
    assert cli.main(["convert", str(save(small_state(5), tmp_path / "a.safetensors")), "--out", str(target), "-q",
                     *SMALL_ARGS]) == 0
    before = folder_bytes(target)
    (parent / "out").symlink_to(target, target_is_directory=True)
    new_src = save(small_state(6), tmp_path / "b.safetensors")
    assert cli.main(["convert", str(new_src), "--out", str(parent / "out"), "--overwrite", "-q", *SMALL_ARGS]) == 0
    assert not (parent / "out").is_symlink() and folder_bytes(parent / "out") != before
    assert folder_bytes(target) == before  # the link was replaced, what it pointed to was not touched
    assert entries(parent) == {"out"}

"""The speed layer's safety: what is loaded, from where, on which CPU; what it does to the process; how it chooses.

Nothing here times anything: the choice of inference path is tested with an injected clock, and memory is read
from /proc, not inferred from speed.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from dispatched import OurOperatorCalls
from waiting import wait_until

from convmixer_timm import VARIANTS, ConvMixer, speed
from convmixer_timm.speed import build, loader
from convmixer_timm.speed.precision import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "convmixer_timm"
LIBRARY = PACKAGE / "speed" / build.LIBRARY_NAME
MANIFEST = PACKAGE / "speed" / build.MANIFEST_NAME
needs_kernels = pytest.mark.skipif(speed.load() is None, reason="kernels not built here (no C++ compiler)")
needs_compiler = pytest.mark.skipif(build.find_compiler() is None, reason="no C++ compiler")
posix_owners = pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes")


def _private_copy(tmp_path: Path, library: Path = LIBRARY, manifest: Path = MANIFEST) -> Path:
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    shutil.copy(library, folder / build.LIBRARY_NAME)
    shutil.copy(manifest, folder / build.MANIFEST_NAME)
    return folder / build.LIBRARY_NAME


def _load_error(path: Path) -> str:
    with pytest.raises(loader.KernelLoadError) as caught:
        loader.load_from(path)
    return str(caught.value)


# ------------------------------------------------------------------------------------------------ loading


@needs_kernels
@posix_owners
def test_an_intact_private_copy_loads(tmp_path):
    library = loader.load_from(_private_copy(tmp_path))
    assert library.isa in loader.ISAS and callable(library.spatial_mixing_f32)


@needs_kernels
@pytest.mark.parametrize("damage", ["truncated", "empty", "one byte changed"])
def test_a_damaged_library_is_never_mapped(tmp_path, damage):
    path = _private_copy(tmp_path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                      "one byte changed": data[:-1] + bytes([data[-1] ^ 1])}[damage])
    assert "damaged" in _load_error(path)  # refused before dlopen: a truncated ELF file would SIGBUS in it


@needs_kernels
def test_a_stale_build_is_refused(tmp_path):
    path = _private_copy(tmp_path)
    sources = tmp_path / "sources"
    sources.mkdir()
    for name in build.SOURCES:
        shutil.copy(PACKAGE / "speed" / name, sources / name)
    with (sources / build.SOURCES[1]).open("a") as edited:
        edited.write("\n// edited after the build\n")
    with pytest.raises(loader.KernelLoadError, match="other sources"):
        loader.load_from(path, sources=sources)


@needs_compiler
@posix_owners
def test_a_foreign_library_without_the_entry_points_is_refused(tmp_path):
    # A real shared object that passes the manifest check but is not ours: missing symbols, not a crash later.
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    source = tmp_path / "foreign.cpp"
    source.write_text(textwrap.dedent("""
        #include <cstring>
        extern "C" int cmx_abi_version() { return ABI; }
        extern "C" const char* cmx_compiled_isas() { return "baseline"; }
        extern "C" int cmx_cpu_supports(const char* isa) { return std::strcmp(isa, "baseline") == 0; }
    """).replace("ABI", str(build.ABI_VERSION)))
    library = folder / build.LIBRARY_NAME
    subprocess.run([build.find_compiler(), "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    (folder / build.MANIFEST_NAME).write_text(json.dumps(dict(
        abi=build.ABI_VERSION, library_sha256=build.file_digest(library), sources_sha256=build.sources_digest())))
    assert "lacks the entry point" in _load_error(library)


# ------------------------------------------------------------------------------------------------ processes

TRAIN_ONE_STEP = """
import json, warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from convmixer_timm import ConvMixer, speed
    torch.manual_seed(0)
    model = ConvMixer(8, 1, 3, 2, num_classes=2).train()
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 1, 0]))
        loss.backward()
print("library", speed.load() is not None)
print("warnings", len([w for w in caught if "kernels" in str(w.message)]))
print("messages", [str(w.message) for w in caught])
print("grad", float(model.blocks[0][0].fn[0].weight.grad.abs().sum()))
print("loss", float(loss))
state = {f"{name}.grad": p.grad for name, p in model.named_parameters()} | dict(model.named_buffers())
print("state", json.dumps({name: t.double().flatten().tolist() for name, t in state.items()}))
"""


def _run_with_package(package_root: Path, code: str, **env: str) -> dict[str, str]:
    # cwd: `python -c` puts the working folder first on sys.path, ahead of PYTHONPATH.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=package_root, env={**os.environ, "PYTHONPATH": str(package_root), **env})
    assert result.returncode == 0, result.stderr
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())



# ------------------------------------------------------------------------------------------------ dispatch


@needs_kernels
def test_the_copy_for_this_cpu_is_chosen_and_can_be_forced(monkeypatch):
    best = loader.load_from(LIBRARY).isa
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512_bf16"} <= flags:
        assert best == "avx512_bf16"
    elif {"avx512f", "avx512bw"} <= flags:
        assert best == "avx512"
    elif {"avx2", "fma"} <= flags:
        assert best == "avx2"
    for forced in ("baseline", "avx512" if best == "avx512_bf16" else "baseline"):  # a CPU without AVX512_BF16
        monkeypatch.setenv("CONVMIXER_TIMM_CPU_ISA", forced)
        assert loader.load_from(LIBRARY).isa == forced
    if best not in ("avx512", "avx512_bf16"):
        for forced in ("avx512", "avx512_bf16"):
            monkeypatch.setenv("CONVMIXER_TIMM_CPU_ISA", forced)
            with pytest.warns(RuntimeWarning, match="not available on this CPU"):
                assert loader.load_from(LIBRARY).isa == best  # never a copy this CPU cannot run


@needs_kernels
def test_every_copy_this_cpu_runs_computes_the_same(monkeypatch):
    torch.manual_seed(0)
    u = torch.randn(2, 21, 9, 13).contiguous(memory_format=torch.channels_last)
    weight, vectors = torch.randn(9, 9, 21), [torch.randn(21) for _ in range(4)]
    grad_out, x = torch.randn(2, 21, 9, 13), torch.randn(2, 21, 9, 13)
    bn_x, bn_w, bn_b = torch.randn(4, 21, 5, 5), torch.rand(21) + 0.5, torch.randn(21)
    u_bf16 = u.bfloat16()
    results = {}
    for isa in loader.ISAS:
        monkeypatch.setenv("CONVMIXER_TIMM_CPU_ISA", isa)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a copy this CPU cannot run: tested above
            library = loader.load_from(LIBRARY)
        if library.isa != isa:
            continue  # this CPU cannot run it
        monkeypatch.setattr(loader, "_library", library)
        monkeypatch.setattr(loader, "_tried", True)
        results[isa] = [
            speed.spatial_mixing(u, vectors[0], vectors[1], weight, vectors[2], vectors[3], "gelu"),
            speed.depthwise_weight_grad(grad_out, x, 9, 4),
            speed.batch_norm_training_with_kernels(bn_x, bn_w, bn_b, None, None, 0.1, 1e-5),
            speed.spatial_mixing_bf16(u_bf16, vectors[0], vectors[1], weight, vectors[2], vectors[3], "gelu"),
        ]
    assert "baseline" in results and len(results) >= 2
    reference = results.pop("baseline")
    for isa, outputs in results.items():
        for expected, actual in zip(reference, outputs, strict=True):
            # bf16 results: float32 sums that differ in their last bits may round to neighbouring bf16 values.
            rtol = 2**-7 if expected.dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item(),
                                       msg=f"{isa} differs from the baseline copy")


@pytest.mark.skipif(shutil.which("objdump") is None or not LIBRARY.exists(), reason="needs objdump and the library")
@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64", reason="x86-64 only")
def test_each_copy_uses_only_its_own_instruction_set():
    # One binary for every x86-64 CPU: the baseline copy and the shared C++ runtime code must hold no AVX
    # (VEX/EVEX) instruction, the AVX2 copy no 512-bit register, and only the AVX512_BF16 copy the bf16
    # conversion. Catches a -march=native or a leaked target.
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(LIBRARY)], capture_output=True,
                             text=True, check=True).stdout
    counts: dict[str, dict[str, int]] = {}
    current = "other"
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:", line)
        if header:
            name = header.group(1)
            current = next((isa for isa in ("avx512_bf16", "avx512", "avx2", "baseline") if f"cmx_{isa}" in name
                            or name.endswith(f"__{isa}")), "other")
            continue
        seen = counts.setdefault(current, {"vex": 0, "zmm": 0, "lines": 0, "bf16": 0})
        seen["lines"] += 1
        seen["vex"] += bool(re.search(r"\tv[a-z0-9]+\s", line))
        seen["zmm"] += "zmm" in line
        seen["bf16"] += "vcvtneps2bf16" in line
    assert counts["baseline"]["lines"] > 1000 and counts["baseline"]["vex"] == 0
    assert counts["other"]["vex"] == 0
    assert counts["avx2"]["vex"] > 0 and counts["avx2"]["zmm"] == 0
    assert counts["avx512"]["zmm"] > 0 and counts["avx512_bf16"]["zmm"] > 0
    assert counts["avx512_bf16"]["bf16"] > 0
    assert all(seen["bf16"] == 0 for isa, seen in counts.items() if isa != "avx512_bf16")


def test_nothing_distributed_is_built_for_the_build_machine():
    assert not any("native" in flag for flag in build._FLAGS)
    hook = (ROOT / "hatch_build.py").read_text()
    assert "native" not in hook


# ------------------------------------------------------------------------------------------------ kills, races


def _process_table() -> dict[int, tuple[str, int, int, str]]:
    """pid -> (name, parent pid, process group, state) of every process visible in /proc."""
    table = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_file.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        state, parent, group = text.rsplit(")", 1)[1].split()[:3]
        table[int(stat_file.parent.name)] = (name, int(parent), int(group), state)
    return table


def _descendants(pid: int) -> dict[int, tuple[str, int, int, str]]:
    table = _process_table()
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, row in table.items():
            if row[1] == parent and child not in found:
                found[child] = row
                frontier.append(child)
    return found


def _group_alive(group: int) -> bool:
    return any(row[2] == group and row[3] != "Z" for row in _process_table().values())


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


# build.py as a terminal runs it: Ctrl-C raises KeyboardInterrupt. A test session started in the background by a
# shell (`cmd &`, nohup) ignores SIGINT, and an ignored signal stays ignored in every process it starts.
_RUN_WITH_CTRL_C = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                    "sys.argv = sys.argv[1:]; sys.path[0] = __import__('os').path.dirname(sys.argv[0]); "
                    "runpy.run_path(sys.argv[0], run_name='__main__')")


def _start_build(out: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _RUN_WITH_CTRL_C, str(PACKAGE / "speed" / "build.py"), str(out)],
                            cwd=out.parent, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _process_state(pid: int) -> str:
    """What a process that did not end is doing, with its signal masks, and its children (for the failure)."""
    lines = []
    for proc in [pid, *_descendants(pid)]:
        try:
            status = Path(f"/proc/{proc}/status").read_text().splitlines()
            wchan = Path(f"/proc/{proc}/wchan").read_text()
        except OSError:
            continue
        keep = [line for line in status if line.split(":")[0] in ("Name", "State", "SigBlk", "SigIgn", "SigCgt")]
        lines.append(f"{proc} wchan={wchan} " + " ".join(keep))
    return "\n".join(lines)


@needs_compiler
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_build_killed_midway_leaves_no_compiler_and_nothing_outside_its_folder(tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()
    process = _start_build(out, TMPDIR=str(scratch))
    try:
        wait_until(lambda: any(row[0] == "cc1plus" for row in _descendants(process.pid).values()),
                   "cc1plus starting", process)
        group = next(row[2] for row in _descendants(process.pid).values() if row[0] == "cc1plus")
        assert group != os.getpgrp()  # the compiler's own group: what dies with the build, whatever kills it
        process.kill()
        process.wait(timeout=60)
        # Before the watchdog, cc1plus outlived its killed driver and finished its ~20 s compile alone.
        wait_until(lambda: not _group_alive(group), "cc1plus ending with the killed build")
    finally:
        if process.poll() is None:
            process.kill()
    assert list(scratch.iterdir()) == []  # -pipe and TMPDIR in the staging folder: nothing left in /tmp
    leftovers = sorted(out.glob(".building-*"))
    assert leftovers and not (out / build.LIBRARY_NAME).exists() and not (out / build.MANIFEST_NAME).exists()
    assert sorted(build.remove_stale_builds(out)) == leftovers  # what the next build does first
    assert list(out.iterdir()) == []


LINGERING_COMPILER = """#!/bin/sh
# A compiler driver whose helper would outlive it (as cc1plus did): the build must take the helper down too.
sleep 600 &
echo $! > "$CMX_TEST_HELPER_PID.partial" && mv "$CMX_TEST_HELPER_PID.partial" "$CMX_TEST_HELPER_PID"
wait
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("sleep") is None, reason="POSIX, /proc")
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_whatever_ends_a_build_its_compilers_helpers_end_with_it(tmp_path, signal_name):
    compiler = tmp_path / "c++"
    compiler.write_text(LINGERING_COMPILER)
    compiler.chmod(0o755)
    helper_pid_file, out = tmp_path / "helper.pid", tmp_path / "out"
    process = _start_build(out, CXX=str(compiler), CMX_TEST_HELPER_PID=str(helper_pid_file))
    helper = None
    try:
        wait_until(helper_pid_file.exists, "the compiler's helper starting", process)
        helper = int(helper_pid_file.read_text())
        process.send_signal(getattr(signal, signal_name))
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the build outlived {signal_name} by 60 s:\n{_process_state(process.pid)}")
        wait_until(lambda: _gone(helper), f"the compiler's helper ending with the build ({signal_name})")
    finally:
        if process.poll() is None:
            process.kill()
        if helper is not None and not _gone(helper):
            os.kill(helper, signal.SIGKILL)
    build.remove_stale_builds(out)
    assert list(out.iterdir()) == []


@needs_kernels
@pytest.mark.slow
def test_processes_starting_together_load_without_writing_anything(tmp_path):
    # torchrun with N ranks: nothing is compiled, cached or written at run time, so there is nothing to race for.
    home = tmp_path / "home"
    home.mkdir(mode=0o500)  # not even writable
    before = {p: p.stat().st_mtime_ns for p in (PACKAGE / "speed").iterdir()}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(home), "TMPDIR": str(home)}
    processes = [subprocess.Popen([sys.executable, "-c", TRAIN_ONE_STEP], cwd=ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
        assert "library True" in stdout and "warnings 0" in stdout, stdout
    assert list(home.iterdir()) == []
    assert {p: p.stat().st_mtime_ns for p in (PACKAGE / "speed").iterdir() if p.name != "__pycache__"} == {
        p: t for p, t in before.items() if p.name != "__pycache__"}


# ------------------------------------------------------------------------------------------------ wheels


def _build_wheel(tmp_path: Path, **env: str) -> Path:
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info",
                                                                "_convmixer_kernels.*", "tmp*", ".pytest_cache"))
    out = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("*.whl")
    return wheel


@needs_compiler
@pytest.mark.slow
def test_the_wheel_ships_the_compiled_kernels_for_its_platform(tmp_path):
    pytest.importorskip("hatchling")
    wheel = _build_wheel(tmp_path)
    assert wheel.name.endswith(".whl") and "-py3-none-" in wheel.name and "any" not in wheel.name.split("-")[-1]
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read(f"convmixer_timm/speed/{build.MANIFEST_NAME}"))
        library = archive.read(f"convmixer_timm/speed/{build.LIBRARY_NAME}")
    assert {"convmixer_timm/speed/convmixer_kernels.cpp", "convmixer_timm/speed/kernels_body.inc"} <= names
    import hashlib

    assert manifest["library_sha256"] == hashlib.sha256(library).hexdigest()
    assert manifest["sources_sha256"] == build.sources_digest()


def test_a_wheel_built_without_a_compiler_is_pure_python_and_warns(tmp_path):
    pytest.importorskip("hatchling")
    wheel = _build_wheel(tmp_path, CXX="/nonexistent/c++", PATH="/nonexistent")
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert not [n for n in archive.namelist() if "_convmixer_kernels" in n]


# ------------------------------------------------------------------------------------------------ allocator

ALLOCATOR_SCOPE = """
import gc, os, torch
from convmixer_timm import ConvMixer, restore_cpu_allocator
from convmixer_timm.speed import allocator_tuned, tune_cpu_allocator

def scope(case):
    meta = ConvMixer(8, 2, 3, 2, num_classes=2, device="meta")
    model = ConvMixer(8, 2, 3, 2, num_classes=2)
    model.eval()(torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 8, 8))
    print(case + ".built_eval_nograd", allocator_tuned())
    model.train()(torch.randn(2, 3, 8, 8)).sum().backward()
    print(case + ".training", allocator_tuned())
    del model
    gc.collect()
    print(case + ".freed", allocator_tuned())
    again = ConvMixer(8, 2, 3, 2, num_classes=2).train()
    again(torch.randn(2, 3, 8, 8)).sum().backward()
    restore_cpu_allocator()
    print(case + ".restored", allocator_tuned())
    print(case + ".asked", tune_cpu_allocator())
    third = ConvMixer(8, 2, 3, 2, num_classes=2).train()
    third(torch.randn(2, 3, 8, 8)).sum().backward()
    del third
    gc.collect()
    print(case + ".asked_outlives_models", allocator_tuned())
    restore_cpu_allocator()
    print(case + ".asked_restored", allocator_tuned())

scope("default")  # the variable is read at each training step: one process runs both cases in turn
os.environ["CONVMIXER_TIMM_TUNE_MALLOC"] = "1"
scope("env")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
@pytest.mark.slow
def test_the_allocator_setting_is_changed_only_when_asked_and_only_while_asked():
    out = _run_with_package(ROOT, ALLOCATOR_SCOPE)
    # By default training leaves glibc alone; asked directly, the setting outlives models until restored.
    assert {k.split(".")[1]: v for k, v in out.items() if k.startswith("default.")} == {
        "built_eval_nograd": "False", "training": "False", "freed": "False", "restored": "False",
        "asked": "True", "asked_outlives_models": "True", "asked_restored": "False"}
    # CONVMIXER_TIMM_TUNE_MALLOC=1: raised exactly while a model trains on the CPU, undone when it is freed.
    assert {k.split(".")[1]: v for k, v in out.items() if k.startswith("env.")} == {
        "built_eval_nograd": "False", "training": "True", "freed": "False", "restored": "False",
        "asked": "True", "asked_outlives_models": "True", "asked_restored": "False"}


@needs_kernels
@pytest.mark.parametrize("in_chans", [1, 2, 3, 4])
def test_every_input_channel_count_trains_on_the_kernels(in_chans):
    # One channel is channels_last and NCHW at once; the stem must still hand the blocks a channels_last tensor.
    torch.manual_seed(0)
    model = ConvMixer(8, 1, 3, 2, in_chans=in_chans, num_classes=2).train()
    x = torch.randn(4, in_chans, 16, 16)
    with OurOperatorCalls() as ours:
        model(x).sum().backward()
    assert ours.called == {"act_batch_norm_train", "act_batch_norm_train_backward", "depthwise_conv",
                           "depthwise_conv_same", "depthwise_weight_grad"}


MEMORY_AFTER_TRAINING = """
import gc, sys, torch, torch.nn.functional as F
from timm.models.convmixer import ConvMixer as TimmConvMixer
from convmixer_timm import ConvMixer
torch.manual_seed(0)
cls = ConvMixer if sys.argv[1] == "ours" else TimmConvMixer
kwargs = dict(act_layer="gelu") if sys.argv[1] == "ours" else {}
model = cls(64, 4, kernel_size=5, patch_size=1, num_classes=10, **kwargs).train()
x = torch.randn(48, 3, 32, 32)
if sys.argv[1] == "timm":
    model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
for _ in range(2):
    opt.zero_grad()
    F.cross_entropy(model(x), torch.randint(0, 10, (48,))).backward()
    opt.step()
del model, opt, x
gc.collect()
rss = int(open("/proc/self/statm").read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")
print("rss", rss)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc")
@pytest.mark.slow
def test_after_training_is_freed_the_process_holds_no_more_than_timm_would():
    def rss(which: str) -> int:
        result = subprocess.run([sys.executable, "-c", MEMORY_AFTER_TRAINING, which], capture_output=True,
                                text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0, result.stderr
        return int(result.stdout.split()[-1])

    timm_rss, ours = rss("timm"), rss("ours")
    assert ours <= 1.25 * timm_rss + (100 << 20), (ours >> 20, timm_rss >> 20)


# ------------------------------------------------------------------------------------------------ choosing


class FakeClock:
    """A clock that only moves when a fake path runs, by that path's scripted cost."""

    def __init__(self) -> None:
        self.now = 0.0
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        return self.now

    def path(self, seconds: float):
        def run(*_args: object) -> None:
            self.now += seconds

        return run


def test_optimize_for_inference_measures_each_new_shape_once(caplog):
    model = ConvMixer(8, 1, 3, 2, num_classes=3).eval()
    clock = FakeClock()
    tuned = speed.AutotunedConvMixer(model, clock=clock, rounds=3)
    assert clock.readings == 0  # nothing is measured before the first input
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="convmixer_timm"):
        expected = model(torch.ones(2, 3, 8, 8))
        torch.testing.assert_close(tuned(torch.ones(2, 3, 8, 8)), expected, rtol=1e-5, atol=1e-5)
        first = clock.readings
        assert first > 0 and len(tuned.choices) == 1
        tuned(torch.ones(2, 3, 8, 8))
        assert tuned.tunings == 1  # the same shape reuses its choice
        tuned(torch.ones(1, 3, 10, 10))
        assert clock.readings > first and len(tuned.choices) == 2 and tuned.tunings == 2
    announced = [record.getMessage() for record in caplog.records if "timing" in record.getMessage()]
    assert len(announced) == 2 and "[2, 3, 8, 8]" in announced[0]


def test_with_input_size_the_measurement_happens_up_front_and_silently(caplog, capsys):
    model = ConvMixer(8, 1, 3, 2, num_classes=3).eval()
    with caplog.at_level(logging.INFO, logger="convmixer_timm"):
        tuned = speed.optimize_for_inference(model, input_size=(3, 8, 8))
    assert list(tuned.choices) == [((1, 1), (3, 8, 8), torch.float32, "cpu")]
    assert "timing" not in caplog.text and not capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ quiet


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_a_plain_forward_and_backward_of_every_variant_prints_no_warning(variant):
    import timm

    model = timm.create_model(variant.name, dim=8, depth=1, num_classes=3)
    x = torch.randn(2, 3, variant.img_size // 2, variant.img_size // 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning, PyTorch's padding='same' one included, fails the test
        for training in (True, False):
            model.train(training)
            model(x).sum().backward()
        with torch.no_grad():
            model.eval()(x)

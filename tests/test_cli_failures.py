"""Every ``convert`` / ``push`` failure is one line naming the cause and the fix, with the documented exit status:
a full disk, a file size limit, a read-only file system, a folder the user
may not write to, a dangling symlink, ``/``, long names, SIGTERM while starting, other users' leftovers in a shared
folder, weights that are not float, NaN weights on ``push``, and a checkpoint of another architecture.

Real file systems (a 1 MiB tmpfs, a read-only tmpfs: root only), real users (``nobody``: root only), real
processes and signals; nothing is mocked.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from hub_env import hub_environment
from hub_server import LocalHub
from reference import randomize_batchnorm

from convmixer_timm import cli
from convmixer_timm.hub import recover_output, save_hub_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR = "convmixer_256_8_ks5_p2"
SMALL_ARGS = ["--model", CIFAR, "--model-kwargs", "dim=32", "depth=2", "-q"]
BIG_ARGS = ["--model", CIFAR, "--model-kwargs", "dim=256", "depth=4", "-q"]  # 1.2 MB of weights
NOBODY = 65534
TOKEN = "hf_failures_token_0123456789"


def small_state(seed: int, **overrides) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = randomize_batchnorm(timm.create_model(CIFAR, **{"dim": 32, "depth": 2, **overrides}), seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    path.chmod(0o644)  # safetensors writes 0600; the runs as another user read it
    return path


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def convert(*argv: object) -> int:
    return cli.main(["convert", *(str(a) for a in argv)])


def one_line(err: str) -> str:
    """The error line, asserting it is the only output (progress lines are off with -q) and no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (to mount a file system or act as another user)")


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    needs_root()
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder every user may write to, sticky like /tmp (pytest's tmp_path is private to its owner)."""
    needs_root()
    folder = Path(tempfile.mkdtemp(prefix="convmixer-shared-"))
    folder.chmod(0o1777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


# Runs one command as ``nobody``. The interpreter here may live where nobody cannot read (a pyenv under /root), so
# the process starts as root, runs the same command once into a scratch folder (importing all it needs), then
# drops to nobody for good, and runs the command under test: the kernel checks every file access as nobody's.
_AS_NOBODY = textwrap.dedent(f"""
    import json, os, sys
    from convmixer_timm import cli
    warm_up, argv = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    if cli.main(warm_up) != 0:
        raise SystemExit("the warm-up run as root failed")
    os.setgroups([])
    os.setgid({NOBODY})
    os.setuid({NOBODY})
    raise SystemExit(cli.main(argv))
""")


def run_as_nobody(argv: list[str], warm_up: list[str], home: Path) -> subprocess.CompletedProcess:
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", _AS_NOBODY, json.dumps(warm_up), json.dumps(argv)],
                          capture_output=True, text=True, env=env, cwd=home, timeout=300)


# ---------------------------------------------------------------------------------------------------- disks


def test_full_disk_is_one_line_and_keeps_the_old_folder(tmp_path, capsys):
    big = save(small_state(0, dim=256, depth=4), tmp_path / "big.safetensors")
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        assert convert(big, "--out", disk / "new", *BIG_ARGS) == 1
        line = one_line(capsys.readouterr().err)
        assert line == (f"convmixer-timm convert: error: cannot write {disk / 'new'}: no space is left on the device; "
                        "free some space, or choose an output folder on another disk. Nothing was written.")
        assert list(disk.iterdir()) == []

        assert convert(save(small_state(1), tmp_path / "small.safetensors"), "--out", disk / "out", *SMALL_ARGS) == 0
        before = folder_bytes(disk / "out")
        assert convert(big, "--out", disk / "out", "--overwrite", *BIG_ARGS) == 1
        line = one_line(capsys.readouterr().err)
        assert "no space is left on the device" in line and "the existing folder is unchanged" in line
        assert folder_bytes(disk / "out") == before and [p.name for p in disk.iterdir()] == ["out"]


@pytest.mark.slow
def test_file_size_limit_is_one_line(tmp_path):
    """RLIMIT_FSIZE (``ulimit -f``) in a child process: needs no privileges."""
    big = save(small_state(2, dim=256, depth=4), tmp_path / "big.safetensors")
    out = tmp_path / "hub" / "out"

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

    result = subprocess.run([sys.executable, "-m", "convmixer_timm", "convert", str(big), "--out", str(out),
                             *BIG_ARGS], capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 1, result.stderr
    assert one_line(result.stderr) == (
        f"convmixer-timm convert: error: cannot write {out}: a file would exceed the file size limit (ulimit -f); "
        "raise the limit, or write elsewhere. Nothing was written.")
    assert not (tmp_path / "hub").exists()  # the parent folder created for the output went too


def test_read_only_file_system_is_one_line_before_anything_is_read(tmp_path, capsys):
    src = save(small_state(3), tmp_path / "w.safetensors")
    with tmpfs(tmp_path / "ro", "size=1m,ro") as read_only:
        for out in (read_only / "out", read_only / "a" / "b" / "out"):
            assert convert(src, "--out", out, *SMALL_ARGS) == 1
            assert one_line(capsys.readouterr().err) == (
                f"convmixer-timm convert: error: cannot write {out}: {read_only} is not writable (the file system "
                "is read-only); choose an output folder on a writable file system")
        # Checked first: a corrupt input is not even read.
        corrupt = tmp_path / "corrupt.safetensors"
        corrupt.write_bytes(b"garbage")
        assert convert(corrupt, "--out", read_only / "out", *SMALL_ARGS) == 1
        assert "is not writable" in capsys.readouterr().err


@pytest.mark.slow
def test_a_folder_the_user_may_not_write_to_is_one_line(shared, tmp_path):
    src = save(small_state(4), shared / "w.safetensors")
    locked = shared / "locked"
    locked.mkdir(mode=0o755)  # root's
    result = run_as_nobody(["convert", str(src), "--out", str(locked / "out"), *SMALL_ARGS],
                           ["convert", str(src), "--out", str(tmp_path / "warm-up"), *SMALL_ARGS], shared / "home")
    assert result.returncode == 1, result.stderr
    assert one_line(result.stderr) == (
        f"convmixer-timm convert: error: cannot write {locked / 'out'}: {locked} is not writable (permission "
        "denied); choose an output folder you can write to")
    assert list(locked.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- paths


def test_a_dangling_symlink_is_named_and_replaced_only_when_asked(tmp_path, capsys):
    src = save(small_state(5), tmp_path / "w.safetensors")
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere", target_is_directory=True)
    assert convert(src, "--out", link, *SMALL_ARGS) == 1
    assert one_line(capsys.readouterr().err) == (
        f"convmixer-timm convert: error: {link} is a symbolic link to {tmp_path / 'nowhere'}, which does not exist; "
        "pass --overwrite (overwrite=True) to replace the link with the folder, or remove it")
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()

    assert convert(src, "--out", link, "--overwrite", *SMALL_ARGS) == 0
    assert link.is_dir() and not link.is_symlink() and not (tmp_path / "nowhere").exists()
    assert timm.create_model(f"local-dir:{link}", pretrained=True).state_dict()["head.bias"].shape == (10,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "w.safetensors"]


def test_overwrite_never_replaces_a_folder_it_did_not_write(tmp_path, capsys):
    """A slip such as `--out ~ --overwrite` must not delete a home folder."""
    src = save(small_state(15), tmp_path / "w.safetensors")
    home = tmp_path / "home"
    (home / "documents").mkdir(parents=True)
    (home / "notes.txt").write_text("keep me")
    assert convert(src, "--out", home, "--overwrite", *SMALL_ARGS) == 1
    assert one_line(capsys.readouterr().err) == (
        f"convmixer-timm convert: error: {home} holds files a Hub folder written here does not (documents, "
        "notes.txt), and --overwrite replaces only such a folder (config.json, model.safetensors, README.md); "
        "choose another output path, or move those files away first")
    assert sorted(p.name for p in home.iterdir()) == ["documents", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "w.safetensors"]

    (home / "notes.txt").unlink()
    (home / "documents").rmdir()
    assert convert(src, "--out", home, "--overwrite", *SMALL_ARGS) == 0  # an empty folder is replaced
    assert convert(src, "--out", home, "--overwrite", *SMALL_ARGS) == 0  # and so is one it wrote


@pytest.mark.parametrize("out", ["/", "..", "sub/..", "."])
def test_a_path_that_names_no_folder_is_bad_usage(tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    src = save(small_state(6), tmp_path / "w.safetensors")
    assert convert(src, "--out", out, "--overwrite", *SMALL_ARGS) == 2
    assert one_line(capsys.readouterr().err) == (
        f"convmixer-timm convert: error: --out: the output path {out!r} names no folder to create; name a new "
        "folder, e.g. ./convmixer_768_32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


@pytest.mark.parametrize("length", [240, 255])
def test_long_output_names_that_the_file_system_allows(tmp_path, capsys, length):
    src = save(small_state(7), tmp_path / "w.safetensors")
    parent = tmp_path / "hub"
    name = ("convmixer-" + "x" * length)[:length]
    assert convert(src, "--out", parent / name, *SMALL_ARGS) == 0, capsys.readouterr().err
    assert [p.name for p in parent.iterdir()] == [name]
    assert convert(src, "--out", parent / name, "--overwrite", *SMALL_ARGS) == 0, capsys.readouterr().err
    assert [p.name for p in parent.iterdir()] == [name]


@pytest.mark.slow
def test_leftovers_of_a_killed_run_with_a_long_name_are_removed(tmp_path):
    """A run with a 255-byte output name is killed (SIGKILL: no clean-up) while writing; the next run of any
    user command on that output removes its staging folder."""
    src = save(small_state(8), tmp_path / "w.safetensors")
    parent = tmp_path / "hub"
    parent.mkdir()
    out = parent / ("é" * 127 + "x")  # 255 bytes in UTF-8: the staging name must cut whole characters
    script = textwrap.dedent(f"""
        import os, signal, sys
        from convmixer_timm.hub import install
        def killed(staging, out_dir, overwrite):  # the folder is staged, complete: die before it is moved
            print(staging.name, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        install.move_into_place = killed
        from convmixer_timm import cli
        cli.main(["convert", {str(src)!r}, "--out", {str(out)!r}, *{SMALL_ARGS!r}])
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    staging = killed.stdout.strip()
    assert len(os.fsencode(staging)) <= 255 and staging.endswith(".partial")
    assert [p.name for p in parent.iterdir()] == [staging]
    recover_output(out)
    assert list(parent.iterdir()) == []


def _hostile(tmp_path: Path) -> dict[str, tuple[list[object], int, str]]:
    """Inputs a careless or hostile caller gives, each with its exit status and a fragment of its one line."""
    src = tmp_path / "w.safetensors"
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as file:
        file.truncate(17 * 2**20)  # sparse: no disk used
    out = tmp_path / "out"

    def kwargs(extra: str) -> list[str]:
        return ["--model", CIFAR, "--model-kwargs", "dim=32", "depth=2", extra, "-q"]

    return {
        "long name": (["convert", src, "--out", tmp_path / ("x" * 256), *SMALL_ARGS], 2, "at most 255 bytes"),
        "not UTF-8": (["convert", src, "--out", tmp_path / os.fsdecode(b"a\xffb"), *SMALL_ARGS], 2,
                      "b'a\\xffb' is not UTF-8"),
        "NUL in --out": (["convert", src, "--out", f"{tmp_path}/a\0b", *SMALL_ARGS], 2, "NUL character"),
        "nested labels": (["convert", src, "--out", out, "--labels", deep, *SMALL_ARGS], 2, "nests JSON lists too"),
        "huge labels": (["convert", src, "--out", out, "--labels", huge, *SMALL_ARGS], 2, "over 16 MiB"),
        "NUL in --labels": (["convert", src, "--out", out, "--labels", f"{tmp_path}/a\0b", *SMALL_ARGS], 2,
                            "NUL character"),
        "ANSI in --dataset": (["convert", src, "--out", out, "--dataset", "\x1b[31mred", *SMALL_ARGS], 2,
                              "--dataset holds an escape character"),
        # Refused by the shapes alone, before a 128 GB classifier is allocated.
        "1e9 classes": (["convert", src, "--out", out, "--num-classes", "1000000000", *SMALL_ARGS], 1,
                        "classifier has 10 classes but convmixer_256_8_ks5_p2 is built with 1000000000; pass "
                        "--num-classes 10"),
        "1e8 channels": (["convert", src, "--out", out, *kwargs("dim=100000000")], 1,
                         "--model-kwargs dim=32 depth=2 kernel_size=5 patch_size=2 --num-classes 10"),
        "negative classes": (["convert", src, "--out", out, "--num-classes", "-5", *SMALL_ARGS], 2,
                             "invalid class count"),
        "pretrained": (["convert", src, "--out", out, *kwargs("pretrained=True")], 2,
                       'timm.create_model("convmixer_256_8_ks5_p2", pretrained=True)'),
        "device": (["convert", src, "--out", out, *kwargs("device='cuda'")], 2,
                   "'device' is not an argument of the architecture"),
        "bad repo id": (["push", tmp_path / "missing", "--repo-id", "bad id!!"], 2,
                        "--repo-id: 'bad id!!' is not a Hub repo id"),
        "bad endpoint": (["push", tmp_path / "missing", "--repo-id", "me/x", "--endpoint", "ftp://x"], 2,
                         "is not an http(s) URL"),
        "bad revision": (["push", tmp_path / "missing", "--repo-id", "me/x", "--revision", "a\nb"], 2,
                         "--revision: the revision holds a control character"),
    }


@pytest.mark.parametrize("case", ["long name", "not UTF-8", "NUL in --out", "nested labels", "huge labels",
                                  "NUL in --labels", "ANSI in --dataset", "1e9 classes", "1e8 channels",
                                  "negative classes", "pretrained", "device", "bad repo id", "bad endpoint",
                                  "bad revision"])
def test_hostile_input_is_one_line_with_the_usage_or_failure_status(tmp_path, capsys, case):
    save(small_state(40), tmp_path / "w.safetensors")
    argv, status, fragment = _hostile(tmp_path)[case]
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == status, err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith("convmixer-timm "), err
    assert fragment in line, line
    if status == 1 or "usage:" not in err:
        one_line(err)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- signals


# SIGTERM sent while the command imports torch (its first seconds): the process signals itself from an import
# hook at that moment, so the test needs no timing.
_SIGTERM_AT_IMPORT = textwrap.dedent("""
    import os, signal, sys

    class TerminateOnTorchImport:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGTERM)
            return None

    from convmixer_timm import cli
    sys.meta_path.insert(0, TerminateOnTorchImport())
    raise SystemExit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("command", ["convert", "push"])
def test_sigterm_while_starting_exits_143_without_a_traceback(tmp_path, command):
    src = save(small_state(9), tmp_path / "w.safetensors")
    argv = {"convert": ["convert", str(src), "--out", str(tmp_path / "out"), *SMALL_ARGS],
            "push": ["push", str(tmp_path), "--repo-id", "me/x", "-q"]}[command]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    result = subprocess.run([sys.executable, "-c", _SIGTERM_AT_IMPORT, *argv], capture_output=True, text=True,
                            timeout=300, env={**env, "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert one_line(result.stderr) == f"convmixer-timm {command}: error: terminated (SIGTERM)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


# ---------------------------------------------------------------------------------------------------- other users


def _plant(shared: Path, name: str, uid: int, source: Path) -> dict[str, bytes]:
    """Another user's folder in the shared one, named as our leftovers are, holding a real Hub folder."""
    planted = shared / name
    shutil.copytree(source, planted)
    for path in (planted, *planted.iterdir()):
        os.chown(path, uid, uid)
    return folder_bytes(planted)


def test_another_users_leftovers_are_never_adopted(shared, capsys):
    src = save(small_state(10), shared / "mine.safetensors")
    theirs = save_hub_folder(timm.create_model(CIFAR, dim=32, depth=2), shared / "theirs-source", CIFAR)
    pid = dead_pid()
    old = _plant(shared, f".m.{pid}.0123abcd.old", NOBODY, theirs)
    partial = _plant(shared, f".m.{pid}.89abcdef.partial", NOBODY, theirs)

    assert convert(src, "--out", shared / "m", *SMALL_ARGS) == 0, capsys.readouterr().err
    loaded = timm.create_model(f"local-dir:{shared / 'm'}", pretrained=True).state_dict()
    mine = safetensors.torch.load_file(src)
    assert all(torch.equal(loaded[k], mine[k]) for k in mine)  # our weights, not the planted folder
    assert folder_bytes(shared / f".m.{pid}.0123abcd.old") == old  # theirs, untouched
    assert folder_bytes(shared / f".m.{pid}.89abcdef.partial") == partial


@pytest.mark.slow
def test_leftovers_another_user_planted_do_not_block_a_run(shared, tmp_path):
    """Run as ``nobody`` in a sticky folder where root's look-alike leftovers cannot be moved or removed."""
    src = save(small_state(11), shared / "mine.safetensors")
    theirs = save_hub_folder(timm.create_model(CIFAR, dim=32, depth=2), shared / "theirs-source", CIFAR)
    pid = dead_pid()
    old = _plant(shared, f".m.{pid}.0123abcd.old", 0, theirs)
    result = run_as_nobody(["convert", str(src), "--out", str(shared / "m"), *SMALL_ARGS],
                           ["convert", str(src), "--out", str(tmp_path / "m"), *SMALL_ARGS], shared / "home")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "PermissionError" not in result.stderr
    assert (shared / "m").stat().st_uid == NOBODY
    assert folder_bytes(shared / f".m.{pid}.0123abcd.old") == old


# ---------------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_convert_refuses_weights_that_are_not_float(tmp_path, capsys, dtype):
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in small_state(12).items()}
    src = tmp_path / "w.pth"
    torch.save(state, src)
    assert convert(src, "--out", tmp_path / "out", *SMALL_ARGS) == 1
    line = one_line(capsys.readouterr().err)
    name = str(dtype).removeprefix("torch.")
    kind = "complex" if dtype.is_complex else "integer"
    assert line.startswith(f"convmixer-timm convert: error: {src}: 32 checkpoint tensors hold {kind} values where "
                           f"the model has floating-point ones: stem.0.weight ({name}, model float32),")
    assert line.endswith("Save the floating-point weights again (e.g. model.float().state_dict()) and convert that "
                         "file")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_architecture_gets_every_option_at_once(tmp_path, capsys):
    src = save(small_state(13, dim=48, num_classes=3), tmp_path / "w.safetensors")
    assert convert(src, "--out", tmp_path / "out", *SMALL_ARGS) == 1
    line = one_line(capsys.readouterr().err)
    assert "h=48" in line and "pass --model-kwargs dim=48 depth=2 kernel_size=5 patch_size=2 --num-classes 3" in line
    # The advice, followed as given, works the first time.
    assert convert(src, "--out", tmp_path / "out", "--model", CIFAR, "--model-kwargs", "dim=48", "depth=2",
                   "kernel_size=5", "patch_size=2", "--num-classes", "3", "-q") == 0, capsys.readouterr().err

    # Only the classifier differs: then the classifier is all the message is about.
    src = save(small_state(14, num_classes=3), tmp_path / "w3.safetensors")
    assert convert(src, "--out", tmp_path / "out3", *SMALL_ARGS) == 1
    assert one_line(capsys.readouterr().err).endswith(
        f"the checkpoint's classifier has 3 classes but {CIFAR} is built with 10; pass --num-classes 3")


def test_push_refuses_non_finite_weights_as_convert_does(tmp_path, capsys):
    model = timm.create_model(CIFAR, dim=32, depth=2).eval()
    with torch.no_grad():
        model.head.bias[2] = float("nan")
        model.blocks[0][1].weight[0, 0, 0, 0] = float("inf")
    folder = save_hub_folder(model, tmp_path / "nan", CIFAR)
    with LocalHub(tmp_path / "hub", tokens={TOKEN: "me"}) as hub, \
            hub_environment(hub.endpoint, tmp_path / "home", token=TOKEN):
        assert cli.main(["push", str(folder), "--repo-id", "me/nan", "-q"]) == 1
        assert one_line(capsys.readouterr().err) == (
            f"convmixer-timm push: error: {folder / 'model.safetensors'}: 2 tensors hold NaN or infinite values: "
            "blocks.0.1.weight (0 NaN, 1 inf), head.bias (1 NaN, 0 inf). Such weights give NaN outputs; pass "
            "--allow-non-finite to publish them anyway")
        assert not any(r.method in ("POST", "PUT") for r in hub.requests)  # nothing created, nothing uploaded

        assert cli.main(["push", str(folder), "--repo-id", "me/nan", "--allow-non-finite"]) == 0
        assert "warning: publishing as asked (--allow-non-finite): 2 tensors" in capsys.readouterr().err
        assert "model.safetensors" in hub.list_files("me/nan")

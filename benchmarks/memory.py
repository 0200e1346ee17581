"""Memory of CPU training: peak and held-after-free RSS, timm's built-in vs convmixer-timm, each in a fresh process.

    python benchmarks/memory.py                                   # 256/8 k9 p1, batch 64, 3 steps
    python benchmarks/memory.py --variant convmixer_768_32 --batch 4 --steps 2
    python benchmarks/memory.py --variant convmixer_256_8_ks5_p2 --in-chans 1 --img-size 28

Each candidate runs in its own process: it builds the model (ours loads the weights of timm's), takes ``--steps``
SGD steps on random data, deletes model, optimizer and tensors, runs the garbage collector and reads the resident
set size (/proc/self/statm). The peak is the child's ``ru_maxrss`` as its parent reads it with ``os.wait4`` (what the
operating system charged the process at its largest). Candidates: timm's built-in in channels_last (its faster
CPU layout) and NCHW; ours by default, with ``tune_cpu_allocator()`` called first (the opt-in glibc setting), and
with ``CONVMIXER_TIMM_KERNELS=0`` (PyTorch's ops in our layout). Ratios are to timm's NCHW, which is what a
plain ``timm.create_model`` user runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import gc, json, os, sys, torch, torch.nn.functional as F
from timm.models.convmixer import ConvMixer as TimmConvMixer
from convmixer_timm import VARIANTS_BY_NAME, ConvMixer
which, name, batch, steps, in_chans, img = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
v = VARIANTS_BY_NAME[name]
img = img or v.img_size
torch.manual_seed(0)
act = torch.nn.GELU if v.act == "gelu" else torch.nn.ReLU
model = TimmConvMixer(v.h, v.d, v.k, v.p, in_chans=in_chans, num_classes=v.num_classes, act_layer=act)
if which.startswith("ours"):
    timm_weights = model.state_dict()
    model = ConvMixer(v.h, v.d, v.k, v.p, in_chans=in_chans, num_classes=v.num_classes, act_layer=v.act)
    model.load_state_dict(timm_weights)
    del timm_weights
if which == "ours, tune_cpu_allocator()":
    from convmixer_timm.speed import tune_cpu_allocator
    assert tune_cpu_allocator(), "the allocator setting did not apply (allocator chosen by the environment?)"
x = torch.randn(batch, in_chans, img, img)
if which == "timm channels_last":
    model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
model.train()
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
target = torch.randint(0, v.num_classes, (batch,))
for _ in range(steps):
    opt.zero_grad()
    F.cross_entropy(model(x), target).backward()
    opt.step()
del model, opt, x, target
gc.collect()
rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
print(json.dumps(dict(rss_after_free=rss)))
"""

CANDIDATES = {
    "timm NCHW": {},
    "timm channels_last": {},
    "ours": {},
    "ours, tune_cpu_allocator()": {},
    "ours, CONVMIXER_TIMM_TUNE_MALLOC=0": {"CONVMIXER_TIMM_TUNE_MALLOC": "0"},
    "ours, CONVMIXER_TIMM_KERNELS=0": {"CONVMIXER_TIMM_KERNELS": "0"},
}


def measure(which: str, variant: str, batch: int, steps: int, in_chans: int = 3, img_size: int = 0) -> dict:
    """Run one candidate in a fresh process: its RSS after everything is freed and its peak RSS, in bytes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **CANDIDATES[which]}
    command = [sys.executable, "-c", CHILD, which, variant, str(batch), str(steps), str(in_chans), str(img_size)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the largest of all children
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if child.returncode != 0:
            raise RuntimeError(f"{which} failed:\n{err.read().decode(errors='replace')[-3000:]}")
        row = json.loads(out.read().decode().strip().splitlines()[-1])
    row["peak"] = usage.ru_maxrss * 1024  # KiB on Linux
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="convmixer_256_8_ks9_p1")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--in-chans", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=0, help="default: the variant's")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    args = parser.parse_args(argv)
    rows = {which: measure(which, args.variant, args.batch, args.steps, args.in_chans, args.img_size)
            for which in args.candidates}
    size = f"{args.in_chans}x{args.img_size}px" if args.img_size else f"{args.in_chans} channels"
    print(f"{args.variant}, batch {args.batch}, {size}, {args.steps} steps, each in its own process:\n")
    print("| model | peak RSS (MiB) | peak / timm NCHW | held after free (MiB) |\n|---|---|---|---|")
    reference = rows.get("timm NCHW", next(iter(rows.values())))["peak"]
    for which, row in rows.items():
        print(f"| {which} | {row['peak'] / 2**20:.0f} | {row['peak'] / reference:.2f}x "
              f"| {row['rss_after_free'] / 2**20:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

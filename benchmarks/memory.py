"""Memory a process keeps after CPU training is freed: timm's built-in vs convmixer-timm, each in a fresh process.

    python benchmarks/memory.py                                   # 256/8 k9 p1, batch 128, 2 steps
    python benchmarks/memory.py --variant convmixer_256_8_ks5_p2 --batch 64

Each run builds the model, takes ``--steps`` SGD steps on random data, deletes model, optimizer and tensors,
runs the garbage collector and reads the resident set size (/proc/self/statm). It also records the peak
(VmHWM). timm runs channels_last (its faster CPU layout) and NCHW; ours runs its default.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import gc, json, os, sys, torch, torch.nn.functional as F
from timm.models.convmixer import ConvMixer as TimmConvMixer
from convmixer_timm import VARIANTS_BY_NAME, ConvMixer
which, name, batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
v = VARIANTS_BY_NAME[name]
torch.manual_seed(0)
if which == "ours":
    model = ConvMixer(v.h, v.d, v.k, v.p, num_classes=v.num_classes, act_layer=v.act)
else:
    act = torch.nn.GELU if v.act == "gelu" else torch.nn.ReLU
    model = TimmConvMixer(v.h, v.d, v.k, v.p, num_classes=v.num_classes, act_layer=act)
x = torch.randn(batch, 3, v.img_size, v.img_size)
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
page = os.sysconf("SC_PAGE_SIZE")
rss = int(open("/proc/self/statm").read().split()[1]) * page
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps(dict(rss_after_free=rss, peak=peak)))
"""


def measure(which: str, variant: str, batch: int, steps: int) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, which, variant, str(batch), str(steps)], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="convmixer_256_8_ks9_p1")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    rows = {which: measure(which, args.variant, args.batch, args.steps)
            for which in ("timm channels_last", "timm NCHW", "ours")}
    print(f"{args.variant}, batch {args.batch}, {args.steps} steps, then everything freed:\n")
    print("| model | held after free (MiB) | peak (MiB) |\n|---|---|---|")
    for which, row in rows.items():
        print(f"| {which} | {row['rss_after_free'] / 2**20:.0f} | {row['peak'] / 2**20:.0f} |")
    timm_held = min(rows["timm channels_last"]["rss_after_free"], rows["timm NCHW"]["rss_after_free"])
    limit = 1.25 * timm_held + (100 << 20)
    ours = rows["ours"]["rss_after_free"]
    print(f"\nours / timm: {ours / timm_held:.2f}x (limit: 1.25x + 100 MiB = {limit / 2**20:.0f} MiB): "
          f"{'within' if ours <= limit else 'OVER'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

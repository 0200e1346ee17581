"""Minor page faults and peak RSS of one CPU training step, without timing anything, in a fresh process.

    python benchmarks/page_faults.py                               # 256/8 k9 p1, batch 32, 32x32, 3 measured steps
    python benchmarks/page_faults.py --root /path/to/other/checkout --batch 64 --kernel-size 5 --patch-size 2

With glibc's default thresholds (the allocator untouched, as convmixer-timm leaves it unless asked), every freshly
allocated full-resolution activation above the mmap threshold is a new mapping whose pages fault in when first
written: the minor faults of a step count that work, and so how many fresh full-size tensors the step allocates.
Peak RSS per step is the kernel's high-water mark (VmHWM) after resetting it (``/proc/self/clear_refs``) before the
step. Warm-up steps first (the allocator's dynamic threshold, oneDNN's caches). ``--root`` picks the checkout whose
``convmixer_timm`` is imported, so two versions can be compared, each in its own process.
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
import json, resource, sys, torch, torch.nn.functional as F
from convmixer_timm import ConvMixer
dim, depth, k, p, batch, img, warmup, steps = map(int, sys.argv[1:9])
act = sys.argv[9]
torch.manual_seed(0)
model = ConvMixer(dim, depth, k, p, num_classes=10, act_layer=act).train()
x, target = torch.randn(batch, 3, img, img), torch.randint(0, 10, (batch,))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

def step():
    opt.zero_grad()
    F.cross_entropy(model(x), target).backward()
    opt.step()

def high_water_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

for _ in range(warmup):
    step()
faults, peaks = [], []
for _ in range(steps):
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    peaks.append(high_water_kib() * 1024)
print(json.dumps(dict(minor_faults=faults, peak_rss=peaks)))
"""


def measure(root: Path, dim: int, depth: int, kernel_size: int, patch_size: int, batch: int, img_size: int,
            warmup: int, steps: int, act: str) -> dict:
    """One fresh process importing ``convmixer_timm`` from ``root``: minor faults and peak RSS of each step."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("CONVMIXER_TIMM_TUNE_MALLOC", None)
    command = [sys.executable, "-c", CHILD, *map(str, (dim, depth, kernel_size, patch_size, batch, img_size,
                                                       warmup, steps)), act]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"the training process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose convmixer_timm is measured")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--kernel-size", type=int, default=9)
    parser.add_argument("--patch-size", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--act", default="gelu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    row = measure(args.root.resolve(), args.dim, args.depth, args.kernel_size, args.patch_size, args.batch,
                  args.img_size, args.warmup, args.steps, args.act)
    faults, peaks = row["minor_faults"], row["peak_rss"]
    print(json.dumps({"root": str(args.root.resolve()), **vars(args) | {"root": str(args.root)}, **row}))
    print(f"{args.dim}/{args.depth} k{args.kernel_size} p{args.patch_size} {args.act}, batch {args.batch}, "
          f"{args.img_size}x{args.img_size}: minor faults per step {sum(faults) / len(faults):.0f} "
          f"({', '.join(map(str, faults))}); peak RSS per step {max(peaks) / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

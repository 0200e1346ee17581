"""CPU training step time of the package from two (or more) checkouts, interleaved in one run, same weights.

Each candidate is a checkout (its ``convmixer_timm`` first on ``PYTHONPATH``) with optional environment settings,
run in a worker process of its own that stays up for the whole run; the workers take turns, one round of steps
each, so that drift of the machine (other work, clocks) falls on every candidate alike. Every worker builds the
same model from the same seed and trains on the same batch.

    python benchmarks/training_ab.py \\
        --candidate "before, allocator tuned=/path/to/old/checkout:CONVMIXER_TIMM_TUNE_MALLOC=1" \\
        --candidate "now=." --variant convmixer_256_8_ks9_p1 --batch 32 --rounds 5 --steps 2

Prints the median step time of each candidate and its ratio to the first one; ``--timm`` adds timm's built-in
ConvMixer (same weights) as one more candidate.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, time
import timm, torch
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
if spec["builtin"]:
    from timm.models.convmixer import ConvMixer
    from convmixer_timm import VARIANTS_BY_NAME
    v = VARIANTS_BY_NAME[spec["variant"]]
    act = torch.nn.GELU if v.act == "gelu" else torch.nn.ReLU
    model = ConvMixer(v.h, v.d, kernel_size=v.k, patch_size=v.p, num_classes=10, act_layer=act)
else:
    model = timm.create_model(spec["variant"], num_classes=10)
state = torch.load(spec["weights"], weights_only=True)
model.load_state_dict(state)
model.train()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
generator = torch.Generator().manual_seed(1)
x = torch.randn(spec["batch"], 3, spec["img_size"], spec["img_size"], generator=generator)
y = torch.randint(0, 10, (spec["batch"],), generator=generator)

def step():
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()

for _ in range(spec["warmup"]):
    step()
print("ready", flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps(times), flush=True)
"""


def parse_candidate(text: str) -> tuple[str, Path, dict[str, str]]:
    label, _, rest = text.partition("=")
    root, _, settings = rest.partition(":")
    env = dict(item.split("=", 1) for item in settings.split(",") if item)
    return label, Path(root or ".").resolve(), env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", action="append", required=True, help="LABEL=CHECKOUT[:VAR=VALUE,...]")
    parser.add_argument("--timm", action="store_true", help="also timm's built-in ConvMixer, same weights")
    parser.add_argument("--variant", default="convmixer_256_8_ks9_p1")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--weights", default="/tmp/training_ab_weights.pt")
    args = parser.parse_args()

    candidates = [parse_candidate(c) for c in args.candidate]
    first_root = candidates[0][1]
    # The weights once, from the first checkout's model: every worker loads the same state dict.
    subprocess.run([sys.executable, "-c", (
        "import sys, timm, torch; torch.manual_seed(0);"
        f"torch.save(timm.create_model({args.variant!r}, num_classes=10).state_dict(), {args.weights!r})")],
        check=True, env={**os.environ, "PYTHONPATH": str(first_root)}, cwd=first_root)
    if args.timm:
        candidates.append(("timm built-in", first_root, {}))
    workers = []
    for label, root, env in candidates:
        spec = dict(variant=args.variant, batch=args.batch, img_size=args.img_size, warmup=args.warmup,
                    weights=args.weights, builtin=label == "timm built-in")
        process = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(spec)], cwd=root, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   env={**os.environ, "PYTHONPATH": str(root), **env})
        assert process.stdout.readline().strip() == "ready", label
        workers.append((label, process))
    times: dict[str, list[float]] = {label: [] for label, _ in workers}
    for _ in range(args.rounds):
        for label, process in workers:
            process.stdin.write(f"{args.steps}\n")
            process.stdin.flush()
            times[label] += json.loads(process.stdout.readline())
    for _, process in workers:
        process.stdin.close()
        process.wait()
    base = statistics.median(times[workers[0][0]])
    print(f"{args.variant} batch {args.batch} {args.img_size}x{args.img_size}, {args.rounds} rounds x {args.steps} "
          f"steps, {platform.processor() or platform.machine()}")
    for label, values in times.items():
        median = statistics.median(values)
        print(f"  {label:40s} {median * 1000:8.0f} ms/step  {median / base:5.2f}x of {workers[0][0]!r}")


if __name__ == "__main__":
    main()

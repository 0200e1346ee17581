"""``convmixer-timm demo``: train a small ConvMixer on scikit-learn's digits with timm's own training parts.

Everything a real timm training run touches is used here, at toy scale, so the demo doubles as an end-to-end
check of the plugin: ``timm.create_model`` on one of our variants (shrunk), timm's ImageFolder dataset and
loader (with a ``DistributedSampler`` under torchrun), ``create_optimizer_v2``, ``create_scheduler_v2``,
``timm.loss``, DistributedDataParallel, then a Hub-ready folder that ``timm.create_model("local-dir:DIR")`` reloads.

Single process (the folder goes to ``~/.cache/convmixer_timm/demo`` unless ``--out`` says otherwise)::

    convmixer-timm demo

Two processes (gloo on CPU, NCCL on GPUs)::

    torchrun --nproc_per_node 2 -m convmixer_timm.demo --out ./convmixer-demo-ddp
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_OUT_HINT = "$CONVMIXER_TIMM_CACHE/demo, else ~/.cache/convmixer_timm/demo"
# The authors' CIFAR default (p=2, k=5) at a quarter of the width and half the depth: digits are 8x8 images
# upsampled to 16x16, so p=2 leaves the same 8x8 grid the CIFAR model mixes over, and h=64/d=4 trains in seconds.
BASE_MODEL = "convmixer_256_8_ks5_p2"
MODEL_OVERRIDES: dict[str, Any] = dict(dim=64, depth=4)
IMG_SIZE = 16
# The grey digits are read as RGB (three equal channels) so the saved model takes what every image pipeline
# hands it: transformers' pipeline and timm's inference.py convert whatever they open to RGB, and a 1-channel
# model fails on that. The extra stem weights cost 512 parameters.
IN_CHANS = 3
# BatchNorm follows the stem, so the exact statistics barely matter; 0.5/0.5 maps [0, 1] to [-1, 1].
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)
DEFAULT_EPOCHS = 15
DEFAULT_BATCH_SIZE = 64  # global: split evenly over the processes, so one and two processes follow one recipe
DEFAULT_LR = 4e-3
DEFAULT_WEIGHT_DECAY = 0.05
VAL_FRACTION = 0.2
ACCURACY_CLAIM = 0.98


def default_out() -> Path:
    """Where the demo writes when no ``--out`` is given: a folder of its own under the user's cache.

    Not the working folder: run from a checkout, that would leave an untracked folder behind. It is the cache
    folder of the compiled kernels (``CONVMIXER_TIMM_CACHE`` moves both).
    """
    root = os.environ.get("CONVMIXER_TIMM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "convmixer_timm") / "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (the ``convmixer-timm demo`` sub-command and ``python -m``)."""
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"folder for the Hub-ready model; an existing one is kept unless --overwrite (default: "
                             f"{DEFAULT_OUT_HINT}, the demo's own folder, replaced by every run)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help=f"training epochs (default: {DEFAULT_EPOCHS})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the train/held-out split, the initialisation and the augmentation (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing model folder at --out")
    parser.add_argument("--workers", type=int, default=0,
                        help="data loader worker processes per training process (default: 0, load in-process; "
                             "the images are tiny, so workers mostly add start-up time)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"global batch size, divided among torchrun processes (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per training process (default: 1). The model's tensors are tiny, so more "
                             "threads mostly wait on each other, and on a busy machine they run many times slower")
    parser.add_argument("--results", default=None, metavar="FILE",
                        help="also write the figures (accuracies, world size, time) to this JSON file")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device) -> tuple[float, int]:
    """Top-1 accuracy and the number of images seen, with the model in eval mode."""
    model.eval()
    correct = seen = 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        correct += (model(images).argmax(dim=1) == targets).sum().item()
        seen += targets.numel()
    return correct / max(seen, 1), seen


def eval_loader(dataset: Any, data_config: dict[str, Any], batch_size: int, workers: int,
                device: torch.device) -> Any:
    """timm's evaluation loader over ``dataset`` with the transforms of ``data_config`` (no augmentation)."""
    from timm.data import create_loader

    # Not distributed on purpose: rank 0 scores the whole held-out split, so the figure is exact (a distributed
    # eval sampler pads the last batch with repeats) and means the same as in a single-process run.
    return create_loader(
        dataset, input_size=data_config["input_size"], batch_size=batch_size, is_training=False,
        interpolation=data_config["interpolation"], mean=data_config["mean"], std=data_config["std"],
        crop_pct=data_config["crop_pct"], crop_mode=data_config["crop_mode"], num_workers=workers,
        device=device, use_prefetcher=False, persistent_workers=False,
    )


def clear_own_folder(out: Path) -> None:
    """Empty the demo's own default folder of anything but a Hub folder's files, so the save may replace it.

    ``save_hub_folder(overwrite=True)`` replaces only a folder that holds nothing else (a mistyped ``--out`` must
    not delete a user's files); the default folder under the cache is the demo's, replaced by every run.
    """
    from .hub import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME

    if out.is_symlink() or not out.is_dir():
        return
    for entry in out.iterdir():
        if entry.name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def run(args: argparse.Namespace) -> int:
    """Train, evaluate, save and reload; returns the process exit code (0: held-out accuracy reached the claim)."""
    from timm.utils import init_distributed_device, random_seed

    if args.epochs < 1 or args.batch_size < 1 or args.threads < 1 or args.workers < 0:
        print("error: --epochs, --batch-size and --threads must be positive and --workers not negative",
              file=sys.stderr)
        return 2
    # The default folder belongs to the demo, so each run replaces it; a folder the user names is theirs.
    replace = args.overwrite or args.out is None
    out = (Path(args.out) if args.out is not None else default_out()).absolute()
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is a file, not a folder", file=sys.stderr)
        return 2
    if out.exists() and not replace:
        # Checked before training (save_hub_folder checks again) so a run is not wasted on a result it cannot save.
        print(f"error: {out} already exists; pass --overwrite to replace it", file=sys.stderr)
        return 2

    started = time.perf_counter()
    dist_args = argparse.Namespace(device="cuda" if torch.cuda.is_available() else "cpu")
    device = init_distributed_device(dist_args)  # gloo on CPU, NCCL on CUDA; plain single process otherwise
    rank, world_size, distributed = dist_args.rank, dist_args.world_size, dist_args.distributed
    if args.batch_size % world_size:
        print(f"error: --batch-size {args.batch_size} does not split evenly over {world_size} processes",
              file=sys.stderr)
        return 2
    random_seed(args.seed, rank)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        return _train_and_save(args, out, replace, device, rank, world_size, distributed, started)
    finally:
        torch.set_num_threads(threads)  # run() is also called in-process (tests, notebooks): leave no trace


def _train_and_save(args: argparse.Namespace, out: Path, replace: bool, device: torch.device, rank: int,
                    world_size: int, distributed: bool, started: float) -> int:
    import timm
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import reduce_tensor
    from tqdm import tqdm

    from .training import write_digits_image_folder

    primary = rank == 0

    # Each process writes its own copy: the split depends only on the seed, so all ranks see the same images
    # and nothing has to be shared through the file system.
    with tempfile.TemporaryDirectory(prefix="convmixer-digits-") as tmp:
        split = write_digits_image_folder(tmp, val_fraction=VAL_FRACTION, seed=args.seed)
        model = timm.create_model(
            BASE_MODEL, in_chans=IN_CHANS, num_classes=split.num_classes, **MODEL_OVERRIDES,
            # The digits preprocessing becomes the model's pretrained config, so config.json carries it and the
            # reloaded model resolves the very same transforms.
            pretrained_cfg_overlay=dict(
                input_size=(IN_CHANS, IMG_SIZE, IMG_SIZE), mean=DIGITS_MEAN, std=DIGITS_STD, crop_pct=1.0,
                interpolation="bilinear", num_classes=split.num_classes,
            ),
        ).to(device)
        data_config = resolve_data_config(model=model)
        train_set = create_dataset("", root=tmp, split="train", is_training=True, input_img_mode="RGB")
        val_set = create_dataset("", root=tmp, split="validation", is_training=False, input_img_mode="RGB")
        per_rank_batch = args.batch_size // world_size
        train_loader = create_loader(
            train_set, input_size=data_config["input_size"], batch_size=per_rank_batch, is_training=True,
            # Digits are not mirror-symmetric and are grey: no flips, no colour jitter; a mild zoom is enough.
            scale=(0.75, 1.0), ratio=(0.9, 1.1), hflip=0.0, color_jitter=0.0,
            interpolation=data_config["interpolation"], mean=data_config["mean"], std=data_config["std"],
            num_workers=args.workers, distributed=distributed, device=device, use_prefetcher=False,
            persistent_workers=args.workers > 0,
        )
        if len(train_loader) == 0:  # timm's training loader drops a short last batch: here, the only one
            largest = split.num_train // world_size * world_size
            print(f"error: --batch-size {args.batch_size} is more than the {split.num_train} training digits; use at "
                  f"most {largest}", file=sys.stderr)
            return 2

        train_model: nn.Module = model
        if distributed:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None)
        optimizer = create_optimizer_v2(model, opt="adamw", lr=DEFAULT_LR, weight_decay=DEFAULT_WEIGHT_DECAY)
        updates_per_epoch = len(train_loader)
        scheduler, num_epochs = create_scheduler_v2(
            optimizer, sched="cosine", num_epochs=args.epochs, warmup_epochs=1, warmup_lr=1e-5,
            step_on_epochs=False, updates_per_epoch=updates_per_epoch,
        )
        loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)

        if primary:
            params = sum(p.numel() for p in model.parameters())
            print(f"ConvMixer demo: {BASE_MODEL} with {MODEL_OVERRIDES}, in_chans={IN_CHANS}, {params:,} parameters; "
                  f"digits {split.num_train} train / {split.num_val} held-out (seed {args.seed}), "
                  f"{IMG_SIZE}x{IMG_SIZE} px; device {device}, world size {world_size}, "
                  f"batch {per_rank_batch} x {world_size}")
            print(f"output folder: {out}" + (" (replaced if it exists)" if replace and out.exists() else ""))
        progress = tqdm(total=num_epochs * updates_per_epoch, desc="train", unit="step", disable=not primary,
                        file=sys.stdout, dynamic_ncols=True,
                        # A log file or a pipe gets a line per update: keep those few.
                        mininterval=0.5 if sys.stdout.isatty() else 10.0)
        num_updates = 0
        for epoch in range(num_epochs):
            if distributed:
                train_loader.sampler.set_epoch(epoch)  # a new shuffle per epoch, the same one on every rank
            train_model.train()
            loss_sum = torch.zeros((), device=device)
            for images, targets in train_loader:
                images, targets = images.to(device), targets.to(device)
                loss = loss_fn(train_model(images), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                num_updates += 1
                scheduler.step_update(num_updates=num_updates)
                loss_sum += loss.detach()
                progress.update(1)
            scheduler.step(epoch + 1)
            mean_loss = loss_sum / updates_per_epoch
            if distributed:
                mean_loss = reduce_tensor(mean_loss, world_size)
            progress.set_postfix(epoch=f"{epoch + 1}/{num_epochs}", loss=f"{mean_loss.item():.4f}",
                                 lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        progress.close()
        train_seconds = time.perf_counter() - started

        code = 0
        if primary:
            code = _finish(args, model, val_set, split.num_train, data_config, device, world_size, train_seconds,
                           started, out, replace)
        if distributed:
            # Keep the other ranks alive until rank 0 has saved, so torchrun reports one outcome for the job.
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    return code


def _finish(args: argparse.Namespace, model: nn.Module, val_set: Any, num_train: int, data_config: dict[str, Any],
            device: torch.device, world_size: int, train_seconds: float, started: float, out: Path,
            replace: bool) -> int:
    import timm

    from .hub import save_hub_folder

    val_loader = eval_loader(val_set, data_config, batch_size=256, workers=args.workers, device=device)
    accuracy, seen = evaluate(model, val_loader, device)
    print(f"held-out accuracy (trained model): {accuracy:.4f} ({round(accuracy * seen)}/{seen})")

    if args.out is None:
        clear_own_folder(out)
    saved = save_hub_folder(
        model.cpu(), out, BASE_MODEL,
        metrics={"top1": round(100 * accuracy, 2)},
        # The card uses this both as the training set and as where top-1 was measured: name both halves.
        dataset=f"scikit-learn digits ({num_train} images for training, 8x8 upsampled to "
                f"{IMG_SIZE}x{IMG_SIZE}; top-1 on the other {seen}, held out with seed {args.seed})",
        # ImageFolder numbers the class folders 0..9 in sorted order, so class i is the digit i.
        labels=[str(digit) for digit in range(model.num_classes)],
        overwrite=replace,
    )
    print(f"saved Hub-ready folder: {saved}")

    reloaded = timm.create_model(f"local-dir:{saved}", pretrained=True).to(device)
    reload_config = timm.data.resolve_data_config(model=reloaded)
    reload_loader = eval_loader(val_set, reload_config, batch_size=256, workers=args.workers, device=device)
    reloaded_accuracy, _ = evaluate(reloaded, reload_loader, device)
    print(f"held-out accuracy (reloaded from local-dir:{saved}): {reloaded_accuracy:.4f}")
    total = time.perf_counter() - started
    print(f"world size {world_size}; training {train_seconds:.1f} s, total {total:.1f} s")

    if args.results:
        Path(args.results).write_text(json.dumps({
            "accuracy": accuracy, "reloaded_accuracy": reloaded_accuracy, "held_out_images": seen,
            "world_size": world_size, "train_seconds": train_seconds, "epochs": args.epochs,
            "seed": args.seed, "out": str(saved), "total_seconds": total,
        }, indent=2))
    if not math.isclose(accuracy, reloaded_accuracy):
        print("error: the reloaded model scores differently from the trained one", file=sys.stderr)
        return 1
    if accuracy < ACCURACY_CLAIM:
        print(f"warning: held-out accuracy {accuracy:.4f} is below the demo's claim of {ACCURACY_CLAIM:.2f}; "
              "try more --epochs", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m convmixer_timm.demo`` (what torchrun runs)."""
    parser = argparse.ArgumentParser(prog="python -m convmixer_timm.demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

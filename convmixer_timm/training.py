"""Small helpers shared by the demo, the tests and the documented train.py runs.

The one data set used everywhere is scikit-learn's bundled digits (1797 grey 8x8 images, 10 classes): it ships
with scikit-learn, so training examples run offline, and it is written out as an ImageFolder tree so timm's own
``create_dataset`` / ``ImageDataset`` and the stock ``train.py`` / ``validate.py`` read it like any image data set.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# sklearn's digits pixels are integers 0..16; scaling by 15 keeps them exact in 8-bit PNGs (16 * 15 = 240).
_DIGITS_PIXEL_SCALE = 15

DIGITS_NUM_CLASSES = 10


@dataclass(frozen=True)
class ImageFolderSplit:
    """Where an ImageFolder tree was written and how many images each split holds."""

    root: Path
    train_dir: Path
    val_dir: Path
    num_train: int
    num_val: int
    num_classes: int


def write_digits_image_folder(
        root: str | Path,
        val_fraction: float = 0.2,
        seed: int = 0,
        train_split: str = "train",
        val_split: str = "validation",
) -> ImageFolderSplit:
    """Write sklearn's digits as ``root/{train_split,val_split}/<class>/<index>.png`` (8x8, mode ``L``).

    The split is stratified and fixed by ``seed``, so the held-out images are the same in every process of a
    distributed run and in every later evaluation. Class folders are named ``0``..``9``; ImageFolder sorts them,
    so folder order equals the digit. ``val_split`` defaults to ``validation``, the split name train.py expects.

    Raises:
        ImportError: scikit-learn is missing (``pip install convmixer-timm[demo]``).
        ValueError: ``val_fraction`` is not strictly between 0 and 1.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # the demo extra is optional; say which one to install
        raise ImportError("the digits data needs scikit-learn: pip install 'convmixer-timm[demo]'") from exc
    import numpy as np
    from PIL import Image

    digits = load_digits()
    images = (digits.images * _DIGITS_PIXEL_SCALE).round().astype(np.uint8)
    indices = np.arange(len(images))
    train_idx, val_idx = train_test_split(
        indices, test_size=val_fraction, random_state=seed, stratify=digits.target,
    )
    root = Path(root)
    for split, split_idx in ((train_split, train_idx), (val_split, val_idx)):
        for label in range(DIGITS_NUM_CLASSES):
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
        for i in split_idx:
            Image.fromarray(images[i]).save(root / split / str(digits.target[i]) / f"{i:04d}.png")
    return ImageFolderSplit(
        root=root, train_dir=root / train_split, val_dir=root / val_split,
        num_train=len(train_idx), num_val=len(val_idx), num_classes=DIGITS_NUM_CLASSES,
    )


def class_counts(split_dir: str | Path) -> dict[str, int]:
    """Images per class folder; handy to check that a split is what a run claims it is."""
    return dict(Counter(p.parent.name for p in Path(split_dir).glob("*/*.png")))

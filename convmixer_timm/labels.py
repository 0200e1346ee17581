"""Class names for Hub folders: the data sets of the variant table, and names a user supplies.

Names reach timm as ``label_names`` (what ``timm.models.save_for_hf`` writes and timm's ``inference.py`` prints)
and transformers as ``id2label`` (what ``pipeline("image-classification")`` returns).
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CIFAR10_LABELS", "DatasetLabels", "canonical_dataset", "check_labels", "check_text", "dataset_labels",
           "generic_labels", "read_labels_file"]

# torchvision.datasets.CIFAR10.classes, in the order of the data set's label indices.
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Spellings users type for the variant table's data sets, folded to the table's names.
_DATASET_ALIASES = {
    "imagenet": "imagenet-1k", "imagenet1k": "imagenet-1k", "in1k": "imagenet-1k", "ilsvrc2012": "imagenet-1k",
    "ilsvrcimagenet1k": "imagenet-1k", "cifar10": "cifar-10",
}


def canonical_dataset(name: str | None) -> str | None:
    """The variant table's name for a data set ("CIFAR10", "cifar_10" -> "cifar-10"), else ``name`` unchanged."""
    if name is None:
        return None
    return _DATASET_ALIASES.get(re.sub(r"[-_\s/]", "", name.lower()), name)


@dataclass(frozen=True)
class DatasetLabels:
    """Class names of a known data set: ``names[i]`` is class ``i``; ``descriptions`` maps a name to its text."""

    names: tuple[str, ...]
    descriptions: dict[str, str] | None = None


def dataset_labels(dataset: str | None) -> DatasetLabels | None:
    """The class names of a data set of the variant table, or None for any other data set."""
    dataset = canonical_dataset(dataset)
    if dataset == "cifar-10":
        return DatasetLabels(CIFAR10_LABELS)
    if dataset == "imagenet-1k":
        from timm.data import ImageNetInfo

        info = ImageNetInfo("imagenet-1k")
        # WordNet synsets are timm's unique ImageNet label names; the lemmas are their readable descriptions.
        return DatasetLabels(tuple(info.label_names()), info.label_descriptions(as_dict=True))
    return None


def generic_labels(num_classes: int) -> tuple[str, ...]:
    """The names transformers gives classes nobody named: ``LABEL_0``, ``LABEL_1``, ..."""
    return tuple(f"LABEL_{i}" for i in range(num_classes))


def _unprintable(text: str) -> tuple[int, str] | None:
    """(position, description) of the first character that is no plain text, or None."""
    for position, char in enumerate(text):
        if char == "\x1b":
            return position, "an escape character (0x1b; ANSI terminal codes start with it)"
        if unicodedata.category(char) == "Cc":
            return position, f"a control character (0x{ord(char):02x})"
        if unicodedata.category(char) == "Cs":
            return position, f"a lone surrogate (U+{ord(char):04X}), which is not text"
    return None


def check_text(text: str, what: str) -> str:
    """``text`` if it holds no control character (newline, tab, ANSI escape codes) and no lone surrogate.

    Names and data sets go into model cards, terminals and HTML pages, where such characters break lines or
    tables, or drive a terminal. Raises ``ValueError`` naming ``what``, the position and the character.
    """
    found = _unprintable(text)
    if found:
        position, description = found
        raise ValueError(f"{what} holds {description} at position {position}: {text[:40]!r}; write plain text")
    return text


def check_labels(labels: Sequence[str], num_classes: int, source: str = "labels") -> tuple[str, ...]:
    """``labels`` as a tuple after checking there is one non-empty, unique name per class.

    Raises ``ValueError`` naming what is wrong (count, empty or duplicated names) and where (``source``).
    """
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise ValueError(f"{source} must be a list of class names, got {type(labels).__name__}")
    names = tuple(labels)
    not_text = [i for i, name in enumerate(names) if not isinstance(name, str)]
    if not_text:
        raise ValueError(f"{source}: class names must be strings; entry {not_text[0]} is "
                         f"{type(names[not_text[0]]).__name__} {names[not_text[0]]!r}")
    if len(names) != num_classes:
        raise ValueError(f"{source} has {len(names)} class names but the model has {num_classes} classes; give "
                         f"exactly one name per class, in the order of the classifier's outputs")
    for i, name in enumerate(names):
        found = _unprintable(name)
        if found:
            raise ValueError(f"{source}: class {i}'s name {name[:40]!r} holds {found[1]} at position {found[0]}; "
                             "class names are plain text (no newlines, tabs or terminal codes)")
    empty = [i for i, name in enumerate(names) if not name.strip()]
    if empty:
        raise ValueError(f"{source}: class {empty[0]} has an empty name; every class needs a name")
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise ValueError(f"{source}: class names must be unique (transformers' label2id maps names back to "
                         f"classes), repeated: {', '.join(repr(n) for n in repeated[:5])}")
    return names


# ImageNet-21k's 21843 names take about 0.7 MB: a file of many times that is no list of class names (it may be
# /dev/zero, or a data file given by mistake), and is refused before it is read into memory whole.
MAX_LABELS_FILE_BYTES = 16 * 2**20


def read_labels_file(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a file: a JSON list of strings, or plain text with one name per line.

    Raises ``ValueError`` for a file that is neither, that has blank lines between names, that is nested (a JSON
    list of lists), or that is larger than ``MAX_LABELS_FILE_BYTES``; ``OSError`` for one that cannot be read.
    """
    path = Path(path)
    with open(path, "rb") as file:
        data = file.read(MAX_LABELS_FILE_BYTES + 1)
    if len(data) > MAX_LABELS_FILE_BYTES:
        raise ValueError(f"{path} is over {MAX_LABELS_FILE_BYTES // 2**20} MiB, too large for a list of class "
                         "names; give a file with one class name per line (or a JSON list)")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is no part of a name
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text; write one class name per line (or a JSON list)") from exc
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except RecursionError:
            raise ValueError(f"{path} nests JSON lists too deeply to read; give a flat JSON list of class names, "
                             'e.g. ["cat", "dog"]') from None
        except ValueError as exc:
            raise ValueError(f"{path} starts like a JSON list but is not valid JSON: {exc}") from exc
        if not isinstance(names, list):
            raise ValueError(f"{path} must hold a JSON list of class names")
        return names
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:  # a trailing newline (or several) ends the file, it is not a class
        lines.pop()
    blank = [n for n, line in enumerate(lines, start=1) if not line]
    if blank:
        raise ValueError(f"{path}: line {blank[0]} is blank; write one class name per line, with no blank lines")
    return lines

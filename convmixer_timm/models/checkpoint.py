"""ConvMixer checkpoints: reading files safely and converting every known key layout to timm's.

Layouts (see shared facts): timm's (``stem.0``, ``blocks.{i}.0.fn.0``, ``head``), the authors' original
``nn.Sequential`` (``0``, ``2``, ``{i+3}.0.fn.0``, ``{d+5}``) and labml.ai's (``patch_emb.conv``,
``conv_mixer_layers.{i}.depth_wise_conv``, ``classification.linear``). Any of them may carry a ``module.``
(DistributedDataParallel) or ``_orig_mod.`` (torch.compile) prefix and a ``state_dict``/``model`` wrapper.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

# A zip checkpoint may inflate to at most this multiple of its size on disk, plus the constant below. torch.save
# stores tensors uncompressed and float weights hardly compress, so real checkpoints sit near 1x; a "zip bomb"
# (1 MiB inflating to 1 GiB) is refused before torch.load allocates anything.
MAX_INFLATION = 4
MAX_INFLATION_SLACK = 1 << 20

WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
_STRIP_PREFIXES = ("module.", "_orig_mod.")

_LABML_RULES = (
    (r"^patch_emb\.conv\.", "stem.0."),
    (r"^patch_emb\.norm\.", "stem.2."),
    (r"^conv_mixer_layers\.(\d+)\.depth_wise_conv\.", r"blocks.\1.0.fn.0."),
    (r"^conv_mixer_layers\.(\d+)\.norm1\.", r"blocks.\1.0.fn.2."),
    (r"^conv_mixer_layers\.(\d+)\.point_wise_conv\.", r"blocks.\1.1."),
    (r"^conv_mixer_layers\.(\d+)\.norm2\.", r"blocks.\1.3."),
    (r"^classification\.linear\.", "head."),
)


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, or for another architecture.

    A ``RuntimeError``, as PyTorch's and timm's ``load_state_dict`` raise for a mismatch (fine-tuning code catches
    that), and a ``ValueError``, as earlier versions of convmixer-timm raised, so both kinds of ``except`` work.
    """


def unwrap_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """Return the tensors of a checkpoint, unwrapping ``{'state_dict': ...}``-style containers."""
    while isinstance(checkpoint, Mapping):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if wrapper is None:
            break
        checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"checkpoint holds a {type(checkpoint).__name__}, not a state dict; save model.state_dict() instead"
        )
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def detect_layout(keys: list[str]) -> str:
    """'timm', 'original' (the authors' nn.Sequential) or 'labml'; raises on anything else."""
    if any(k.startswith(("stem.", "blocks.")) for k in keys):
        return "timm"
    if any(k.startswith(("patch_emb.", "conv_mixer_layers.")) for k in keys):
        return "labml"
    if any(re.match(r"^\d+\.0\.fn\.0\.", k) for k in keys):
        return "original"
    sample = ", ".join(keys[:5]) or "(no tensors)"
    raise CheckpointError(
        f"not a ConvMixer checkpoint: keys such as {sample} match none of the timm, original (authors') or "
        "labml.ai layouts"
    )


def _original_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    block_ids = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"^(\d+)\.0\.fn\.", k))})
    depth = len(block_ids)
    if block_ids != list(range(3, 3 + depth)):
        raise CheckpointError(f"original-layout checkpoint has blocks at Sequential indices {block_ids}, "
                              f"expected 3..{depth + 2}")
    out = {}
    for key, value in state_dict.items():
        index, _, rest = key.partition(".")
        i = int(index)
        if i == 0:
            new = "stem.0." + rest
        elif i == 2:
            new = "stem.2." + rest
        elif 3 <= i < 3 + depth:
            new = f"blocks.{i - 3}.{rest}"
        elif i == depth + 5:  # depth + 3 is the pool and depth + 4 the flatten: no parameters
            new = "head." + rest
        else:
            raise CheckpointError(f"unexpected key {key!r} in an original-layout checkpoint of depth {depth}")
        out[new] = value
    return out


def _labml_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _LABML_RULES:
            new, count = re.subn(pattern, replacement, key)
            if count:
                out[new] = value
                break
        else:
            raise CheckpointError(f"unexpected key {key!r} in a labml.ai-layout checkpoint")
    return out


def to_timm_layout(checkpoint: Any) -> dict[str, torch.Tensor]:
    """Convert a checkpoint in any supported layout to timm's ConvMixer keys."""
    state_dict = {_strip_prefixes(k): v for k, v in unwrap_state_dict(checkpoint).items()}
    layout = detect_layout(list(state_dict))
    if layout == "original":
        return _original_to_timm(state_dict)
    if layout == "labml":
        return _labml_to_timm(state_dict)
    return state_dict


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: any layout in, timm layout out."""
    return to_timm_layout(state_dict)


def count_blocks(state_dict: Mapping[str, Any]) -> int:
    """Blocks really present: ``blocks.0``, ``blocks.1``, ... each with its depthwise weight, counted up to the
    first gap, so that a stray ``blocks.8.*`` key (or any other extra key) does not inflate the depth."""
    d = 0
    while f"blocks.{d}.0.fn.0.weight" in state_dict:
        d += 1
    return d


def key_differences(state_dict: Mapping[str, Any], expected: Mapping[str, Any], limit: int = 5) -> str:
    """The unexpected and missing keys of ``state_dict`` against ``expected``, named (at most ``limit`` each)."""
    unexpected = [k for k in state_dict if k not in expected]
    missing = [k for k in expected if k not in state_dict]
    parts = []
    for label, keys in (("unexpected", unexpected), ("missing", missing)):
        if keys:
            shown = ", ".join(keys[:limit]) + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")
            parts.append(f"{len(keys)} {label} key{'s' if len(keys) > 1 else ''}: {shown}")
    return "; ".join(parts)


def non_finite_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    """``(key, NaN count, inf count)`` of every floating-point tensor holding NaN or infinite values."""
    found = []
    for key, tensor in state_dict.items():
        if not (tensor.is_floating_point() or tensor.is_complex()) or bool(torch.isfinite(tensor).all()):
            continue
        nan = int(torch.isnan(tensor).sum())
        found.append((key, nan, int((~torch.isfinite(tensor)).sum()) - nan))
    return found


def non_finite_message(found: list[tuple[str, int, int]], limit: int = 5) -> str:
    """One line naming the tensors ``non_finite_tensors`` found."""
    shown = ", ".join(f"{key} ({nan:,} NaN, {inf:,} inf)" for key, nan, inf in found[:limit])
    more = f" (and {len(found) - limit} more)" if len(found) > limit else ""
    return f"{len(found)} tensor{'s' if len(found) > 1 else ''} hold NaN or infinite values: {shown}{more}"


def read_dimensions(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, int, int, int, int, int]:
    """(h, d, k, p, in_chans, num_classes) of timm-layout weights; num_classes is 0 without a head."""
    try:
        stem, depthwise = state_dict["stem.0.weight"], state_dict["blocks.0.0.fn.0.weight"]
    except KeyError as exc:
        raise CheckpointError(f"not a ConvMixer state dict: {exc!r} (stem.0 or blocks.0 missing)") from exc
    head = state_dict.get("head.weight")
    for key, tensor, rank in (("stem.0.weight", stem, 4), ("blocks.0.0.fn.0.weight", depthwise, 4),
                              ("head.weight", head, 2)):
        if tensor is not None and getattr(tensor, "ndim", None) != rank:
            shape = list(tensor.shape) if hasattr(tensor, "shape") else type(tensor).__name__
            raise CheckpointError(f"not a ConvMixer state dict: {key} must be a {rank}-d weight, got {shape}")
    h, in_chans, p, _ = stem.shape
    k = depthwise.shape[-1]
    d = count_blocks(state_dict)
    num_classes = int(head.shape[0]) if head is not None else 0
    return int(h), d, int(k), int(p), int(in_chans), num_classes


def describe_architecture(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the (h, d, k, p) a timm-layout state dict was made for, and the variant if it is a known one."""
    from .variants import find_variant

    try:
        h, d, k, p, in_chans, _ = read_dimensions(state_dict)
    except CheckpointError:
        return "an unrecognised ConvMixer"
    known = find_variant(h, d, k, p)
    which = f" ({known.name})" if known else ""
    return f"ConvMixer h={h}, d={d}, k={k}, p={p}, in_chans={in_chans}{which}"


def check_shapes_before_load(module: torch.nn.Module, state_dict: MutableMapping[str, Any], prefix: str,
                             *args: Any) -> None:
    """``load_state_dict`` pre-hook: convert the layout in place, then refuse mismatched shapes before any copy."""
    mine = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not mine:
        return
    try:
        converted = to_timm_layout({k[len(prefix):]: v for k, v in mine.items()})
    except CheckpointError:
        return  # let PyTorch report the missing/unexpected keys as usual
    for key in mine:
        del state_dict[key]
    state_dict.update({prefix + k: v for k, v in converted.items()})

    expected = module.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in converted.items()
                  if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if mismatched:
        shown = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched[:3])
        more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        raise CheckpointError(
            f"checkpoint shapes do not fit this model: {shown}{more}. The checkpoint is for "
            f"{describe_architecture(converted)}, the model is {describe_architecture(expected)}; create the "
            "matching model (or pass num_classes= for a different classifier). No weights were changed."
        )
    unfit = unfit_dtypes(converted, expected)
    if unfit:
        raise CheckpointError(f"{unfit_dtypes_message(unfit)}; save the floating-point weights again (e.g. "
                              "model.float().state_dict()). No weights were changed.")


def unfit_dtypes(state_dict: Mapping[str, Any], expected: Mapping[str, torch.Tensor]
                 ) -> list[tuple[str, torch.dtype, torch.dtype]]:
    """``(key, checkpoint dtype, model dtype)`` of every tensor that cannot stand for the model's: integer, bool or
    complex values where the model holds a floating-point parameter or running statistic.

    PyTorch's ``copy_`` would take them without a word: integers load as whole numbers (int64 weights of a float
    model are all zeros after training), complex values lose their imaginary part. Integer buffers of the model
    (BatchNorm's ``num_batches_tracked``) are left to PyTorch, which copies any number into them.
    """
    found = []
    for key, value in state_dict.items():
        target = expected.get(key)
        if (isinstance(value, torch.Tensor) and isinstance(target, torch.Tensor) and target.is_floating_point()
                and not value.is_floating_point()):
            found.append((key, value.dtype, target.dtype))
    return found


def unfit_dtypes_message(unfit: list[tuple[str, torch.dtype, torch.dtype]], limit: int = 5) -> str:
    """One line naming the tensors ``unfit_dtypes`` found."""
    def name(dtype: torch.dtype) -> str:
        return str(dtype).removeprefix("torch.")

    shown = ", ".join(f"{key} ({name(have)}, model {name(want)})" for key, have, want in unfit[:limit])
    more = f" (and {len(unfit) - limit} more)" if len(unfit) > limit else ""
    effects = {"integer": "integers as whole-number weights", "bool": "booleans as 0/1 weights",
               "complex": "complex values without their imaginary part"}
    kinds = [kind for kind in effects if any(_dtype_kind(have) == kind for _, have, _ in unfit)]
    return (f"{len(unfit)} checkpoint tensor{'s' if len(unfit) > 1 else ''} hold {' and '.join(kinds)} values where "
            f"the model has floating-point ones: {shown}{more}; PyTorch would load them without a word "
            f"({', '.join(effects[kind] for kind in kinds)})")


def _dtype_kind(dtype: torch.dtype) -> str:
    return "complex" if dtype.is_complex else "bool" if dtype == torch.bool else "integer"


def check_zip_inflation(path: str | os.PathLike[str]) -> None:
    """Refuse a zip checkpoint (torch.save's format) whose entries would inflate far beyond the file's size.

    Reads the central directory only (each entry's ``file_size``), so nothing is decompressed; a file that is
    missing, a folder or not a zip passes, for the loader to report or read as it is.
    """
    path = os.fspath(path)
    if not os.path.isfile(path) or not zipfile.is_zipfile(path):
        return  # legacy pickles are read as they are: their memory is bounded by their size
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                              "download or save it again") from exc
    on_disk = os.path.getsize(path)
    inflated = sum(entry.file_size for entry in entries)
    limit = MAX_INFLATION * on_disk + MAX_INFLATION_SLACK
    if inflated > limit:
        largest = max(entries, key=lambda entry: entry.file_size)
        raise CheckpointError(
            f"{path} is a {on_disk:,}-byte zip whose entries would inflate to {inflated:,} bytes (largest: "
            f"{largest.filename!r}, {largest.file_size:,} bytes from {largest.compress_size:,}); more than "
            f"{MAX_INFLATION}x its size, which no torch.save checkpoint does, so it was not read. Save the "
            "weights again with torch.save or as safetensors."
        )


def load_checkpoint_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file as data: safetensors, or a pickle through ``torch.load(weights_only=True)``.

    Returns the raw tensors (any layout); errors name the file and what is wrong with it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except SafetensorError as exc:
            raise CheckpointError(f"{path} is truncated or corrupt (safetensors: {exc}); download it again") from exc
    check_zip_inflation(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # the safe unpickler stopped on bytes it cannot parse, not on a callable
            raise CheckpointError(f"{path} is truncated or corrupt: it is not a pickle that "
                                  "torch.load(weights_only=True) can read, and nothing in it was run") from exc
        blocked = next((line for line in str(exc).splitlines() if "GLOBAL" in line), "").strip()
        raise CheckpointError(
            f"{path} holds Python objects beyond tensors, which could run code when unpickled, so it was not "
            f"loaded ({blocked}). Re-save only the state dict (or safetensors) on a machine that trusts it."
        ) from exc
    except Exception as exc:  # the unpickler fails on garbage in many ways (IndexError, KeyError, ...)
        raise CheckpointError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                              "download or save it again") from exc
    return unwrap_state_dict(checkpoint)

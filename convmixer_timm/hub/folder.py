"""Hub-ready folders: write one (checked, then installed crash-safe), load one, verify one.

A folder holds ``model.safetensors`` (timm key layout), ``config.json`` in timm's own format (see ``format``), so
that ``timm.create_model("local-dir:DIR", pretrained=True)``, ``"hf-hub:ORG/NAME"`` and transformers' timm wrapper
rebuild the model from it, and a model card ``README.md`` stating only facts about these weights.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..labels import check_labels, check_text, dataset_labels, generic_labels
from ..model_card import Architecture, render_model_card
from ..models.checkpoint import CheckpointError, describe_architecture, to_timm_layout
from ..models.variants import Variant, get_variant
from . import install
from .format import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    HubFolderError,
    activation_of,
    architecture_of,
    check_transformers_config,
    differing_args,
    keep_differing_args,
    model_args_of,
    weights_sha256,
)

__all__ = ["load_hub_folder", "save_hub_folder", "verify_hub_folder"]


def _resolve_labels(labels: Sequence[str] | None, model: nn.Module, variant: Variant, num_classes: int,
                    dataset: str | None, published: bool
                    ) -> tuple[tuple[str, ...] | None, dict[str, str] | None, bool]:
    """Class names for config.json: (names, their descriptions, whether they are ImageNet-1k's own); None when
    nobody knows them.

    Names are known when the caller gives them, when the model already carries them (a folder loaded and saved
    again), when ``dataset`` names a data set of that size, or when the weights are the variant's published ones.
    A classifier of the variant's size is not enough: random or re-trained weights may classify anything.
    """
    if labels is not None:
        return check_labels(labels, num_classes), None, False
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("label_names") and cfg.get("num_classes") == num_classes:
        names = cfg["label_names"]
        if isinstance(names, (list, tuple)) and len(names) == num_classes and tuple(names) != generic_labels(
                num_classes):
            descriptions = cfg.get("label_descriptions")
            own = dataset_labels(variant.dataset)
            return tuple(names), descriptions if isinstance(descriptions, dict) else None, bool(
                own and own.descriptions and tuple(names) == own.names)
    known = dataset_labels(dataset or (variant.dataset if published else None))
    if known is None or len(known.names) != num_classes:
        return None, None, False
    return known.names, known.descriptions, known.descriptions is not None


def _transformers_guesses_imagenet(num_classes: int) -> bool:
    """Whether transformers' timm wrapper, given no class names, names these outputs as an ImageNet subset's."""
    from timm.data import infer_imagenet_subset

    return infer_imagenet_subset({"num_classes": num_classes}) is not None


def _build_reference(variant: Variant, model: nn.Module, state_dict: dict[str, torch.Tensor],
                     args: dict[str, Any]) -> nn.Module:
    """A fresh timm-built model holding ``state_dict``: what ``local-dir:`` will rebuild from the folder."""
    import timm

    try:
        reference = timm.create_model(variant.name, pretrained=False, **args)
    except (TypeError, ValueError) as exc:
        raise HubFolderError(f"cannot build {variant.name} with {args}: {exc}") from exc
    source_cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(source_cfg, Mapping) and source_cfg.get("architecture") == variant.name:
        # Keep the caller's preprocessing (input size, mean/std, crop) when the model came from timm.
        reference.pretrained_cfg = dict(source_cfg)
    try:
        reference.load_state_dict(state_dict)
    except CheckpointError:
        raise
    except RuntimeError as exc:
        raise CheckpointError(
            f"the weights ({describe_architecture(state_dict)}) do not fit {variant.name} built with {args}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return reference.eval()


def _assert_same(expected: torch.Tensor, actual: torch.Tensor, what: str) -> None:
    if torch.equal(actual, expected):  # the common case, and far cheaper than assert_close
        return
    try:  # NaNs in the same places count as equal; otherwise report where they differ
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    except AssertionError as exc:
        raise HubFolderError(f"{what} differs after reloading the folder: {str(exc).splitlines()[0]}") from exc


def _probe_input(input_size: tuple[int, ...], patch_size: int) -> torch.Tensor:
    # ConvMixer runs at any size >= p; a 4 x 4 patch grid exercises every layer (padding included) at a
    # fraction of the cost of 224 px (seconds per pass for the large variants on a small CPU).
    channels, *spatial = input_size
    spatial = [min(s, 4 * patch_size) for s in spatial]
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, channels, *spatial, generator=generator)


def verify_hub_folder(path: str | os.PathLike[str]) -> nn.Module:
    """Build the model from a folder through ``local-dir:`` and run one forward; return it in eval mode.

    Also refuses a config.json that transformers cannot load (``num_classes`` repeated in ``model_args``, as
    timm's ``save_for_hf`` and earlier versions of convmixer-timm write it). Raises ``HubFolderError`` naming what is
    missing or broken and the fix.
    """
    model = _load_folder(Path(path), run_forward=True)
    check_transformers_config(Path(path))
    return model


def _load_folder(folder: Path, run_forward: bool) -> nn.Module:
    if not folder.is_dir():
        raise HubFolderError(f"{folder} is not a folder; write one with `convmixer-timm convert` first")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        raise HubFolderError(f"{folder} lacks {', '.join(missing)}; write it with `convmixer-timm convert`")
    import timm

    try:
        model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True).eval()
        if not run_forward:
            return model
        input_size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        with torch.inference_mode():
            out = model(_probe_input(input_size, getattr(model, "patch_size", 7)))
    except Exception as exc:  # anything timm or the weights raise means the folder is unusable
        raise HubFolderError(f"{folder} does not load with timm: {type(exc).__name__}: {exc}") from exc
    if out.shape != (1, model.num_classes) and model.num_classes > 0:
        raise HubFolderError(f"{folder} gives outputs of shape {tuple(out.shape)}, expected (1, {model.num_classes})")
    return model


def load_hub_folder(path: str | os.PathLike[str]) -> nn.Module:
    """The model of a Hub folder, weights loaded, in eval mode (``timm.create_model("local-dir:...")``)."""
    return _load_folder(Path(path), run_forward=False)

def save_hub_folder(
        model: torch.nn.Module,
        out_dir: str | os.PathLike,
        model_name: str,
        *,
        metrics: dict[str, float] | None = None,
        dataset: str | None = None,
        overwrite: bool = False,
        model_args: dict | None = None,
        labels: Sequence[str] | None = None,
        metrics_note: str | None = None,
) -> Path:
    """Write ``model`` as a Hub-ready folder and return its path.

    Args:
        model: A ConvMixer (timm-built, or any module whose state dict is in a supported layout, such as the
            authors' ``nn.Sequential``). Its weights are copied, the model itself is not changed.
        out_dir: Folder to create. It appears complete or not at all: everything is written to a hidden
            folder beside it, reloaded and compared, then renamed into place.
        model_name: The variant the model is an instance of (e.g. ``"convmixer_768_32"``); h/d/k/p/classes are
            read from the weights, so variants with overridden sizes are fine.
        metrics: Figures for these weights, for the model card, e.g. ``{"top1": 98.6, "dataset": "sklearn
            digits"}``; the ``dataset`` entry (or ``dataset``) names what they were measured on and is required.
        dataset: What the weights were trained on, if known. The card names a training data set only when this
            is given or the weights are the variant's published ones (``Variant.published_sha256``).
        overwrite: Replace an existing ``out_dir``; it stays intact if the new write fails. Only a folder holding
            nothing but what this function writes (or a symbolic link, replaced, its target untouched) is replaced.
        model_args: Constructor arguments overriding those read from the model (JSON-serialisable). config.json
            keeps only the arguments that differ from the registered variant, and never ``num_classes``.
        labels: One class name per output, in order (plain text: control characters are refused). Default:
            names the model already carries, else those of ``dataset`` (ImageNet-1k's synsets, CIFAR-10's names)
            when the classifier has that data set's size, else those of the variant's data set for its published
            weights; else none are known, and config.json names none (or, for the class counts transformers
            would take for ImageNet's, LABEL_0, LABEL_1, ...). They become timm's ``label_names`` and
            transformers' ``id2label``.
        metrics_note: Where ``metrics`` come from, for the card (default: measured for these weights).

    Raises:
        ValueError: ``labels`` do not give one unique name per class, or hold a control character; ``dataset``
            holds a control character; ``metrics`` name no data set; or ``out_dir`` names no folder (``/``,
            ``..``) or one the file system cannot hold (over 255 bytes, not UTF-8).
        FileExistsError: ``out_dir`` exists (or is a symbolic link) and ``overwrite`` is False, or is a file.
        KeyError: unknown ``model_name`` (the message names the nearest variants).
        CheckpointError: the weights do not fit the variant.
        HubFolderError: the folder could not be written (the message names the cause: a full disk, a read-only
            file system...) or does not reload identically.
    """
    variant = get_variant(model_name)
    if dataset is not None:
        check_text(dataset, "dataset")
    install.recover_output(out_dir)
    out_dir = install.check_output_path(out_dir, overwrite)
    existed = out_dir.exists() or out_dir.is_symlink()

    state_dict = {k: v.detach().to("cpu", copy=True) for k, v in to_timm_layout(model.state_dict()).items()}
    arch = architecture_of(state_dict, activation_of(model, variant.act))
    args = model_args_of(variant, model, arch, model_args)
    reference = _build_reference(variant, model, state_dict, args)
    arch = Architecture(h=arch.h, d=arch.d, k=arch.k, p=arch.p, act=str(args.get("act_layer", arch.act)),
                        in_chans=arch.in_chans, num_classes=arch.num_classes)
    if any(k != "dataset" for k in metrics or {}) and not (dataset or (metrics or {}).get("dataset")):
        raise ValueError("metrics need the data set they were measured on: pass dataset=... or metrics['dataset']")
    published = weights_sha256(reference.state_dict()) in variant.published_sha256
    names, descriptions, imagenet_names = _resolve_labels(labels, model, variant, arch.num_classes, dataset,
                                                          published)

    # timm reads label names from config.json's top level or its pretrained_cfg; transformers reads only the top
    # level, and with none there it names 1000 classes with ImageNet-1k's readable descriptions ("tench, Tinca
    # tinca") itself. ImageNet-1k's synsets therefore stay inside pretrained_cfg (timm's inference.py prints
    # them, or their descriptions), where at the top level transformers would show "n01440764" instead.
    for key in ("label_names", "label_descriptions", "label_offset"):
        reference.pretrained_cfg.pop(key, None)
    model_config: dict[str, Any] = {}
    if names is not None and imagenet_names:
        reference.pretrained_cfg["label_names"] = list(names)
        if descriptions:
            reference.pretrained_cfg["label_descriptions"] = dict(descriptions)
    elif names is not None:
        model_config["label_names"] = list(names)
        if descriptions:
            model_config["label_descriptions"] = dict(descriptions)
    elif _transformers_guesses_imagenet(arch.num_classes):
        # Unknown names: transformers' own default (LABEL_0, ...), written out so that it does not name these
        # outputs as ImageNet's classes.
        model_config["label_names"] = list(generic_labels(arch.num_classes))

    try:
        _write_staged(reference, out_dir, overwrite, variant, args, model_config, arch, metrics, metrics_note,
                      dataset, published, names)
    except OSError as exc:
        if exc.errno is None:  # ours (the output appeared meanwhile), already one line
            raise
        raise install.write_error(exc, out_dir, existed) from exc
    except Exception as exc:
        from safetensors import SafetensorError

        if isinstance(exc, SafetensorError):
            raise install.write_error(exc, out_dir, existed) from exc
        raise
    return out_dir


def _write_staged(reference: nn.Module, out_dir: Path, overwrite: bool, variant: Variant, args: dict[str, Any],
                  model_config: dict[str, Any], arch: Architecture, metrics: dict[str, float] | None,
                  metrics_note: str | None, dataset: str | None, published: bool,
                  names: tuple[str, ...] | None) -> None:
    """Write the folder beside ``out_dir``, reload and compare it, then move it into place."""
    from timm.models._hub import save_for_hf

    with install.staging_dir(out_dir) as staging:
        try:
            save_for_hf(reference, str(staging), model_config=model_config, model_args=args, safe_serialization=True)
            keep_differing_args(staging / CONFIG_NAME, differing_args(variant, args))
        except (ValueError, TypeError) as exc:
            raise HubFolderError(f"could not write the folder: {exc}") from exc
        input_size = tuple(reference.pretrained_cfg.get("input_size", (3, arch.p * 32, arch.p * 32)))
        input_size = (arch.in_chans, *input_size[1:])
        card = render_model_card(
            repo_name=out_dir.name, variant=variant, arch=arch, input_size=input_size,
            global_pool=str(args.get("global_pool", "avg")),
            param_count=sum(t.numel() for t in reference.parameters()),
            metrics=metrics, metrics_note=metrics_note, dataset=dataset, published=published, labels=names,
        )
        (staging / CARD_NAME).write_text(card, encoding="utf-8")

        loaded = _load_folder(staging, run_forward=False)  # the forward below runs it
        loaded_state = loaded.state_dict()
        for key, expected in reference.state_dict().items():
            _assert_same(expected, loaded_state[key], f"tensor {key}")
        x = _probe_input(input_size, arch.p)
        with torch.inference_mode():
            _assert_same(reference(x), loaded(x), "the model output")
        install.move_into_place(staging, out_dir, overwrite)


"""What ``timm.create_model(name, inference_precision=...)`` returns: the way timm's own ``validate.py`` and
``benchmark.py`` run :func:`optimize_for_inference` at any precision, through their ``--model-kwargs``::

    python validate.py --model convmixer_768_32 --pretrained --data-dir DIR \\
        --model-kwargs inference_precision=bf16
    python benchmark.py --model convmixer_768_32 --model-kwargs inference_precision=int8 calibration_dir=TRAIN_DIR

The scripts create the model, then load ``--checkpoint``, move it and switch it to eval mode; only their first
forward without autograd shows the input it will serve. So :class:`DeferredInference` is the model itself until
then (its parameters, ``state_dict`` keys, ``pretrained_cfg`` and ``num_classes`` are the model's), and that first
eval-mode CPU call builds the optimized module for the call's shape, which serves every later call. Loading weights,
moving the model or training it again drops the optimized module, to be rebuilt from the weights then current.
Training mode, calls with autograd and other devices run the model itself.

int8 calibrates on ``calibration_images`` images drawn (seeded) from ``calibration_dir``, a folder of training
images timm's ``create_dataset`` reads (its ``train`` split where it has one, never ``validation``), through the
eval preprocessing validate.py gives the model: its pretrained config, overridden by ``calibration_config`` where
the script is told otherwise (the same keys: ``input_size``, ``mean``, ``std``, ``crop_pct``, e.g.
``calibration_config="{'mean': (0.5,), 'std': (0.5,)}"`` beside ``--mean 0.5 --std 0.5``). Never calibrate on
the images being validated.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["DeferredInference", "calibration_images"]


class DeferredInference(nn.Module):
    """``model`` whose eval-mode CPU calls without autograd run :func:`optimize_for_inference` at ``precision``."""

    def __init__(self, model: nn.Module, precision: str, calibration_dir: str | os.PathLike | None = None,
                 calibration_images: int = 512, calibration_config: Mapping[str, Any] | None = None):
        super().__init__()
        from .precision import check_precision

        if precision == "int8" and calibration_dir is None:
            raise ValueError("inference_precision='int8' needs calibration_dir=FOLDER: training images to calibrate "
                             "on (timm --model-kwargs inference_precision=int8 calibration_dir=/data/train)")
        check_precision(precision, calibration_dir)
        if calibration_dir is not None and not os.path.isdir(calibration_dir):
            raise ValueError(f"calibration_dir {str(calibration_dir)!r} is not a folder of training images")
        if isinstance(calibration_images, bool) or not isinstance(calibration_images, int) or calibration_images < 1:
            raise ValueError(f"calibration_images must be a positive number of images, got {calibration_images!r}")
        self.model = model
        self.precision = precision
        self.calibration_dir = None if calibration_dir is None else os.fspath(calibration_dir)
        self.calibration_images = calibration_images
        if calibration_config is not None and not isinstance(calibration_config, Mapping):
            raise ValueError("calibration_config must be a dict of timm data-config keys (input_size, mean, std, "
                             f"crop_pct), got {calibration_config!r}")
        self.calibration_config = dict(calibration_config or {})
        self._drop()
        # The model's own state_dict keys (``stem.0.weight``, not ``model.stem.0.weight``) at any depth of nesting:
        # hooks rather than overrides, since a parent's state_dict and load_state_dict never call this module's.
        self.register_state_dict_post_hook(_keys_of_the_model)
        self.register_load_state_dict_pre_hook(_load_into_the_model)
        self.register_load_state_dict_post_hook(_keys_reported_as_the_models)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)  # pretrained_cfg, num_classes, forward_features...

    def _drop(self) -> None:
        self.__dict__["optimized"] = None  # not a submodule: no parameters or state_dict keys of its own

    def _apply(self, fn: Any, recurse: bool = True) -> DeferredInference:
        self._drop()
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> DeferredInference:
        if mode:
            self._drop()
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() or x.device.type != "cpu" or x.dim() != 4:
            return self.model(x)
        if self.optimized is None:
            self.__dict__["optimized"] = self._build(tuple(x.shape))
        return self.optimized(x)

    def _build(self, input_size: tuple[int, ...]) -> nn.Module:
        from .autotune import optimize_for_inference

        # validate.py and benchmark.py call under inference_mode; the race and the exports need ordinary tensors.
        with torch.inference_mode(False):
            return optimize_for_inference(self.model, input_size=input_size, precision=self.precision,
                                          calibration=self._calibration())

    def _calibration(self) -> list[torch.Tensor] | None:
        if self.calibration_dir is None:
            return None
        return calibration_images(self.model, self.calibration_dir, self.calibration_images, self.calibration_config)


def _keys_of_the_model(module: DeferredInference, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(inner)]:  # in order: they are the last keys saved yet
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _load_into_the_model(module: DeferredInference, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    module._drop()  # new weights: the optimized module is rebuilt from them
    module.__dict__["_loading_prefix"] = prefix
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


def _keys_reported_as_the_models(module: DeferredInference, incompatible: Any) -> None:
    inner = module.__dict__.pop("_loading_prefix", "") + "model."
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [key.replace(inner, inner[: -len("model.")], 1) if key.startswith(inner) else key for key in keys]


def calibration_images(model: nn.Module, root: str | os.PathLike, count: int, config: Mapping[str, Any] | None = None,
                       dataset: str = "", split: str = "train", seed: int = 0, batch_size: int = 64
                       ) -> list[torch.Tensor]:
    """``count`` images drawn (seeded) from timm's ``dataset`` at ``root`` (default: a folder of images), as batches
    through ``model``'s eval preprocessing: its pretrained config overridden by ``config`` (timm data-config keys),
    read in the colour mode of its input size, as validate.py reads them."""
    from timm.data import create_dataset, create_transform, resolve_data_config

    resolved = resolve_data_config(dict(config or {}), model=model)
    mode = "RGB" if resolved["input_size"][0] == 3 else "L"
    images = create_dataset(dataset, root=os.fspath(root), split=split, transform=create_transform(
        **resolved, is_training=False), input_img_mode=mode)
    if len(images) == 0:
        raise ValueError(f"{os.fspath(root)!r} holds no images timm can read")
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:min(count, len(images))]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images, chosen.tolist()), batch_size=batch_size)
    return [batch for batch, _ in loader]

"""ONNX export of any ConvMixer variant, even kernels included.

The model's even-kernel depthwise convolution pads explicitly ((k-1)//2 before, k//2 after) instead of using
``padding="same"``, whose ONNX export has failed for years (pytorch#68880, pytorch#108975), so every variant
exports as plain Pad/Conv/Erf/BatchNormalization nodes.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import secrets
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["check_onnx", "export_onnx"]


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: Sequence[int] | None = None,
                opset: int = 17, dynamic_batch: bool = True) -> Path:
    """Export ``model`` in eval mode to ``path`` (ONNX, ``opset`` >= 17); returns the path.

    The file is written next to ``path`` under a temporary name and renamed into place only once the export
    succeeded, so a failed export never leaves a truncated model behind, nor a folder it created for it. The graph
    input is ``input`` (``(N, C, H, W)`` float32, batch dimension dynamic unless ``dynamic_batch=False``), the
    output ``logits``. ``input_size`` (``(N, C, H, W)`` or ``(C, H, W)``) defaults to one image of the model's
    channels at its pretrained config's size (224 x 224 without one).
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17, the oldest this export is tested with, got {opset}")
    if input_size is None:
        config = getattr(model, "pretrained_cfg", None) or {}
        input_size = (getattr(model, "in_chans", 3), *tuple(config.get("input_size", (3, 224, 224)))[1:])
    size = tuple(int(s) for s in input_size)
    if len(size) == 3:
        size = (1, *size)
    if len(size) != 4:
        raise ValueError(f"input_size must be (N, C, H, W) or (C, H, W), got {tuple(input_size)}")
    path = Path(path)
    created = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    tmp = None
    try:
        tmp = _create_temporary(path)  # at once: a folder holding it is never removed by another failed export
        model = copy.deepcopy(model).float().eval()
        x = torch.randn(size, generator=torch.Generator().manual_seed(0))  # the caller's random stream untouched
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter writes the requested opset exactly; the dynamo exporter (newer torch
            # without it) targets its own minimum opset and down-converts, which has no adapter for Pad to 17.
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    model, (x,), tmp, opset_version=opset, input_names=["input"], output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
                    dynamo=False,
                )
            except TypeError:  # torch without the ``dynamo`` switch: the TorchScript exporter is the only one
                torch.onnx.export(
                    model, (x,), tmp, opset_version=opset, input_names=["input"], output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
                )
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        for folder in created:  # innermost first; one that holds something now is not ours alone
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return path


def _create_temporary(path: Path) -> str:
    """An empty file beside ``path`` to export into, created with the permissions any new file of the user gets,
    and the folders to hold it where they are missing (again, where another export's failure removed them).

    ``tempfile.mkstemp`` makes its files 0600, which the final rename would carry over (a model other users of the
    machine cannot read, under umask 022); ``os.open`` with 0666 lets the umask decide, as ``open(path, "w")``
    would. The name stays within 255 bytes whatever the length of ``path``'s.
    """
    name = path.name
    if len(os.fsencode(name)) > 200:
        name = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    for _ in range(100):
        tmp = str(path.parent / f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


def check_onnx(model: nn.Module, path: str | os.PathLike, x: torch.Tensor, rtol: float = 1e-4) -> float:
    """Run the exported file with onnxruntime on ``x`` and return max |ort - torch| / max |torch|.

    Raises ``AssertionError`` if that exceeds ``rtol``.
    """
    from .speed.runtimes import import_runtime

    ort = import_runtime("onnxruntime")  # its telemetry switched off unless the program imported it itself
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = copy.deepcopy(model).float().eval()(x.float())
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.float().numpy()})[0])
    err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    if err > rtol:
        raise AssertionError(f"onnxruntime output differs from PyTorch by {err:.3g} (relative), above {rtol}")
    return err

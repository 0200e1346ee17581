"""The low-precision models the race of :class:`.lowp.LowPrecisionConvMixer` times: PyTorch in bf16 (weights
cast, or autocast), PyTorch int8 (PT2E with the x86 inductor quantizer where ``torchao`` is installed, else FX
graph-mode quantization), and the ONNX export statically quantized by onnxruntime (QDQ, per-channel weights),
which onnxruntime and OpenVINO both run in int8.

Every model here takes and returns float32: inputs are cast in, outputs cast back.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .runtimes import import_runtime

__all__ = ["TorchBf16", "TorchBf16Autocast", "int8_backend", "onnx_int8_bytes", "torch_int8"]


class TorchBf16(nn.Module):
    """A bf16 copy of the eval model (weights and activations bf16, channels_last; BatchNorm statistics stay
    float32, which CPU batch norm takes beside bf16 activations), float32 in and out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
        for module in self.model.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                for name, param in module.named_parameters(recurse=False):
                    setattr(module, name, nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        return self.model(x).float()


class TorchBf16Autocast(nn.Module):
    """The float32 eval model (channels_last) run under CPU autocast to bf16, float32 out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.model(x.contiguous(memory_format=torch.channels_last))
        return out.float()


def int8_backend() -> str:
    """PyTorch's int8 flow used here: ``"pt2e"`` where ``torchao`` is installed (its PT2E quantizers moved there
    from ``torch.ao``), else ``"fx"`` (``torch.ao.quantization.quantize_fx``, kept in torch for now)."""
    return "pt2e" if importlib.util.find_spec("torchao") is not None else "fx"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The quantization flows warn about their own deprecation and print advice to the root logger on every use;
    # the user asked for int8 and gets one report from us instead.
    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return record.levelno > logging.WARNING

    root, drop = logging.getLogger(), Drop()
    root.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(drop)


class _Float32Out(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.float32)).float()


def _fx_int8(model: nn.Module, batches: Sequence[torch.Tensor]) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    # The engine's default mapping: per-channel symmetric int8 weights for the stem, 1x1 and head, uint8
    # activations observed per tensor on the calibration batches.
    mapping = get_default_qconfig_mapping(torch.backends.quantized.engine)
    prepared = prepare_fx(copy.deepcopy(model).eval(), mapping, (batches[0],))
    with torch.no_grad():
        for x in batches:
            prepared(x)
    return convert_fx(prepared)


def _pt2e_int8(model: nn.Module, batches: Sequence[torch.Tensor]) -> nn.Module:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    batch = torch.export.Dim("batch", min=1)
    graph = torch.export.export(copy.deepcopy(model).eval(), (batches[0],),
                                dynamic_shapes=({0: batch},) if batches[0].shape[0] > 1 else None).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for x in batches:
            prepared(x)
    return convert_pt2e(prepared)


def torch_int8(model: nn.Module, batches: Sequence[torch.Tensor], backend: str | None = None) -> nn.Module:
    """``model`` quantized to int8 by PyTorch (:func:`int8_backend`), calibrated on ``batches``."""
    backend = backend or int8_backend()
    with _quiet():
        quantized = _pt2e_int8(model, batches) if backend == "pt2e" else _fx_int8(model, batches)
    return _Float32Out(quantized).eval()


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over calibration batches."""

    def __init__(self, name: str, batches: Sequence[torch.Tensor]):
        self.items = iter([{name: x.contiguous().numpy()} for x in batches])

    def get_next(self) -> dict | None:
        return next(self.items, None)

    def rewind(self) -> None:  # pragma: no cover - called only by calibration methods that read twice
        raise NotImplementedError


def onnx_int8_bytes(onnx: bytes, batches: Sequence[torch.Tensor]) -> bytes:
    """The ONNX export ``onnx`` statically quantized by onnxruntime, calibrated on ``batches`` (min-max):
    QDQ format, int8 weights per output channel, uint8 activations per tensor. onnxruntime and OpenVINO both
    run it with int8 kernels."""
    import_runtime("onnxruntime")
    import onnx as onnx_lib
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    name = onnx_lib.load_from_string(onnx).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        source, target = Path(tmp) / "model.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(onnx)
        quantize_static(str(source), str(target), _Reader(name, batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return target.read_bytes()

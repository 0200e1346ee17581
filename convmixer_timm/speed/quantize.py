"""The low-precision models the race of :class:`.lowp.LowPrecisionConvMixer` times: PyTorch in bf16 (weights
cast, or autocast), PyTorch int8 (FX graph-mode quantization, and PT2E with the x86 inductor quantizer where
``torchao`` is installed), and the ONNX export statically quantized by onnxruntime (QDQ, per-channel weights),
which onnxruntime and OpenVINO both run in int8.

Every model here takes and returns float32: inputs are cast in, outputs cast back.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .runtimes import NNCF_IMPORT_WARNS, import_runtime, quiet_loggers, read_onnx

__all__ = ["TorchBf16", "TorchBf16Autocast", "int8_backends", "onnx_int8_bytes", "torch_int8"]


def _split(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("stem", "blocks", "forward_head"))


class TorchBf16(nn.Module):
    """A copy of the eval model whose blocks run in bf16 (weights and activations, channels_last; BatchNorm
    statistics stay float32, which CPU batch norm takes beside bf16 activations), float32 in and out.

    The patch embedding and the classifier stay float32 (about 1% of the multiply-adds): the embedding's
    BatchNorm multiplies some channels by up to 100 in a briefly trained model, which made bf16's rounding of
    its input flip 1% of top-1 answers on digits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
        self.split = _split(self.model)
        for module in (self.model.blocks if self.split else self.model).modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                for name, param in module.named_parameters(recurse=False):
                    setattr(module, name, nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).contiguous(memory_format=torch.channels_last)
        if not self.split:
            return self.model(x.to(torch.bfloat16)).float()
        x = self.model.blocks(self.model.stem(x).to(torch.bfloat16))
        return self.model.forward_head(x.float()).float()


class TorchBf16Autocast(nn.Module):
    """The float32 eval model (channels_last) with its blocks run under CPU autocast to bf16, float32 out (the
    patch embedding and classifier outside it, as in :class:`TorchBf16`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.split = _split(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).contiguous(memory_format=torch.channels_last)
        if not self.split:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.model(x).float()
        x = self.model.stem(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = self.model.blocks(x)
        return self.model.forward_head(x.float()).float()


def int8_backends() -> tuple[str, ...]:
    """PyTorch's int8 flows available here: ``"fx"`` (``torch.ao.quantization.quantize_fx``: quantized oneDNN /
    FBGEMM convolutions, run as they are) and ``"pt2e"`` where ``torchao`` is installed (PT2E with the x86
    inductor quantizer, whose quantizers moved from ``torch.ao`` to torchao, lowered by inductor to oneDNN's int8
    convolutions: compiled at its first call, tens of seconds on 2 cores)."""
    return ("fx", "pt2e") if importlib.util.find_spec("torchao") is not None else ("fx",)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The quantization flows warn about their own deprecation and print advice to the root logger on every use;
    # the user asked for int8 and gets one report from us instead. Only this thread's records: the program's
    # other threads keep logging meanwhile.
    quantizing = threading.get_ident()

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return record.levelno > logging.WARNING or record.thread != quantizing

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


def _pointwise(model: nn.Module) -> list[str]:
    """The names of the blocks' 1x1 convolutions: what PyTorch's int8 flows quantize. The patch embedding and
    the classifier stay float32, as in :func:`onnx_int8_bytes`, and so do the residual adds (a per-tensor uint8
    sum loses the small branch beside the large skip) and the depthwise convolution (FX's quantized convolution
    takes no ``padding="same"``)."""
    return [name for name, module in model.named_modules()
            if type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.groups == 1
            and not name.startswith("stem")]


def _fx_int8(model: nn.Module, batches: Sequence[torch.Tensor]) -> nn.Module:
    from torch.ao.quantization import QConfigMapping, get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    # The engine's default qconfig: per-channel symmetric int8 weights, uint8 activations observed per tensor
    # on the calibration batches.
    qconfig = get_default_qconfig_mapping(torch.backends.quantized.engine).global_qconfig
    mapping = QConfigMapping()
    for name in _pointwise(model):
        mapping.set_module_name(name, qconfig)
    prepared = prepare_fx(copy.deepcopy(model).eval(), mapping, (batches[0],))
    with torch.no_grad():
        for x in batches:
            prepared(x)
    return convert_fx(prepared)


def _pt2e_int8(model: nn.Module, batches: Sequence[torch.Tensor]) -> nn.Module:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = copy.deepcopy(model).eval()
    # An example batch of one would fix the graph's batch size at 1 (export specializes sizes 0 and 1).
    example = batches[0] if batches[0].shape[0] > 1 else batches[0].expand(2, *batches[0].shape[1:])
    graph = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
    quantizer, config = x86.X86InductorQuantizer(), x86.get_default_x86_inductor_quantization_config()
    for name in _pointwise(model):  # per-channel weights (the default config's)
        quantizer.set_module_name_qconfig(name, config)
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for x in batches:
            prepared(x)
    converted = convert_pt2e(prepared)
    allow_exported_model_train_eval(converted)  # the module holding it calls .eval()
    return converted


class _LoweredByInductor(nn.Module):
    """PT2E's converted graph compiled by inductor with freezing, which turns each dequantize-convolution-quantize
    pattern into oneDNN's int8 convolution with prepacked weights. Freezing is inductor's process-wide setting: it
    is switched on around this module's calls only (where a compilation happens), and put back after each."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph
        self.compiled = torch.compile(graph)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True), torch.no_grad():
            return self.compiled(x)


def torch_int8(model: nn.Module, batches: Sequence[torch.Tensor], backend: str = "fx") -> nn.Module:
    """``model`` quantized to int8 by PyTorch's ``backend`` flow (:func:`int8_backends`), calibrated on
    ``batches``."""
    with _quiet():
        quantized = _LoweredByInductor(_pt2e_int8(model, batches)) if backend == "pt2e" else _fx_int8(model, batches)
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

    model = onnx_lib.load_from_string(onnx)
    # quantize_static advises pre-processing through logging.warning unless the model carries its mark, and that
    # module-level call gives a root logger without handlers a stderr handler (logging.basicConfig), which would
    # turn the user's own basicConfig into a no-op. Its advice (shape inference, ONNX Runtime's graph
    # optimizations) has nothing to do here: the shapes are static but the batch, and the only ops quantized are
    # the named 1x1 convolutions, whose BatchNorms follow an activation and cannot be fused into them.
    onnx_lib.helper.set_model_props(model, {**{prop.key: prop.value for prop in model.metadata_props},
                                            "onnx.quant.pre_process": "onnxruntime.quant"})
    graph = model.graph
    name = graph.input[0].name
    # The blocks' 1x1 convolutions only, as in PyTorch's flows (:func:`_pointwise`). A BatchNorm quantized as an
    # op gets one int8 scale for all its channels' multipliers, which differ by orders of magnitude (top-1
    # agreement fell to 32% on digits); the patch embedding's output feeds a BatchNorm that multiplies the
    # rounding of some channels by up to 100; quantizing the depthwise convolutions too cost another 0.25% of
    # agreement on held-out digits.
    weights = {tensor.name: list(tensor.dims) for tensor in graph.initializer}

    def pointwise(node: object) -> bool:  # a 1x1 convolution over several channels (not depthwise), not the stem
        dims = weights.get(node.input[1], []) if len(node.input) > 1 else []
        return node.op_type == "Conv" and name not in node.input and dims[2:] == [1, 1] and dims[1] > 1

    nodes = [node.name for node in graph.node if pointwise(node)]
    if not nodes:
        raise ValueError("no 1x1 convolution with its weights as an initializer in the ONNX export to quantize")
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        source, target = Path(tmp) / "model.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(model.SerializeToString())
        quantize_static(str(source), str(target), _Reader(name, batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv"], nodes_to_quantize=nodes)
        return target.read_bytes()


def nncf_installed() -> bool:
    """Whether OpenVINO's post-training quantizer NNCF is importable (the ``nncf`` extra)."""
    return importlib.util.find_spec("nncf") is not None and importlib.util.find_spec("openvino") is not None


def openvino_nncf_int8(onnx: bytes, batches: Sequence[torch.Tensor]) -> object:
    """The ONNX export ``onnx`` read by OpenVINO and quantized by NNCF (``nncf.quantize``, its performance preset:
    int8 weights per output channel, int8 activations per tensor), calibrated on ``batches``: an ``openvino.Model``.
    As in the other int8 paths, only the blocks' 1x1 convolutions are quantized: the depthwise (grouped)
    convolutions, the patch embedding and the classifier stay float32."""
    nncf = import_runtime("nncf")
    graph = read_onnx(import_runtime("openvino").Core(), onnx)
    with _NNCF_QUIET, _quiet(), _nncf_silenced():
        return nncf.quantize(graph, nncf.Dataset([x.contiguous().numpy() for x in batches]),
                             preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(batches),
                             ignored_scope=_nncf_ignored(nncf, graph))


def _nncf_ignored(nncf: object, graph: object) -> object:
    # NNCF's preset also quantizes the inputs of the BatchNorms, the residual adds and GELU's own arithmetic (top-1
    # agreement on held-out digits fell to 92%): every op but the blocks' 1x1 convolutions is ignored by name.
    ops = graph.get_ordered_ops()
    convolutions = [op for op in ops if op.get_type_name() == "Convolution"]
    quantized = {op.get_friendly_name() for op in convolutions[1:]}  # the first one is the patch embedding
    return nncf.IgnoredScope(names=[op.get_friendly_name() for op in ops if op.get_friendly_name() not in quantized],
                             validate=False)


# NNCF logs its progress and advice at INFO on its own stdout handler, draws progress bars on rich's shared
# console, which no log level reaches, and loads torch.utils.cpp_extension, which warns that no CUDA runtime is
# found (nothing here needs one): all are turned down for the quantization alone and put back after it, one
# quantization at a time so that a second one cannot save the first one's settings as the user's.
_NNCF_QUIET = threading.Lock()


@contextlib.contextmanager
def _nncf_silenced() -> Iterator[None]:
    import rich

    console = rich.get_console()
    quiet = console.quiet
    console.quiet = True
    try:
        with quiet_loggers(("nncf", *NNCF_IMPORT_WARNS)):
            yield
    finally:
        console.quiet = quiet

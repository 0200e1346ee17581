"""bf16 and int8 inference: :class:`LowPrecisionConvMixer`, what ``optimize_for_inference(precision=...)``
returns for ``"bf16"`` and ``"int8"``.

The race is :class:`.autotune.AutotunedConvMixer`'s, with each precision's candidates added beside the float32
paths, which are all incumbents: a low-precision path is chosen only where it beats the fastest float32 path by
the race's margin (among themselves the float32 paths, all exact, need none), so asking for a lower precision
never gives something slower than float32. Where float32 is kept, one INFO line says so and by how much. The race
always runs on the whole model (a copy cut to fewer blocks cannot be made of a quantized graph).

``calibration`` (input batches, or a DataLoader yielding images or (images, labels)) is read once and kept; it is
what int8 is calibrated on and what every low-precision path is measured on against float32.
"""
from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .autotune import AutotunedConvMixer, _Entry
from .fused import FusedConvMixerInference, bf16_convolutions
from .loader import load
from .precision import CalibrationReport, calibration_batches, check_precision, measure, native
from .quantize import (
    TorchBf16,
    TorchBf16Autocast,
    int8_backends,
    nncf_installed,
    onnx_int8_bytes,
    openvino_nncf_int8,
    torch_int8,
)
from .race import score
from .runtimes import OnnxRuntimeConvMixer, OpenVinoConvMixer, full_size, onnx_bytes

__all__ = ["LowPrecisionConvMixer", "one_runtime"]

logger = logging.getLogger("convmixer_timm")

_NO_NATIVE = {"bf16": "no native bf16", "int8": "no VNNI"}


class LowPrecisionConvMixer(AutotunedConvMixer):
    """:class:`.autotune.AutotunedConvMixer` racing ``precision``'s paths beside the float32 ones.

    bf16: the model with bf16 weights and activations (``bf16 channels_last``), the float32 model under CPU
    autocast (``bf16 autocast``), and OpenVINO with ``INFERENCE_PRECISION_HINT=bf16`` where ``runtimes`` has it
    and the CPU has native bf16 (elsewhere OpenVINO runs that hint in float32).
    int8 (needs ``calibration``): PyTorch's int8 models (FX graph mode, and PT2E with the x86 inductor quantizer
    where ``torchao`` is installed; per-channel weights), and the ONNX export quantized statically by onnxruntime
    (QDQ, per-channel weights) run by onnxruntime and OpenVINO, for the calibration images' size.

    ``calibration``: input batches (or a DataLoader yielding images or (images, labels)), read once. Every
    low-precision path is measured on them against the float32 model when it is built (:attr:`calibration_reports`,
    logged once each); :attr:`calibration_report` is the report of the path serving the last input.
    ``native_precision``: whether the CPU computes ``precision`` natively (default: :func:`.precision.native`);
    it decides whether OpenVINO's bf16 hint is a distinct path and what the log line says, never which path
    wins, which the race decides.
    """

    def __init__(self, model: nn.Module, precision: str, calibration: Iterable[object] | None = None,
                 native_precision: bool | None = None, **kwargs: object):
        check_precision(precision, calibration)
        if precision == "fp32":
            raise ValueError("LowPrecisionConvMixer is for precision 'bf16' or 'int8'; use AutotunedConvMixer")
        super().__init__(model, **kwargs)
        self.precision = precision
        self.native = native(precision) if native_precision is None else native_precision
        in_chans = self._arch.get("in_chans", 3)
        self.calibration = calibration_batches(calibration, int(in_chans)) if calibration is not None else None
        self.calibration_reports: dict[str, CalibrationReport] = {}
        self._reports_lock = threading.Lock()
        self._int8_onnx: dict[tuple, bytes] = {}
        self._nncf_models: dict[tuple, object] = {}
        self._nncf_lock = threading.Lock()
        self._last_name: str | None = None
        self._tuning = threading.local()
        self.lowp_torch: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        makers: dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]] = {
            "bf16 channels_last": functools.partial(TorchBf16, self.plain),
            "bf16 autocast": functools.partial(TorchBf16Autocast, self.plain_channels_last),
            **self._fused_bf16_makers(),
        } if precision == "bf16" else {f"int8 {backend}": functools.partial(
            torch_int8, self.plain, self.calibration, backend) for backend in int8_backends()}
        for name, make in makers.items():
            try:
                runner = make()
                self._report(name, runner)
            except Exception as error:  # one path fewer: the race still has the others and float32
                logger.warning("convmixer_timm: inference path %r left out: %s: %s", name, type(error).__name__,
                               error)
                continue
            self.lowp_torch[name] = runner
            if isinstance(runner, _FusedRun) and runner.fused not in self._packers:  # one module, two paths
                self._packers.append(runner.fused)
        # Every float32 path is an incumbent: a low-precision one must beat the fastest of them by the margin.
        self.incumbents = tuple(self.fp32_paths())
        self.eval()

    def _fused_bf16_makers(self) -> dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]]:
        """The fused module in bf16 (``bf16 conv+kernel``, ``bf16 mm+kernel``), where the CPU computes bf16
        natively: elsewhere oneDNN emulates or refuses bf16 and these paths would only lengthen the race."""
        if not (self.native and self.fused is not None and load() is not None):
            return {}
        fused = functools.cache(functools.partial(FusedConvMixerInference, self.plain, "mm", "kernel", "bf16"))
        pointwise = ("conv", "mm") if bf16_convolutions() else ("mm",)
        return {f"bf16 {pw}+kernel": functools.partial(_FusedRun, fused, pw) for pw in pointwise}

    # -- calibration

    def _report(self, name: str, runner: Callable[[torch.Tensor], torch.Tensor],
                image: Sequence[int] | None = None) -> None:
        """Measure ``runner`` on the calibration inputs once (where they have ``image``'s size) and log it."""
        batches = self.calibration
        if batches is None or (image is not None and tuple(image) != tuple(batches[0].shape[1:])):
            return
        with self._reports_lock:
            if name in self.calibration_reports:
                return
        report = measure(name, self.precision, self.plain, runner, batches)
        with self._reports_lock:
            if name in self.calibration_reports:
                return
            self.calibration_reports[name] = report
        logger.info("convmixer_timm: %s calibration: %s", self.precision, report)

    @property
    def calibration_report(self) -> CalibrationReport | None:
        """The calibration report of the path serving the last input or :meth:`tune` (None before either, where
        a float32 path was kept, or without calibration inputs)."""
        with self._reports_lock:
            return self.calibration_reports.get(self._last_name) if self._last_name else None

    # -- the paths

    def paths(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        names = super().paths()
        # PT2E's graph is exported for the calibration images' size (batch dynamic): it races at that size only.
        names.update({name: functools.partial(self.run_path, name) for name in self.lowp_torch
                      if name != "int8 pt2e" or self._calibrated_for_tuned_image()})
        return names

    def _calibrated_for_tuned_image(self) -> bool:
        image = getattr(self._tuning, "image", None)
        return bool(self.calibration) and (image is None or image == tuple(self.calibration[0].shape[1:]))

    def fp32_paths(self) -> list[str]:
        """The float32 paths on offer (the plain model first): every one is an incumbent of this module's races."""
        return [*AutotunedConvMixer.paths(self), *AutotunedConvMixer._foreign_builders(self)]

    def _run_torch_path(self, name: str, x: torch.Tensor, plain: nn.Module, plain_cl: nn.Module,
                        fused: nn.Module | None) -> torch.Tensor:
        runner = self.lowp_torch.get(name)
        if runner is not None:
            return runner(x)
        return AutotunedConvMixer._run_torch_path(name, x, plain, plain_cl, fused)

    def _foreign_builders(self) -> dict[str, Callable[[nn.Module, tuple[int, ...], bool], nn.Module]]:
        builders = super()._foreign_builders()
        hints = ("LATENCY", "THROUGHPUT")
        # OpenVINO's bf16 hint runs float32 where the CPU has no bf16: the same path as its float32 one.
        if self.precision == "bf16" and "openvino" in self.runtimes and self.native:
            for hint in hints:
                builders[f"openvino bf16 {hint.lower()}"] = functools.partial(self._openvino_lowp, hint, "bf16")
        if self.precision == "int8" and self._calibrated_for_tuned_image():  # the int8 ONNX model: that size only
            if "onnxruntime" in self.runtimes:
                builders["onnxruntime int8"] = self._onnxruntime_int8
                if "openvino" in self.runtimes:
                    for hint in hints:
                        builders[f"openvino int8 {hint.lower()}"] = functools.partial(
                            self._openvino_lowp, hint, "int8")
            if "openvino" in self.runtimes and nncf_installed():
                for hint in hints:
                    builders[f"openvino nncf int8 {hint.lower()}"] = functools.partial(
                        self._openvino_lowp, hint, "nncf int8")
        return builders

    def _onnx_int8(self, model: nn.Module, shape: tuple[int, ...]) -> bytes:
        image = tuple(shape[1:])
        calibrated = tuple(self.calibration[0].shape[1:])
        if image != calibrated:
            raise ValueError(f"the int8 ONNX model is calibrated for images {list(calibrated)}, not {list(image)}")
        with self._lock:
            onnx = self._int8_onnx.get(image)
        if onnx is None:
            onnx = onnx_int8_bytes(self._foreign.export(model, shape, True), self.calibration)
            with self._lock:
                self._int8_onnx[image] = onnx
        return onnx

    def _onnxruntime_int8(self, model: nn.Module, shape: tuple[int, ...], whole: bool) -> nn.Module:
        runner = OnnxRuntimeConvMixer(None, shape, onnx=self._onnx_int8(model, shape))
        self._report("onnxruntime int8", runner, shape[1:])
        return runner

    def _nncf_int8(self, model: nn.Module, shape: tuple[int, ...]) -> object:
        image = tuple(shape[1:])
        with self._nncf_lock:  # one quantization per image size, whichever thread asks first
            graph = self._nncf_models.get(image)
            if graph is None:
                graph = self._nncf_models[image] = openvino_nncf_int8(self._foreign.export(model, shape, True),
                                                                      self.calibration)
        return graph

    def _openvino_lowp(self, hint: str, precision: str, model: nn.Module, shape: tuple[int, ...],
                       whole: bool) -> nn.Module:
        """OpenVINO at ``precision``: ``"bf16"`` (its hint on the float32 export), ``"int8"`` (the QDQ export) or
        ``"nncf int8"`` (the export quantized by NNCF)."""
        if precision == "nncf int8":
            source = {"graph": self._nncf_int8(model, shape)}
        else:
            source = {"onnx": self._onnx_int8(model, shape) if precision == "int8"
                      else self._foreign.export(model, shape, whole)}
        runner = self._foreign.openvino(hint, shape, "bf16" if precision == "bf16" else "f32", **source)
        self._report(f"openvino {precision} {hint.lower()}", _Batched(runner), shape[1:])
        return runner

    # -- choosing

    def _proxy_depth(self, x: torch.Tensor) -> int | None:
        return None

    def _disk_key(self, x: torch.Tensor, candidates: Sequence[str]) -> dict[str, object]:
        return {**super()._disk_key(x, candidates), "precision": self.precision}

    def _tune(self, x: torch.Tensor, previous: _Entry | None = None) -> _Entry:
        self._tuning.image = tuple(x.shape[1:])  # which builders are on offer (threads tune other keys meanwhile)
        try:
            entry = super()._tune(x, previous)
        finally:
            self._tuning.image = None
        result = self.last_race.get(self._key(x)) if entry.source == "timed" else None
        if result is not None and entry.name in self.fp32_paths():
            scores = {name: score(times) for name, times in result.times.items() if name not in result.dropped}
            lowp = {name: s for name, s in scores.items() if name not in self.fp32_paths()}
            why = "" if self.native else f" ({_NO_NATIVE[self.precision]})"
            if lowp and scores.get(entry.name):
                best = min(lowp, key=lowp.get)
                ratio = lowp[best] / scores[entry.name]
                how = (f"{ratio:.2f}x faster than the best {self.precision} path ({best})" if ratio >= 1 else
                       f"the best {self.precision} path ({best}) was {100 * (1 / ratio - 1):.1f}% faster, inside "
                       f"the race's {100 * self.margin:.0f}% margin")
                logger.info("convmixer_timm: %s requested; fp32 kept for input %s: %s on this CPU%s",
                            self.precision, list(x.shape), how, why)
            else:
                logger.info("convmixer_timm: %s requested; fp32 kept for input %s: every %s path was far behind "
                            "or failed%s", self.precision, list(x.shape), self.precision, why)
        return entry

    def tune(self, x: torch.Tensor) -> str:
        self._last_name = super().tune(x)
        return self._last_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        with self._lock:
            entry = self._entries.get(self._key(x))
        self._last_name = entry.name if entry is not None else None
        return out


class _FusedRun:
    """One implementation of the bf16 fused module (one module, built with the first, serves both)."""

    def __init__(self, fused: Callable[[], FusedConvMixerInference], pointwise: str):
        self.fused, self.pointwise = fused(), pointwise

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.run(x, self.pointwise, "kernel")


class _Batched:
    """A runner compiled for one batch bucket, called on calibration batches of any size: in parts of the
    bucket's smallest batch, the last part padded with repeated images whose outputs are dropped."""

    def __init__(self, runner: OpenVinoConvMixer):
        self.runner = runner

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.runner.batches
        if low <= x.shape[0] <= high:
            return self.runner(x)
        count = x.shape[0]
        padded = torch.cat([x, x[:1].expand(-(-count // low) * low - count, *x.shape[1:])])
        return torch.cat([self.runner(part) for part in padded.split(low)])[:count]


def one_runtime(model: nn.Module, input_size: Sequence[int], backend: str, precision: str,
                calibration: Iterable[object] | None) -> nn.Module:
    """``backend="onnxruntime"`` or ``"openvino"``: that runtime alone at ``precision``."""
    size = full_size(input_size)
    if precision == "bf16":
        if backend == "onnxruntime":
            raise ValueError("onnxruntime has no bf16 CPU path: use backend='openvino', 'torch' or 'auto' for bf16")
        return OpenVinoConvMixer(model, size, precision="bf16")
    batches = calibration_batches(calibration, int(size[1]))
    if tuple(batches[0].shape[1:]) != size[1:]:
        raise ValueError(f"calibration images are {list(batches[0].shape[1:])} but input_size is {list(size)}: "
                         "calibrate on inputs of the size the model will see")
    onnx = onnx_int8_bytes(onnx_bytes(model, size), batches)
    if backend == "onnxruntime":
        return OnnxRuntimeConvMixer(None, size, onnx=onnx)
    return OpenVinoConvMixer(None, size, onnx=onnx)

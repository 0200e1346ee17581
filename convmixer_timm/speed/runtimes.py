"""The optional inference runtimes: onnxruntime and OpenVINO (CPU, float32) on the model's ONNX export.

Both are imported only here, through :func:`import_runtime`, which keeps their telemetry out of the user's home
folder when the import is ours: ``import onnxruntime`` writes a device id and an event database to
``~/.cache/Microsoft/DeveloperTools/.onnxruntime`` unless ``ORT_DISABLE_TELEMETRY=1``, and ``import openvino``
writes a Google Analytics client id and usage counts to ``~/intel`` (and sends an import event) unless a consent
file there declines or a CI marker (``CI=true``) is set. Each switch is set for the import alone and then put
back as it was; a runtime the program imported itself is left as the program set it up.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from .race import batch_bucket

__all__ = ["RUNTIMES", "OnnxRuntimeConvMixer", "OpenVinoConvMixer", "RaceRuntimes", "import_runtime",
           "installed_runtimes", "onnx_bytes"]

RUNTIMES = ("onnxruntime", "openvino")

# Read once, while the runtime is imported (checked: neither reads it again later).
_TELEMETRY_OFF = {"onnxruntime": {"ORT_DISABLE_TELEMETRY": "1"}, "openvino": {"CI": "true"},
                  # NNCF's own switch, and openvino_telemetry's in case NNCF is the first to import it (the
                  # telemetry object is one per process, set up by the first import).
                  "nncf": {"NNCF_CI": "1", "CI": "true"}}
_IMPORTING = threading.Lock()  # os.environ is process-wide: one import with a switch set at a time


def installed_runtimes() -> tuple[str, ...]:
    """The optional inference runtimes importable here (the ``onnx`` and ``openvino`` extras)."""
    import importlib.util

    return tuple(name for name in RUNTIMES if importlib.util.find_spec(name) is not None)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def import_runtime(name: str) -> ModuleType:
    """``import name`` (one of :data:`RUNTIMES`) with its telemetry switched off, where this is its first import."""
    if name in sys.modules:
        return sys.modules[name]
    with _IMPORTING:
        if name in sys.modules:
            return sys.modules[name]
        with _environment(_TELEMETRY_OFF.get(name, {})), quiet_loggers(_QUIET_ON_IMPORT.get(name, ())):
            return importlib.import_module(name)


# NNCF loads torch.utils.cpp_extension (on import or first use), which warns that no CUDA runtime is found:
# nothing here needs one.
NNCF_IMPORT_WARNS = ("torch.utils.cpp_extension",)
_QUIET_ON_IMPORT = {"nncf": NNCF_IMPORT_WARNS}


@contextlib.contextmanager
def quiet_loggers(names: Sequence[str]) -> Iterator[None]:
    """The named loggers at ERROR inside the block, at their own levels again after it."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def onnx_bytes(model: nn.Module, input_size: Sequence[int]) -> bytes:
    """The model's ONNX export (dynamic batch), as bytes: one export serves every batch size of an image size."""
    from ..export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:  # private to this process, removed on return
        return export_onnx(model, Path(tmp) / "model.onnx", input_size).read_bytes()


def read_onnx(core: object, onnx: bytes) -> object:
    """The ``openvino.Model`` of an ONNX export given as bytes, read by ``core`` (an ``openvino.Core``)."""
    with tempfile.TemporaryDirectory() as tmp:  # private to this process, removed on return
        path = Path(tmp) / "model.onnx"
        path.write_bytes(onnx)
        return core.read_model(str(path))


def full_size(input_size: Sequence[int]) -> tuple[int, ...]:
    """``(N, C, H, W)`` from ``(N, C, H, W)`` or ``(C, H, W)`` (batch 1)."""
    size = tuple(int(s) for s in input_size)
    return (1, *size) if len(size) == 3 else size


class OnnxRuntimeConvMixer(nn.Module):
    """Eval-only wrapper running the model's ONNX export in onnxruntime (CPU); build it with
    :func:`optimize_for_inference` and ``backend="onnxruntime"``. Batch size is free, the image size is the one
    it was built for. Outputs are CPU float32 tensors without autograd history. ``onnx``: an export already made
    (:func:`onnx_bytes`), so that one export serves several modules."""

    def __init__(self, model: nn.Module | None, input_size: Sequence[int], threads: int | None = None,
                 onnx: bytes | None = None):
        super().__init__()
        ort = import_runtime("onnxruntime")
        exported = onnx if onnx is not None else onnx_bytes(model, input_size)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        # Idle onnxruntime threads spin by default, which starves PyTorch work in the same process.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(exported, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # InferenceSession.run is thread-safe: one session serves concurrent calls of every batch size.
        x = x.detach().to("cpu", torch.float32).contiguous()
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])


class OpenVinoConvMixer(nn.Module):
    """Eval-only wrapper running the model's ONNX export in OpenVINO on the CPU, in float32
    (``INFERENCE_PRECISION_HINT=f32``). ``hint="LATENCY"`` runs the batch as one request; ``"THROUGHPUT"`` splits
    it over OpenVINO's streams and ``requests`` infer requests (default: the number OpenVINO calls optimal, which
    costs one more compilation to learn). Needs the ``openvino`` extra. Calls are serialized (one request queue),
    so the module can be shared by threads.

    Compiled for ``input_size`` alone (a static shape, OpenVINO's fastest), or, with ``batches=(low, high)``, for
    every batch size in that range with the image size of ``input_size`` (one compilation serves a batch bucket).
    ``precision``: OpenVINO's ``INFERENCE_PRECISION_HINT`` (``"bf16"`` runs in bf16 where the CPU has it; OpenVINO
    stays in float32 where it does not). ``graph``: an ``openvino.Model`` to compile (a copy) instead of an ONNX
    export (an NNCF-quantized one)."""

    def __init__(self, model: nn.Module | None, input_size: Sequence[int], hint: str = "LATENCY",
                 threads: int | None = None, onnx: bytes | None = None, requests: int | None = None,
                 batches: tuple[int, int] | None = None, precision: str = "f32", graph: object | None = None):
        super().__init__()
        ov = import_runtime("openvino")
        self.input_size = full_size(input_size)
        low, high = batches if batches is not None else (self.input_size[0],) * 2
        if not 1 <= low <= self.input_size[0] <= high:
            raise ValueError(f"batches {batches} must hold the batch size of input_size {list(self.input_size)}")
        self.batches = (int(low), int(high))
        self.hint = hint.upper()
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": self.hint,
                  "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
        core = ov.Core()
        if graph is not None:
            graph = graph.clone()  # reshaped below
        else:
            graph = read_onnx(core, onnx if onnx is not None else onnx_bytes(model, self.input_size))
        jobs = 1
        if self.hint == "THROUGHPUT":
            if requests is None:
                probe = core.compile_model(graph, "CPU", config)
                requests = int(probe.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
                del probe
            jobs = max(1, min(self.input_size[0], int(requests)))
        self.requests = jobs
        self.sizes = self._split(self.input_size[0])
        image = list(self.input_size[1:])
        if low == high and len(set(self.sizes)) == 1:  # equal parts of one batch size: a static shape
            graph.reshape({graph.inputs[0]: [self.sizes[0], *image]})
        else:  # a bounded batch axis: OpenVINO sizes its buffers for the largest part
            largest_part = -(-high // min(jobs, high))
            graph.reshape({graph.inputs[0]: ov.PartialShape([ov.Dimension(1, largest_part), *image])})
        self.compiled = core.compile_model(graph, "CPU", config)
        self.queue = ov.AsyncInferQueue(self.compiled, jobs)
        self.results: list = [None] * jobs
        self._lock = threading.Lock()  # the queue and its result slots are one call's state
        results = self.results
        # The callback holds the list, not the module: no reference cycle, so a module that loses the choice is
        # freed at once, with OpenVINO's threads (live compiled models slowed PyTorch's paths by ~20% here).
        self.queue.set_callback(lambda request, index: results.__setitem__(
            index, request.get_output_tensor(0).data.copy()))
        self.eval()

    def _split(self, batch: int) -> list[int]:
        jobs = min(batch, self.requests)
        return [batch // jobs + (i < batch % jobs) for i in range(jobs)]  # numpy.array_split's sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.batches
        if tuple(x.shape[1:]) != self.input_size[1:] or not low <= x.shape[0] <= high:
            image = ", ".join(map(str, self.input_size[1:]))
            expected = list(self.input_size) if low == high else f"[{low}..{high}, {image}]"
            raise ValueError(f"this OpenVINO model is compiled for input {expected}, got {list(x.shape)}")
        sizes = self.sizes if x.shape[0] == self.input_size[0] else self._split(x.shape[0])
        parts = x.detach().to("cpu", torch.float32).contiguous().split(sizes)
        with self._lock:
            for index, part in enumerate(parts):
                self.queue.start_async({0: part.numpy()}, index)
            self.queue.wait_all()
            return torch.cat([torch.from_numpy(r) for r in self.results[: len(parts)]])


class RaceRuntimes:
    """The runners of one :class:`.autotune.AutotunedConvMixer`'s foreign paths, and what they share.

    The ONNX export is made once per (depth, image size), the batch axis being dynamic, and serves every runtime:
    the whole model's is kept for the next batch size (for two image sizes at most, each as large as the
    weights), a cut copy's until :meth:`drop_proxies` after its race. One onnxruntime session per image size
    serves every batch size while a choice uses it. OpenVINO THROUGHPUT's number of infer requests takes a
    compilation to learn: it is learnt once per (batch bucket, image size), on the copy or from the choice cache,
    so the whole model compiles once (:attr:`openvino_requests`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._onnx: OrderedDict[tuple, bytes] = OrderedDict()
        self._sessions: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.openvino_requests: dict[tuple, int] = {}  # ((low, high), image) -> requests

    def export(self, model: nn.Module, shape: tuple[int, ...], whole: bool) -> bytes:
        """``model``'s ONNX export for images of ``shape``; ``whole``: whether it is the whole model."""
        key = (len(model.blocks) if hasattr(model, "blocks") else None, whole, *shape[1:])
        with self._lock:
            onnx = self._onnx.get(key)
        if onnx is None:
            onnx = onnx_bytes(model, shape)
            with self._lock:
                self._onnx[key] = onnx
                while sum(whole for _, whole, *_ in self._onnx) > 2:
                    self._onnx.pop(next(k for k in self._onnx if k[1]))
        return onnx

    def drop_proxies(self) -> None:
        """Forget the exports of cut copies (their race is over)."""
        with self._lock:
            for key in [k for k in self._onnx if not k[1]]:
                del self._onnx[key]

    def onnxruntime(self, model: nn.Module, shape: tuple[int, ...], whole: bool) -> OnnxRuntimeConvMixer:
        """onnxruntime on ``model``'s export: the image size's shared session where ``model`` is the whole one."""
        if not whole:
            return OnnxRuntimeConvMixer(None, shape, onnx=self.export(model, shape, whole))
        session = self._sessions.get(tuple(shape[1:]))
        if session is None:
            session = OnnxRuntimeConvMixer(None, shape, onnx=self.export(model, shape, whole))
            self._sessions[tuple(shape[1:])] = session
        return session

    def openvino(self, hint: str, shape: tuple[int, ...], precision: str = "f32", **source: object
                 ) -> OpenVinoConvMixer:
        """OpenVINO compiled for ``shape``'s batch bucket at ``precision`` (its hint), from ``source``:
        ``onnx=`` bytes or ``graph=`` (:class:`OpenVinoConvMixer`'s arguments)."""
        bucket = (batch_bucket(shape[0]), tuple(shape[1:]))
        requests = self.openvino_requests.get(bucket) if hint == "THROUGHPUT" else None
        runner = OpenVinoConvMixer(None, shape, hint, requests=requests, batches=bucket[0], precision=precision,
                                   **source)
        if hint == "THROUGHPUT":
            self.openvino_requests[bucket] = runner.requests
        return runner

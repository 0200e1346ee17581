"""Exact, faster CPU inference for ConvMixer: :func:`optimize_for_inference`.

What the optimized module does differently from the eval-mode model, all exact up to float32 rounding:

* channels_last everywhere, with oneDNN's fused convolution + activation (``mkldnn._convolution_pointwise``) for
  the stem, the depthwise and (where measured faster) the pointwise convolutions, so activations never take a
  pass of their own;
* the BatchNorm after the depthwise branch is ``x + s1 * act(.) + t1``: the shift ``t1`` is constant across
  space, so it folds into the next 1x1 convolution's bias (``W @ t1``), and the scale goes into one in-place
  ``addcmul`` that also does the residual add;
* the BatchNorm after each pointwise convolution cannot fold into the next depthwise convolution, because that
  convolution zero-pads its input and ``s * 0 + t != 0`` on the border; it is one in-place affine pass instead.
  The last one folds into the classifier, since global average pooling commutes with a per-channel affine map;
* even kernels (k=8) use the symmetric padding k//2 and drop the first output row and column, which equals
  PyTorch's ``padding="same"`` (3 before, 4 after) without an ``F.pad`` copy;
* intermediate results are written into tensors the module already holds where an op allows it: on CPU a fresh
  large tensor costs page faults that, for the CIFAR shapes, take as long as the arithmetic.

Anything the fused path does not cover (another activation, pooling type, device or dtype) runs as a copy of
the model in eval mode, so the function is always safe to call. Which path runs is measured per input shape on
the machine where it runs (:class:`AutotunedConvMixer`), in a short race that stops once a path is clearly
ahead, on a copy cut to two blocks where a call is large, and remembered across processes in the user's cache
(:class:`ChoiceCache`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .loader import kernel_info, load
from .mixing import spatial_mixing

__all__ = [
    "RUNTIMES", "AutotunedConvMixer", "ChoiceCache", "FusedConvMixerInference", "OnnxRuntimeConvMixer",
    "OpenVinoConvMixer", "RaceResult", "cache_dir", "installed_runtimes", "optimize_for_inference", "race",
    "select_fastest",
]

logger = logging.getLogger("convmixer_timm")

_ACTS = ("gelu", "relu")


def _act_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else None
    # timm's own GELU (``timm.layers.GELU``) calls F.gelu with the exact erf form.
    if type(module).__name__ == "GELU" and type(module).__module__.startswith("timm.") and \
            getattr(module, "approximate", "none") == "none":
        return "gelu"
    return None


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    # Folding in float64 keeps the folded weights as close to the unfolded arithmetic as float32 allows.
    var = bn.running_var.double()
    scale = bn.weight.double() / torch.sqrt(var + bn.eps) if bn.affine else 1.0 / torch.sqrt(var + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        shift = shift + bn.bias.double()
    return scale, shift


def _supported(model: nn.Module) -> bool:
    try:
        stem, blocks = model.stem, model.blocks
        acts = [_act_kind(stem[1])]
        for blk in blocks:
            acts += [_act_kind(blk[0].fn[1]), _act_kind(blk[2])]
            if not isinstance(getattr(blk[0], "drop_path", nn.Identity()), nn.Identity) and model.training:
                return False
        bns = [stem[2]] + [m for blk in blocks for m in (blk[0].fn[2], blk[3])]
        pool_ok = getattr(model.global_pool, "pool_type", None) == "avg" and model.global_pool.flatten is not None
    except (AttributeError, IndexError, TypeError):
        return False
    param = next(model.parameters(), None)
    return (
        param is not None and param.device.type == "cpu" and param.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and len(set(acts)) == 1 and acts[0] in _ACTS
        and all(isinstance(b, nn.BatchNorm2d) and b.track_running_stats and b.running_var is not None for b in bns)
        and pool_ok and isinstance(model.head, (nn.Linear, nn.Identity))
    )


class _Block(nn.Module):
    def __init__(self, blk: nn.Module):
        super().__init__()
        dw, pw = blk[0].fn[0], blk[1]
        s1, t1 = _bn_affine(blk[0].fn[2])
        s2, t2 = _bn_affine(blk[3])
        dim = pw.weight.shape[0]
        self.kernel_size = int(dw.weight.shape[-1])
        w = pw.weight.detach().double().reshape(dim, dim)
        b = pw.bias.detach().double() if pw.bias is not None else torch.zeros(dim, dtype=torch.float64)
        self.register_buffer("dw_w", dw.weight.detach().float().contiguous())
        self.register_buffer("dw_w_kkc", dw.weight.detach().float()[:, 0].permute(1, 2, 0).contiguous())
        self.register_buffer("dw_b", dw.bias.detach().float().clone() if dw.bias is not None else torch.zeros(dim))
        self.register_buffer("s1", s1.float().view(1, dim, 1, 1))
        self.register_buffer("pw_w", w.float().view(dim, dim, 1, 1).contiguous())
        self.register_buffer("pw_wt", w.t().float().contiguous())
        self.register_buffer("pw_b", (b + w @ t1).float())
        self.register_buffer("s2", s2.float().view(1, dim, 1, 1))
        self.register_buffer("t2", t2.float().view(1, dim, 1, 1))


class FusedConvMixerInference(nn.Module):
    """Eval-only ConvMixer with BatchNorm folded and fused kernels; build it with :func:`optimize_for_inference`.

    ``pointwise`` is ``"conv"`` (oneDNN 1x1 convolution with the activation fused) or ``"mm"`` (``addmm`` written
    straight into a held tensor, then the activation in place). ``depthwise`` is ``"kernel"`` (the compiled
    spatial-mixing kernel: depthwise conv, activation, both BatchNorm affines and the residual in one pass,
    ``convmixer_timm.speed.spatial_mixing``) or ``"onednn"`` (oneDNN's depthwise conv with the activation fused,
    then the affine passes); ``None`` takes the kernel where it is built."""

    def __init__(self, model: nn.Module, pointwise: str = "conv", depthwise: str | None = None):
        super().__init__()
        if pointwise not in ("conv", "mm"):
            raise ValueError(f"pointwise must be 'conv' or 'mm', got {pointwise!r}")
        if depthwise is None:
            depthwise = "kernel" if load() is not None else "onednn"
        if depthwise not in ("kernel", "onednn"):
            raise ValueError(f"depthwise must be 'kernel' or 'onednn', got {depthwise!r}")
        if depthwise == "kernel" and load() is None:
            raise RuntimeError("depthwise='kernel' needs the compiled kernels (a C++ compiler); use 'onednn'")
        self.pointwise = pointwise
        self.depthwise = depthwise
        self.act = _act_kind(model.stem[1])
        stem_conv = model.stem[0]
        self.patch_size = int(stem_conv.stride[0])
        self.in_chans = int(stem_conv.weight.shape[1])
        self.register_buffer("stem_w", stem_conv.weight.detach().float().contiguous())
        self.register_buffer("stem_b", stem_conv.bias.detach().float().clone())
        s0, t0 = _bn_affine(model.stem[2])
        dim = stem_conv.weight.shape[0]
        self.register_buffer("stem_s", s0.float().view(1, dim, 1, 1))
        self.register_buffer("stem_t", t0.float().view(1, dim, 1, 1))
        self.blocks = nn.ModuleList(_Block(blk) for blk in model.blocks)
        # avg-pool(s * u + t) = s * avg-pool(u) + t, so the last BatchNorm folds into the classifier.
        head = model.head
        if len(self.blocks):
            s_last, t_last = _bn_affine(model.blocks[-1][3])
        else:
            s_last, t_last = s0, t0
        self.has_head = isinstance(head, nn.Linear)
        if self.has_head:
            hw = head.weight.detach().double()
            hb = head.bias.detach().double() if head.bias is not None else torch.zeros(hw.shape[0], dtype=hw.dtype)
            self.register_buffer("head_w", (hw * s_last).float())
            self.register_buffer("head_b", (hb + hw @ t_last).float())
        else:
            self.register_buffer("head_w", s_last.float())
            self.register_buffer("head_b", t_last.float())
        # oneDNN wants weights in a blocked layout that depends on the input shape; reordering them once per
        # shape instead of on every call saves 10-25% of each convolution (measured on the 1x1 convolutions).
        self._packed: dict[tuple, list[torch.Tensor | None]] = {}
        self.eval()

    def _packed_weights(self, x: torch.Tensor, grid: tuple[int, int], depthwise: str) -> list[torch.Tensor | None]:
        # [stem, then per block: depthwise (None where the compiled kernel reads dw_w_kkc instead), pointwise]
        key = (*x.shape, depthwise)
        packed = self._packed.get(key)
        if packed is None:
            if len(self._packed) >= 8:  # many input shapes: keep memory bounded
                self._packed.clear()
            reorder = torch.ops.mkldnn._reorder_convolution_weight
            n = x.shape[0]
            dim = self.stem_w.shape[0]
            p = self.patch_size
            inner = [n, dim, *grid]
            packed: list[torch.Tensor | None] = [reorder(self.stem_w, [0, 0], [p, p], [1, 1], 1, list(x.shape))]
            for blk in self.blocks:
                k = blk.kernel_size
                onednn = depthwise == "onednn"
                packed.append(reorder(blk.dw_w, [k // 2, k // 2], [1, 1], [1, 1], dim, inner) if onednn else None)
                packed.append(reorder(blk.pw_w, [0, 0], [1, 1], [1, 1], 1, inner))
            self._packed[key] = packed
        return packed

    def release(self, shape: Sequence[int]) -> None:
        """Drop the weights packed for inputs of ``shape`` (every depthwise implementation)."""
        for key in [key for key in list(self._packed) if tuple(key[:-1]) == tuple(shape)]:  # list(): threads
            self._packed.pop(key, None)

    def _apply(self, fn, recurse=True):  # .to()/.float() etc. invalidate the packed copies
        self._packed = {}
        return super()._apply(fn, recurse)

    def _conv_act(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, padding: int, stride: int,
                  groups: int) -> torch.Tensor:
        scalars: list = [None] if self.act == "gelu" else []
        algorithm = "none" if self.act == "gelu" else ""
        return torch.ops.mkldnn._convolution_pointwise(
            x, w, b, [padding, padding], [stride, stride], [1, 1], groups, self.act, scalars, algorithm)

    def _pointwise(self, z: torch.Tensor, y: torch.Tensor, blk: _Block, packed_w: torch.Tensor,
                   pointwise: str) -> torch.Tensor:
        if pointwise == "mm":
            # y is dead once z exists, so the matmul writes into its memory: no fresh tensor.
            dim = y.shape[1]
            y2 = y.permute(0, 2, 3, 1).reshape(-1, dim)
            torch.addmm(blk.pw_b, z.permute(0, 2, 3, 1).reshape(-1, dim), blk.pw_wt, out=y2)
            return y.relu_() if self.act == "relu" else torch._C._nn.gelu_(y)
        return self._conv_act(z, packed_w, blk.pw_b, 0, 1, 1)

    def _blocks_with_onednn(self, y: torch.Tensor, packed: list[torch.Tensor | None], pointwise: str) -> torch.Tensor:
        torch.addcmul(self.stem_t, y, self.stem_s, out=y)
        dim = y.shape[1]
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            k = blk.kernel_size
            g = self._conv_act(y, packed[2 * i + 1], blk.dw_b, k // 2, 1, dim)
            if k % 2:
                z = torch.addcmul(y, g, blk.s1, out=g)
            else:
                # Symmetric padding k//2 gives one extra row and column; dropping the first ones is
                # "same" padding with (k-1)//2 before and k//2 after.
                z = torch.addcmul(y, g[:, :, 1:, 1:], blk.s1)
                z = z.contiguous(memory_format=torch.channels_last)
            u = self._pointwise(z, y, blk, packed[2 * i + 2], pointwise)
            y = u if i == last else torch.addcmul(blk.t2, u, blk.s2, out=u)
        return y

    def _blocks_with_mixing_kernel(self, u: torch.Tensor, packed: list[torch.Tensor | None],
                                   pointwise: str) -> torch.Tensor:
        # u is each layer's activation before its BatchNorm: the kernel applies that affine as it reads u.
        s_in, t_in = self.stem_s.view(-1), self.stem_t.view(-1)
        for i, blk in enumerate(self.blocks):
            z = spatial_mixing(u, s_in, t_in, blk.dw_w_kkc, blk.dw_b, blk.s1.view(-1), self.act)
            u = self._pointwise(z, u, blk, packed[2 * i + 2], pointwise)
            s_in, t_in = blk.s2.view(-1), blk.t2.view(-1)
        return u  # the last BatchNorm is folded into the head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, self.pointwise, self.depthwise)

    def run(self, x: torch.Tensor, pointwise: str, depthwise: str) -> torch.Tensor:
        """The forward pass with the given implementations (see the class docstring)."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (N, {self.in_chans}, H, W), got {list(x.shape)}")
        with torch.no_grad():
            x = x.float().contiguous(memory_format=torch.channels_last)
            p = self.patch_size
            if x.shape[-1] % p or x.shape[-2] % p:
                # A stride-p convolution ignores the remainder; cropping keeps oneDNN on its fast path.
                x = x[..., : x.shape[-2] // p * p, : x.shape[-1] // p * p].contiguous(
                    memory_format=torch.channels_last)
            packed = self._packed_weights(x, (x.shape[-2] // p, x.shape[-1] // p), depthwise)
            y = self._conv_act(x, packed[0], self.stem_b, 0, p, 1)
            if depthwise == "kernel":
                y = self._blocks_with_mixing_kernel(y, packed, pointwise)
            else:
                y = self._blocks_with_onednn(y, packed, pointwise)
            pooled = y.mean((2, 3))
            if self.has_head:
                return torch.addmm(self.head_b, pooled, self.head_w.t())
            return torch.addcmul(self.head_b, pooled, self.head_w.view(1, -1))


def _onnx_bytes(model: nn.Module, input_size: Sequence[int]) -> bytes:
    """The model's ONNX export (dynamic batch), as bytes: one export serves every batch size of an image size."""
    from ..export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:  # private to this process, removed on return
        return export_onnx(model, Path(tmp) / "model.onnx", input_size).read_bytes()


class OnnxRuntimeConvMixer(nn.Module):
    """Eval-only wrapper running the model's ONNX export in onnxruntime (CPU); build it with
    :func:`optimize_for_inference` and ``backend="onnxruntime"``. Batch size is free, the image size is the one
    it was built for. Outputs are CPU float32 tensors without autograd history. ``onnx``: an export already made
    (:func:`convmixer_timm.export_onnx`'s bytes), so that one export serves several modules."""

    def __init__(self, model: nn.Module | None, input_size: Sequence[int], threads: int | None = None,
                 onnx: bytes | None = None):
        super().__init__()
        import onnxruntime as ort

        onnx_bytes = onnx if onnx is not None else _onnx_bytes(model, input_size)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        # Idle onnxruntime threads spin by default, which starves PyTorch work in the same process.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # InferenceSession.run is thread-safe: one session serves concurrent calls of every batch size.
        x = x.detach().to("cpu", torch.float32).contiguous()
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])


class OpenVinoConvMixer(nn.Module):
    """Eval-only wrapper running the model's ONNX export in OpenVINO on the CPU, in float32
    (``INFERENCE_PRECISION_HINT=f32``), compiled for one input shape. ``hint="LATENCY"`` runs the batch as one
    request; ``"THROUGHPUT"`` splits it over OpenVINO's streams and ``requests`` infer requests (default: the
    number OpenVINO calls optimal, which costs one more compilation to learn). Needs the ``openvino`` extra.
    Calls are serialized (one request queue), so the module can be shared by threads."""

    def __init__(self, model: nn.Module | None, input_size: Sequence[int], hint: str = "LATENCY",
                 threads: int | None = None, onnx: bytes | None = None, requests: int | None = None):
        super().__init__()
        import numpy as np
        import openvino as ov

        self.input_size = _full_size(input_size)
        self.hint = hint.upper()
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": self.hint,
                  "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
        core = ov.Core()
        onnx_bytes = onnx if onnx is not None else _onnx_bytes(model, self.input_size)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(onnx_bytes)
            graph = core.read_model(str(path))
        batch = self.input_size[0]
        jobs = 1
        if self.hint == "THROUGHPUT":
            if requests is None:
                probe = core.compile_model(graph, "CPU", config)
                requests = int(probe.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
                del probe
            jobs = max(1, min(batch, int(requests)))
        self.requests = jobs
        self.sizes = [len(part) for part in np.array_split(np.arange(batch), jobs)]
        if len(set(self.sizes)) == 1:  # equal parts: a static shape, OpenVINO's fastest
            graph.reshape({graph.inputs[0]: [self.sizes[0], *self.input_size[1:]]})
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.input_size:
            raise ValueError(f"this OpenVINO model is compiled for input {list(self.input_size)}, got {list(x.shape)}")
        parts = x.detach().to("cpu", torch.float32).contiguous().split(self.sizes)
        with self._lock:
            for index, part in enumerate(parts):
                self.queue.start_async({0: part.numpy()}, index)
            self.queue.wait_all()
            return torch.cat([torch.from_numpy(r) for r in self.results])


RUNTIMES = ("onnxruntime", "openvino")
_FOREIGN_PATHS = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino latency", "openvino throughput")}


def installed_runtimes() -> tuple[str, ...]:
    """The optional inference runtimes importable here (the ``onnx`` and ``openvino`` extras)."""
    import importlib.util

    return tuple(name for name in RUNTIMES if importlib.util.find_spec(name) is not None)


def _full_size(input_size: Sequence[int]) -> tuple[int, ...]:
    size = tuple(int(s) for s in input_size)
    return (1, *size) if len(size) == 3 else size


Clock = Callable[[], float]


def select_fastest(candidates: Mapping[str, Callable[[], object]], clock: Clock = time.perf_counter,
                   rounds: int = 5, margin: float = 0.03) -> str:
    """The candidate with the lowest median time over interleaved rounds (machine load hits all alike).

    The first candidate is the incumbent: another must beat its median by more than ``margin`` to be picked, so
    timing noise cannot trade what is being replaced for something slower in steady use. ``clock`` is injected
    so the choice can be tested without timing anything. Every candidate runs every round; :func:`race` is the
    shorter contest :class:`AutotunedConvMixer` runs.
    """
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for run in candidates.values():
        run()  # first call: oneDNN primitive creation, weight reorders, onnxruntime arena growth
    for _ in range(rounds):
        for name, run in candidates.items():
            start = clock()
            run()
            times[name].append(clock() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    incumbent = next(iter(candidates))
    best = min(medians, key=medians.get)
    return best if medians[best] < medians[incumbent] * (1.0 - margin) else incumbent


def _score(times: Sequence[float]) -> float:
    # The mean of the faster half: another process's load only ever adds time, so the slow samples say more
    # about the machine than about the path, and a single lucky sample is not trusted alone either.
    low = sorted(times)[: max(1, len(times) // 2)]
    return sum(low) / len(low)


@dataclasses.dataclass
class RaceResult:
    """What :func:`race` decided: the winner, each candidate's timed calls, and why any were dropped."""

    choice: str
    times: dict[str, list[float]]
    dropped: dict[str, str]


def race(candidates: Mapping[str, Callable[[], object]], clock: Clock = time.perf_counter, rounds: int = 5,
         min_rounds: int = 2, margin: float = 0.03, drop_ratio: float = 1.2,
         incumbents: Sequence[str] | None = None, warmup_drop_ratio: float | None = 2.5,
         settle: float = 0.0, settle_before: Collection[str] = ()) -> RaceResult:
    """Interleaved rounds that stop early: the contest behind each of :class:`AutotunedConvMixer`'s choices.

    One warm-up call each (a candidate more than ``warmup_drop_ratio`` times slower than the fastest first call
    is out at once; ``None`` keeps all), then rounds of one timed call per candidate, in an order rotated every
    round (so no path always runs right after the same neighbour). From round ``min_rounds`` on, a candidate whose
    fastest call is more than ``drop_ratio`` times the leader's score is out, and the race ends when one is
    left (once it has run ``min_rounds`` timed calls) or after ``rounds``. A candidate that raises is out too, with
    a warning, unless it is the first incumbent: the reference model itself refusing the input is the caller's
    error and is raised; where every other path failed, the reference is the answer. Scores are
    the mean of each candidate's faster half of calls. The winner must beat the best incumbent (``incumbents``,
    default the first candidate) by ``margin`` to be chosen, so timing noise does not replace the reference
    path with one that is no faster. ``settle`` seconds pass (untimed) before each call of a candidate in
    ``settle_before``, so that it does not share the cores with the threads the previous call left spinning.
    """
    incumbents = list(incumbents) if incumbents else [next(iter(candidates))]
    rounds = max(1, rounds)
    reference = incumbents[0]
    alive = dict(candidates)
    dropped: dict[str, str] = {}

    def drop(name: str, error: BaseException) -> None:
        if name == reference:
            raise error
        logger.warning("convmixer_timm: inference path %r left out: %s: %s", name, type(error).__name__, error)
        dropped[name] = f"{type(error).__name__}: {error}"
        alive.pop(name, None)

    def pause(name: str) -> None:
        if settle > 0 and name in settle_before:
            time.sleep(settle)

    first: dict[str, float] = {}
    for name, run in list(alive.items()):
        pause(name)
        start = clock()
        try:
            run()  # first call: oneDNN primitive creation, weight reorders, onnxruntime arena growth
        except Exception as error:  # a path that fails is not a choice; the others still give the answer
            drop(name, error)
            continue
        first[name] = clock() - start
    if first and warmup_drop_ratio:
        # A first call costs more than later ones, by a one-time setup that is largest for the fast paths
        # (OpenVINO's first inference, oneDNN's primitives): only a path far behind even then is out at once.
        fastest = min(first.values())
        for name in list(alive):
            if len(alive) > 1 and first[name] > fastest * warmup_drop_ratio:
                alive.pop(name)
    times: dict[str, list[float]] = {name: [] for name in alive}
    order = list(alive)
    for index in range(rounds):
        shift = index % len(order)
        for name in order[shift:] + order[:shift]:
            if name not in alive:
                continue
            pause(name)
            start = clock()
            try:
                alive[name]()
            except Exception as error:
                drop(name, error)
                continue
            times[name].append(clock() - start)
        if index + 1 >= min_rounds and len(alive) > 1:
            leader = min(_score(times[name]) for name in alive)
            for name in list(alive):
                if min(times[name]) > leader * drop_ratio:
                    alive.pop(name)  # clearly behind: another call would not change the outcome
        if len(alive) <= 1 and index + 1 >= min_rounds:  # the last one standing has run min_rounds calls too
            break
    if not alive:  # every other path failed: the reference ran its first call, so it is the safe answer
        return RaceResult(reference, {name: values for name, values in times.items() if values}, dropped)
    scores = {name: _score(times[name]) for name in alive}
    best = min(scores, key=scores.get)
    standing = [name for name in incumbents if name in scores]
    if standing:
        incumbent = min(standing, key=scores.get)
        if scores[best] >= scores[incumbent] * (1.0 - margin):
            best = incumbent
    return RaceResult(best, {name: values for name, values in times.items() if values}, dropped)


# ------------------------------------------------------------------------------------------ remembered choices


def cache_dir() -> Path:
    """Where :func:`optimize_for_inference` remembers its choices: ``$CONVMIXER_TIMM_CACHE/inference``, else
    ``~/.cache/convmixer_timm/inference`` (the folder the demo and the kernel build use)."""
    root = os.environ.get("CONVMIXER_TIMM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "convmixer_timm") / "inference"


_SCHEMA = 1


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def _machine() -> dict[str, str]:
    """The CPU (model and the hash of its flags) and the settings that decide which ISA each library uses."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == (platform.processor() or platform.machine()):
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    env = {name: os.environ.get(name, "") for name in (
        "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "CONVMIXER_TIMM_CPU_ISA")}
    return {"cpu": model, "machine": platform.machine(), "flags_sha256": hashlib.sha256(flags.encode()).hexdigest(),
            "torch_capability": str(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()),
            **{f"env {k}": v for k, v in env.items()}}


def _architecture(model: nn.Module) -> dict[str, object]:
    """The model's speed-relevant shape: dim, depth, kernel, patch, activation, classes, and every tensor shape."""
    shapes = [f"{name}:{list(t.shape)}" for name, t in model.state_dict().items()]
    arch: dict[str, object] = {"class": type(model).__name__,
                               "shapes_sha256": hashlib.sha256("\n".join(shapes).encode()).hexdigest()}
    try:
        stem = model.stem[0]
        arch.update(dim=int(stem.weight.shape[0]), depth=len(model.blocks), patch=int(stem.stride[0]),
                    kernel=int(model.blocks[0][0].fn[0].weight.shape[-1]) if len(model.blocks) else 0,
                    act=type(model.stem[1]).__name__, in_chans=int(stem.weight.shape[1]))
    except (AttributeError, IndexError, TypeError):
        pass
    return arch


class ChoiceCache:
    """Choices remembered across processes: one small JSON file per (machine, libraries, model, input) key.

    JSON data only (a file is never executed or unpickled, and a name read from it is used only if it is one of
    the paths on offer). Writes go to a temporary file in the same folder and are renamed into place, so a
    reader sees the old file or the new one, whole. A file that cannot be read as this schema is reported once
    (a warning) and treated as absent; the next choice overwrites it.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._warned_write = False

    def path(self, key: Mapping[str, object]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.folder / f"{digest}.json"

    def get(self, key: Mapping[str, object]) -> dict | None:
        path = self.path(key)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as error:
            logger.warning("convmixer_timm: cannot read the remembered inference choice %s (%s); timing again",
                           path, error)
            return None
        try:
            data = json.loads(text)
            if not (isinstance(data, dict) and data.get("schema") == _SCHEMA and isinstance(data.get("choice"), str)
                    and json.dumps(data.get("key"), sort_keys=True) == json.dumps(key, sort_keys=True)):
                raise ValueError("not a choice for this key")
        except ValueError as error:  # JSONDecodeError included
            logger.warning("convmixer_timm: damaged inference-choice file %s (%s); timing again and replacing it",
                           path, error)
            return None
        return data

    def put(self, key: Mapping[str, object], record: Mapping[str, object]) -> None:
        path = self.path(key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=self.folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"schema": _SCHEMA, "key": key, **record}, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as error:  # a read-only or full cache: the choice still holds for this process
            if not self._warned_write:
                self._warned_write = True
                logger.warning("convmixer_timm: cannot remember inference choices in %s (%s)", self.folder, error)


# --------------------------------------------------------------------------------------------- the autotuner


@dataclasses.dataclass
class _Entry:
    name: str
    runner: nn.Module | None  # a foreign runtime built for the full model, or None for PyTorch's paths
    source: str  # "timed" or "remembered"


# Timing is serialized process-wide: two measurements at once (two shapes, two modules) would each time the
# other's load. Looking up a choice already made never waits for it.
_MEASURING = threading.Lock()

# A call of at most this many multiply-adds is cheap enough to time on the whole model; above it, paths race on
# a copy cut to PROXY_DEPTH blocks. The blocks are identical, so a path's time is its stem and head plus depth x
# its block time, and the race ranks the block time at a fraction of the cost (768/32 at batch 2: 1/16).
PROXY_MACS = 2 * 10 ** 9
PROXY_DEPTH = 2
# A copy cut to two blocks weighs per-call costs (a runtime's request overhead, the stem and the head) more than
# the whole model does: on a 2-core Xeon, 256/8 k5 at batch 64, OpenVINO lost the 2-block race to conv+kernel and
# then ran 1.15x faster on the whole model. So after a race on the copy, PyTorch's best path and the best runtime
# race again on the whole model, where both are within this ratio of the copy's winner.
CONFIRM_RATIO = 1.3


def _cut(module: nn.Module, depth: int) -> nn.Module:
    """A shallow copy of ``module`` with only its first ``depth`` blocks (parameters shared, nothing copied)."""
    cut = copy.copy(module)
    cut._modules = dict(module._modules)
    blocks = module.blocks
    cut._modules["blocks"] = blocks[:depth]  # Sequential and ModuleList slice to their own type
    if isinstance(module, FusedConvMixerInference):
        cut._packed = {}  # packed weights are per block list
    return cut


class AutotunedConvMixer(nn.Module):
    """What :func:`optimize_for_inference` returns: for each input shape, the fastest exact path, measured once.

    Like ``torch.backends.cudnn.benchmark``: the first call with a new (shape, dtype, device) races the paths
    (:func:`race`) and keeps the winner for later calls of that shape (``choices``). The paths: the plain eval
    model with NCHW or channels_last input (the faster is the incumbent, kept unless another path beats it by
    ``margin``), :class:`FusedConvMixerInference` with each pointwise (oneDNN conv, MKL addmm) and depthwise
    (compiled kernel, oneDNN) implementation where the model is supported, and ``runtimes`` (onnxruntime,
    OpenVINO) on the model's ONNX export. Where a call is large (``PROXY_MACS``), the race runs on a copy cut to
    ``proxy_depth`` blocks, and only the winner is built for the whole model.

    ``cache_dir``: a folder where choices are remembered across processes (:class:`ChoiceCache`); ``None``
    remembers nothing on disk. ``max_shapes``: how many shapes' choices are kept; the least recently used is
    dropped with its runtime. Tuning is thread-safe: threads that see a new shape together wait for one
    measurement and share its result. Progress is logged to the ``convmixer_timm`` logger (INFO).
    """

    def __init__(self, model: nn.Module, clock: Clock = time.perf_counter, rounds: int = 5, margin: float = 0.03,
                 announce: bool = True, runtimes: Sequence[str] = (), cache_dir: str | os.PathLike | None = None,
                 max_shapes: int = 8, proxy_depth: int = PROXY_DEPTH, min_rounds: int = 2, settle: float = 0.02):
        super().__init__()
        unknown = set(runtimes) - set(RUNTIMES)
        if unknown:
            raise ValueError(f"unknown runtimes {sorted(unknown)}: choose from {RUNTIMES}")
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
        self.runtimes = tuple(runtimes)
        self.plain = copy.deepcopy(model).eval()
        self.plain_channels_last = copy.deepcopy(self.plain).to(memory_format=torch.channels_last)
        self.fused = FusedConvMixerInference(model, "conv", "onednn") if _supported(model) else None
        self.clock, self.rounds, self.min_rounds, self.margin = clock, rounds, min(min_rounds, rounds), margin
        self.announce, self.max_shapes, self.proxy_depth = announce, max_shapes, max(1, proxy_depth)
        self.settle = settle  # untimed seconds before each timed call (race's ``settle``)
        self.disk = ChoiceCache(cache_dir) if cache_dir is not None else None
        self.tunings = 0  # races run by this module (a remembered choice is not one)
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # guards _entries and _shape_locks; never held while measuring
        self._shape_locks: dict[tuple, threading.Lock] = {}
        self._onnx: OrderedDict[tuple, bytes] = OrderedDict()  # (image size) -> export, at most 2 kept
        self._sessions: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._ov_requests: dict[tuple, int] = {}  # input shape -> OpenVINO THROUGHPUT's number of requests
        self._arch = _architecture(self.plain)
        self.eval()

    # -- the paths

    def paths(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """PyTorch's paths by name: the plain model in both layouts, and the fused module's combinations."""
        names = ["plain", "plain channels_last"]
        if self.fused is not None:
            depthwise = ("onednn", "kernel") if load() is not None else ("onednn",)
            names += [f"{pw}+{dw}" for pw in ("conv", "mm") for dw in depthwise]
        return {name: functools.partial(self.run_path, name) for name in names}

    def run_path(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One of PyTorch's paths (see :meth:`paths`) on ``x``."""
        return self._run_torch_path(name, x, self.plain, self.plain_channels_last, self.fused)

    @staticmethod
    def _run_torch_path(name: str, x: torch.Tensor, plain: nn.Module, plain_cl: nn.Module,
                        fused: FusedConvMixerInference | None) -> torch.Tensor:
        if name == "plain":
            return plain(x)
        if name == "plain channels_last":
            return plain_cl(x.contiguous(memory_format=torch.channels_last))
        pointwise, depthwise = name.split("+")
        return fused.run(x, pointwise, depthwise)

    def _foreign_builders(self) -> dict[str, Callable[[nn.Module, tuple[int, ...], bool], nn.Module]]:
        """Each optional runtime's path: a builder taking (model, input shape, whether ``model`` is the whole
        one) and returning a module for that shape. Subclasses may add their own."""
        builders: dict[str, Callable[[nn.Module, tuple[int, ...], bool], nn.Module]] = {}
        if "onnxruntime" in self.runtimes:
            builders["onnxruntime"] = self._onnxruntime
        if "openvino" in self.runtimes:
            for hint in ("LATENCY", "THROUGHPUT"):
                builders[f"openvino {hint.lower()}"] = functools.partial(self._openvino, hint)
        return builders

    def _export(self, model: nn.Module, shape: tuple[int, ...], whole: bool) -> bytes:
        # Once per image size and depth (the batch axis is dynamic), shared by every runtime. The whole model's
        # export is kept for the next batch size (at most two image sizes: it is as large as the weights); a
        # proxy's is dropped after its race.
        key = (len(model.blocks) if hasattr(model, "blocks") else None, whole, *shape[1:])
        with self._lock:
            onnx = self._onnx.get(key)
        if onnx is None:
            onnx = _onnx_bytes(model, shape)
            with self._lock:
                self._onnx[key] = onnx
                while sum(whole for _, whole, *_ in self._onnx) > 2:
                    self._onnx.pop(next(k for k in self._onnx if k[1]))
        return onnx

    def _onnxruntime(self, model: nn.Module, shape: tuple[int, ...], whole: bool) -> nn.Module:
        if not whole:
            return OnnxRuntimeConvMixer(None, shape, onnx=self._export(model, shape, whole))
        # One session per image size serves every batch size; it lives while a choice uses it.
        session = self._sessions.get(tuple(shape[1:]))
        if session is None:
            session = OnnxRuntimeConvMixer(None, shape, onnx=self._export(model, shape, whole))
            self._sessions[tuple(shape[1:])] = session
        return session

    def _openvino(self, hint: str, model: nn.Module, shape: tuple[int, ...], whole: bool) -> nn.Module:
        # THROUGHPUT splits the batch into OpenVINO's optimal number of requests, which takes a compilation to
        # learn: learnt once per shape (on the proxy, or remembered on disk), the whole model compiles once.
        requests = self._ov_requests.get(tuple(shape)) if hint == "THROUGHPUT" else None
        runner = OpenVinoConvMixer(None, shape, hint, onnx=self._export(model, shape, whole), requests=requests)
        if hint == "THROUGHPUT":
            self._ov_requests[tuple(shape)] = runner.requests
        return runner

    # -- choosing

    def _disk_key(self, x: torch.Tensor, candidates: Sequence[str]) -> dict[str, object]:
        versions = {name: _version(name) for name in ("torch", "timm", "convmixer-timm", *self.runtimes)}
        return {"machine": _machine(), "threads": torch.get_num_threads(), "versions": versions,
                "kernels": str(kernel_info().get("isa")) if load() is not None else "none",
                "model": self._arch, "input": {"shape": list(x.shape), "dtype": str(x.dtype)},
                "candidates": sorted(candidates)}

    def _proxy_depth(self, x: torch.Tensor) -> int | None:
        """The depth of the copy the race runs on, or None to race on the whole model."""
        arch = self._arch
        if "dim" not in arch or arch["depth"] <= self.proxy_depth:
            return None
        grid = (x.shape[-2] // arch["patch"]) * (x.shape[-1] // arch["patch"])
        dim = arch["dim"]
        block = arch["kernel"] ** 2 * dim + dim * dim
        macs = x.shape[0] * grid * (arch["in_chans"] * arch["patch"] ** 2 * dim + arch["depth"] * block)
        return self.proxy_depth if macs > PROXY_MACS else None

    def _build(self, name: str, x: torch.Tensor) -> nn.Module | None:
        """The whole model's runner for a foreign path (None for PyTorch's paths)."""
        builders = self._foreign_builders()
        return builders[name](self.plain, tuple(x.shape), True) if name in builders else None

    def _tune(self, x: torch.Tensor, key: tuple) -> _Entry:
        foreign_ok = x.device.type == "cpu" and x.dtype == torch.float32
        builders = self._foreign_builders() if foreign_ok else {}
        names = [*self.paths(), *builders]
        disk_key = self._disk_key(x, names) if self.disk is not None else None
        if disk_key is not None:
            record = self.disk.get(disk_key)
            if record is not None and record["choice"] in names:
                if isinstance(record.get("openvino_requests"), int) and record["openvino_requests"] >= 1:
                    self._ov_requests[tuple(x.shape)] = record["openvino_requests"]
                try:
                    entry = _Entry(record["choice"], self._build(record["choice"], x), "remembered")
                    logger.debug("convmixer_timm: %s for input %s, remembered in %s", entry.name, list(x.shape),
                                 self.disk.path(disk_key))
                    return entry
                except Exception as error:
                    logger.warning("convmixer_timm: the remembered inference path %r failed to build (%s: %s); "
                                   "timing again", record["choice"], type(error).__name__, error)
        depth = self._proxy_depth(x)
        level = logging.INFO if self.announce else logging.DEBUG
        logger.log(level, "convmixer_timm: timing %d inference paths for input %s%s (once per input shape)",
                   len(names), list(x.shape), f" on a {depth}-block copy" if depth else "")
        with _MEASURING:
            start = time.perf_counter()  # for the log line only; the choice uses self.clock
            if depth is None:
                plain, plain_cl, fused = self.plain, self.plain_channels_last, self.fused
            else:
                plain, plain_cl = _cut(self.plain, depth), _cut(self.plain_channels_last, depth)
                fused = _cut(self.fused, depth) if self.fused is not None else None
            candidates: dict[str, Callable[[], object]] = {
                name: functools.partial(self._run_torch_path, name, x, plain, plain_cl, fused)
                for name in self.paths()}
            foreign: dict[str, nn.Module] = {}
            for name, make in builders.items():
                built = time.perf_counter()
                try:
                    foreign[name] = make(plain, tuple(x.shape), depth is None)
                    logger.debug("convmixer_timm: built %s in %.2f s", name, time.perf_counter() - built)
                except Exception as error:  # an optional path: the others still give the answer
                    logger.warning("convmixer_timm: inference path %r left out for input %s: %s: %s", name,
                                   list(x.shape), type(error).__name__, error)
                    continue
                candidates[name] = functools.partial(foreign[name], x)
            logger.debug("convmixer_timm: paths built in %.2f s", time.perf_counter() - start)
            with torch.no_grad():
                # PyTorch's OpenMP workers spin for a few ms after a call (8-9 ms of CPU in the next 20 ms,
                # measured for benchmarks/bench.py): a runtime's call right after one would pay for it, and a
                # PyTorch call would find its threads awake. Every timed call starts from a quiet machine, as
                # each path does in steady use when it runs alone.
                result = race(candidates, self.clock, self.rounds, self.min_rounds, self.margin,
                              incumbents=("plain", "plain channels_last"), settle=self.settle,
                              settle_before=tuple(candidates))
            logger.debug("convmixer_timm: race run in %.2f s", time.perf_counter() - start)
            if result.choice in foreign:
                # A foreign runtime costs an export and a compilation per new shape and a thread pool beside
                # PyTorch's: like the incumbent, PyTorch's best path is kept unless the runtime beats it clearly.
                own = {n: _score(t) for n, t in result.times.items() if n in candidates and n not in foreign}
                best_own = min(own, key=own.get) if own else None  # none: all far behind on their first call
                if best_own and _score(result.times[result.choice]) >= own[best_own] * (1.0 - self.margin):
                    result.choice = best_own
            runner = foreign.get(result.choice) if depth is None else None
            foreign_names = set(foreign)
            foreign.clear()  # the runtimes that lost are released now, threads and all
            with self._lock:
                for proxy_key in [k for k in self._onnx if not k[1]]:
                    del self._onnx[proxy_key]
            del candidates, plain, plain_cl, fused
            self.tunings += 1
        remember = disk_key is not None
        if depth is not None:
            with _MEASURING:
                result.choice, runner = self._confirm_on_whole_model(x, result, foreign_names)
        if depth is not None and result.choice in builders and runner is None:
            try:
                runner = self._build(result.choice, x)
            except Exception as error:  # not remembered: the next process races again
                logger.warning("convmixer_timm: inference path %r failed for the whole model (%s: %s); using "
                               "the plain model", result.choice, type(error).__name__, error)
                result.choice, remember = "plain", False
        logger.log(level, "convmixer_timm: chose %s for input %s in %.1f s (%s)", result.choice, list(x.shape),
                   time.perf_counter() - start,
                   ", ".join(f"{n} {1e3 * _score(t):.1f} ms" for n, t in sorted(result.times.items(),
                                                                              key=lambda item: _score(item[1]))))
        if remember:
            self.disk.put(disk_key, {"choice": result.choice, "proxy_depth": depth,
                                     "openvino_requests": self._ov_requests.get(tuple(x.shape)),
                                     "ms": {n: round(1e3 * _score(t), 3) for n, t in result.times.items()}})
        return _Entry(result.choice, runner, "timed")

    def _confirm_on_whole_model(self, x: torch.Tensor, result: RaceResult,
                                foreign_names: set[str]) -> tuple[str, nn.Module | None]:
        """After a race on a cut copy: PyTorch's best path and the best runtime, where both came within
        ``CONFIRM_RATIO`` of the winner, race again on the whole model. Returns the choice and, where a runtime
        won, its whole-model runner."""
        scores = {name: _score(times) for name, times in result.times.items() if name not in result.dropped}
        own = [name for name in scores if name not in foreign_names]
        other = [name for name in scores if name in foreign_names]
        if not own or not other:
            return result.choice, None
        best = min(scores.values())
        best_own, best_other = min(own, key=scores.get), min(other, key=scores.get)
        if max(scores[best_own], scores[best_other]) > best * CONFIRM_RATIO:
            return result.choice, None
        try:
            runner = self._build(best_other, x)
        except Exception as error:  # the runtime fails on the whole model: PyTorch's path stands
            logger.warning("convmixer_timm: inference path %r failed for the whole model (%s: %s)", best_other,
                           type(error).__name__, error)
            return best_own, None
        candidates = {
            best_own: functools.partial(self._run_torch_path, best_own, x, self.plain, self.plain_channels_last,
                                        self.fused),
            best_other: functools.partial(runner, x),
        }
        with torch.no_grad():
            final = race(candidates, self.clock, self.rounds, self.min_rounds, self.margin, incumbents=(best_own,),
                         settle=self.settle, settle_before=tuple(candidates))
        logger.debug("convmixer_timm: on the whole model %s", ", ".join(
            f"{name} {1e3 * _score(times):.1f} ms" for name, times in final.times.items()))
        return final.choice, (runner if final.choice == best_other else None)

    def _entry(self, x: torch.Tensor) -> _Entry:
        key = (tuple(x.shape), x.dtype, x.device.type)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            shape_lock = self._shape_locks.setdefault(key, threading.Lock())
        with shape_lock:  # one tuning per shape: threads that see it meanwhile wait here and reuse it
            with self._lock:
                entry = self._entries.get(key)
            if entry is None:
                try:
                    entry = self._tune(x, key)
                except BaseException:
                    with self._lock:  # an input the model refuses leaves no lock behind
                        self._shape_locks.pop(key, None)
                    raise
                with self._lock:
                    self._entries[key] = entry
                    evicted = []
                    while len(self._entries) > self.max_shapes:
                        evicted.append(self._entries.popitem(last=False))
                    self._shape_locks.pop(key, None)
                for old_key, old in evicted:
                    old.runner = None  # the runtime goes with its last reference
                    self._ov_requests.pop(old_key[0], None)
                    if self.fused is not None:
                        self.fused.release(old_key[0])
        return entry

    @property
    def choices(self) -> dict[tuple, str]:
        """The path chosen for each (shape, dtype, device) kept, least recently used first."""
        with self._lock:
            return {key: entry.name for key, entry in self._entries.items()}

    def tune(self, x: torch.Tensor) -> str:
        """Choose a path for ``x``'s (shape, dtype, device) if none is kept yet, and return its name."""
        return self._entry(x).name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            entry = self._entry(x)
            return entry.runner(x) if entry.runner is not None else self.run_path(entry.name, x)


def optimize_for_inference(model: nn.Module, input_size: Sequence[int] | None = None, backend: str = "auto",
                           cache: bool | str | os.PathLike = True) -> nn.Module:
    """Return the fastest exact eval-mode version of ``model`` (a convmixer-timm or timm ``ConvMixer``).

    The model itself is left untouched. Which implementation is fastest depends on the shape and the CPU (on an
    AVX2-only EPYC the compiled spatial-mixing kernel lost to oneDNN by up to 2x where it won on AVX-512), so
    nothing is assumed: the paths race on the first input of each shape, and the winner is kept for that shape
    (:class:`AutotunedConvMixer`, like ``cudnn.benchmark``). The first call of a new shape takes seconds and logs
    what it does to the ``convmixer_timm`` logger (INFO); with ``input_size`` (``(N, C, H, W)`` or
    ``(C, H, W)``) that first race happens here instead. The plain eval model in its faster layout is the
    incumbent, kept unless another path beats it by 3%. Outputs match the eval-mode model to float32 rounding
    (``tests/test_inference.py``).

    ``cache``: choices are remembered across processes in :func:`cache_dir` (``True``), in the given folder, or
    not at all (``False``); a remembered choice skips the race (keyed by CPU, thread count, library versions,
    the model's architecture and the input shape).

    ``backend``: ``"auto"`` (default) also races the optional runtimes installed here, onnxruntime (the ``onnx``
    extra) and OpenVINO FP32 (the ``openvino`` extra), on the model's own ONNX export, and uses one where it is
    faster; ``"torch"`` keeps to PyTorch's paths; ``"onnxruntime"`` or ``"openvino"`` (needs ``input_size``)
    returns that runtime's wrapper alone.
    """
    backends = ("auto", "torch", *RUNTIMES)
    if backend not in backends:
        raise ValueError(f"backend must be one of {backends}, got {backend!r}")
    if backend in RUNTIMES:
        if input_size is None:
            raise ValueError(f"backend={backend!r} needs input_size: the ONNX graph is built for one input size")
        if backend == "onnxruntime":
            return OnnxRuntimeConvMixer(model, input_size)
        return OpenVinoConvMixer(model, input_size)
    runtimes = installed_runtimes() if backend == "auto" else ()
    folder = (cache_dir() if cache is True else None) if isinstance(cache, bool) else Path(cache)
    tuned = AutotunedConvMixer(model, announce=input_size is None, runtimes=runtimes, cache_dir=folder)
    if input_size is not None:
        tuned.tune(torch.randn(_full_size(input_size)))
    return tuned

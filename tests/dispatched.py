"""Which of the package's operators a region ran: shows whether a step took the kernels or PyTorch's ops."""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class OurOperatorCalls(TorchDispatchMode):
    """How often each ``torch.ops.convmixer_timm`` operator was dispatched while active, by its name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    @property
    def called(self) -> set[str]:
        return set(self.counts)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "convmixer_timm":
            name = func.__name__.split(".")[0]
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

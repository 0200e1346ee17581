"""Registering the ConvMixer models with timm, whatever is imported first: the one mechanism behind both
``import convmixer_timm`` and the ``convmixer_timm.pth`` start-up hook.

Registration is importing ``convmixer_timm.models``, which needs timm. If timm is already imported, that happens at
once; otherwise a finder on ``sys.meta_path`` wraps timm's loader so it happens the moment timm's own import
finishes. The finder stays in place through ``importlib.util.find_spec("timm")`` probes (transformers'
``is_timm_available`` makes one long before it imports timm) and leaves when timm actually executes.

Standard library only: the start-up hook runs this in every Python process of the environment.
"""
import importlib
import importlib.util
import sys
import threading
from typing import Any

__all__ = ["install", "register_now", "timm_imported"]

_MODELS = "convmixer_timm.models"


def timm_imported() -> bool:
    """Whether timm has finished importing (it may be in ``sys.modules`` half-initialised)."""
    module = sys.modules.get("timm")
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


def register_now() -> None:
    """Import ``convmixer_timm.models``, which registers the models with timm; errors propagate."""
    importlib.import_module(_MODELS)


class RegisterWhenTimmLoads:
    """Meta-path finder that has timm's loader import ``convmixer_timm.models`` right after timm finishes."""

    def __init__(self) -> None:
        self._searching = threading.local()  # the lookup below walks sys.meta_path, this finder included

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any | None:
        if fullname != "timm" or getattr(self._searching, "active", False):
            return None
        self._searching.active = True
        try:
            spec = importlib.util.find_spec("timm")
        finally:
            self._searching.active = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        finder = self

        def exec_then_register(module: Any) -> None:
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)  # timm is being imported for real: nothing left to watch for
            exec_module(module)
            register_now()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register now if timm is imported, else when it is; idempotent."""
    if "timm" in sys.modules:
        # Half-initialised: this runs inside timm's import, whose finder registers once timm finishes.
        if timm_imported() and _MODELS not in sys.modules:
            register_now()
        return
    if not any(type(finder).__name__ == RegisterWhenTimmLoads.__name__ and
               type(finder).__module__ == __name__ for finder in sys.meta_path):
        sys.meta_path.insert(0, RegisterWhenTimmLoads())

"""Registering the ConvMixer models with timm, whatever is imported first: the one mechanism behind both
``import convmixer_timm`` and the ``convmixer_timm.pth`` start-up hook.

Registration is importing ``convmixer_timm.models``, which needs timm. If timm is already imported, that happens at
once; otherwise a finder on ``sys.meta_path`` hands Python timm's own spec with the loader wrapped in an object of
ours, which runs timm's code and then registers. The finder stays in place through
``importlib.util.find_spec("timm")`` probes (transformers' ``is_timm_available`` makes one long before it imports
timm) and through a failed import of timm (so a retry registers), and leaves once timm's code has run.

A registration started by timm's import never breaks it: a failure is one ``RegistrationWarning`` naming the cause
and the fix, and timm keeps its built-in models. An explicit ``import convmixer_timm.models`` raises the error.

Standard library only: the start-up hook runs this in every Python process of the environment.
"""
import importlib
import importlib.util
import sys
import threading
import warnings
from typing import Any

__all__ = ["RegistrationWarning", "install", "register_now", "timm_imported"]

_MODELS = "convmixer_timm.models"


class RegistrationWarning(RuntimeWarning):
    """The ConvMixer models could not be registered while timm was imported; timm works without them."""


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def timm_imported() -> bool:
    """Whether timm has finished importing (it may be in ``sys.modules`` half-initialised)."""
    return sys.modules.get("timm") is not None and not _initializing("timm")


def _waits_on_the_models_import(error: BaseException) -> bool:
    # importlib's own error (it has no public name) when this thread would wait on the lock of the models' module,
    # held by a thread that waits on this one; a deadlock deeper inside the models' import is a real failure.
    return (type(error).__name__ == "_DeadlockError" and "importlib" in type(error).__module__
            and f"_ModuleLock({_MODELS!r})" in str(error))


def register_now() -> None:
    """Import ``convmixer_timm.models``, which registers the models with timm; errors propagate.

    Nothing to do while the models are being imported, by this thread or another: that import registers them. A
    thread that holds the lock of ``convmixer_timm.models`` and waits on one of timm's module locks is such an
    import too, and importing the models here would wait on it in turn: importlib reports the cycle as a deadlock.
    """
    if _initializing(_MODELS):
        return
    try:
        importlib.import_module(_MODELS)
    except RuntimeError as error:
        if not _waits_on_the_models_import(error):
            raise


def _failure_message(error: BaseException) -> str:
    cause = (str(error).strip().splitlines() or [""])[0]
    return (
        f"convmixer-timm could not register its ConvMixer models with timm ({type(error).__name__}: {cause}); "
        "timm works without them and keeps its own convmixer_* models. Reinstall convmixer-timm "
        "(pip install --force-reinstall convmixer-timm) to fix it, or set CONVMIXER_TIMM_AUTOLOAD=0 to stop "
        "registering on import; `import convmixer_timm.models` shows the full error."
    )


class _RegisteringLoader:
    """timm's own loader inside an object of ours: runs timm's code, then registers the models.

    The loader Python found for timm is never changed (zipimport and frozen applications share one loader between
    modules). Anything else asked of this object is answered by timm's loader, and before timm's code runs the
    module is given timm's loader back as ``__loader__`` and ``__spec__.loader`` (importlib.resources, pkgutil and
    reload read them).
    """

    def __init__(self, loader: Any, finder: "RegisterWhenTimmLoads") -> None:
        self._loader = loader
        self._finder = finder

    def __getattr__(self, name: str) -> Any:
        if name in ("_loader", "_finder"):  # not set yet (copy, pickle): never recurse
            raise AttributeError(name)
        return getattr(self._loader, name)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = self._loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        self._loader.exec_module(module)  # if timm's code raises, the finder stays for the retry
        self._finder.uninstall()
        try:
            register_now()
        except Exception as error:
            # stacklevel 2: warnings skips importlib's frames, so this names the line that imported timm.
            warnings.warn(_failure_message(error), RegistrationWarning, stacklevel=2)


class RegisterWhenTimmLoads:
    """Meta-path finder giving timm's spec a loader of ours that registers the models right after timm's code."""

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
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisteringLoader(spec.loader, self)  # a fresh spec, made for this import only
        return spec

    def uninstall(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:  # another thread's import of timm removed it first
            pass


def _is_ours(finder: Any) -> bool:
    return type(finder).__name__ == RegisterWhenTimmLoads.__name__ and type(finder).__module__ == __name__


def install() -> None:
    """Register now if timm is imported, else when it is; idempotent. Errors of an immediate registration
    propagate (the caller imported the package explicitly)."""
    if "timm" in sys.modules:
        # Half-initialised: this runs inside timm's import, whose loader registers once timm's code has run.
        if timm_imported():
            register_now()
        return
    if not any(_is_ours(finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, RegisterWhenTimmLoads())

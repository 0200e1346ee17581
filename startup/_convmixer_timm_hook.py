"""Start-up hook of convmixer-timm, imported by ``convmixer_timm.pth`` in site-packages.

It registers the ConvMixer models the moment a program imports ``timm``, so stock timm scripts (validate.py,
inference.py, benchmark.py) see them with no change. It imports nothing heavy itself: a program that never
imports timm pays for one small finder on ``sys.meta_path``. ``CONVMIXER_TIMM_AUTOLOAD=0`` turns it off.
"""
import os
import sys


class _RegisterAfterTimm:
    """Meta-path finder that wraps timm's loader so convmixer_timm is imported right after timm finishes.

    It stays on ``sys.meta_path`` until timm is actually executed: programs probe for timm with
    ``importlib.util.find_spec("timm")`` long before they import it (transformers' ``is_timm_available`` does),
    and a one-shot finder spent on such a probe would leave the real import unhooked.
    """

    def __init__(self):
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm" or self._searching:
            return None
        from importlib.util import find_spec

        self._searching = True  # the lookup below walks sys.meta_path, this finder included
        try:
            spec = find_spec("timm")
        finally:
            self._searching = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        finder = self

        def exec_then_register(module):
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)  # timm is being imported for real: nothing left to watch for
            exec_module(module)
            if "convmixer_timm.models" not in sys.modules:
                try:
                    import convmixer_timm  # noqa: F401  (registers the models)
                except Exception as exc:  # never break ``import timm`` because of the plugin
                    import warnings

                    warnings.warn(f"convmixer-timm could not register its models: {exc!r}", stacklevel=2)

        spec.loader.exec_module = exec_then_register
        return spec


def install():
    if os.environ.get("CONVMIXER_TIMM_AUTOLOAD", "1") == "0" or "timm" in sys.modules:
        return
    if not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimm())


install()

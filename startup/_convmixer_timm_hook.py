"""Start-up hook of convmixer-timm, imported by ``convmixer_timm.pth`` in site-packages.

It registers the ConvMixer models the moment a program imports ``timm``, so stock timm scripts (validate.py,
inference.py, benchmark.py) see them with no change. It imports nothing heavy itself: a program that never
imports timm pays for one small finder on ``sys.meta_path``. ``CONVMIXER_TIMM_AUTOLOAD=0`` turns it off.
"""
import os
import sys


class _RegisterAfterTimm:
    """Meta-path finder that wraps timm's loader so convmixer_timm is imported right after timm finishes."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding this finder again
        from importlib.util import find_spec

        spec = find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
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

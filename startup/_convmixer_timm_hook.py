"""Start-up hook of convmixer-timm, imported by ``convmixer_timm.pth`` in site-packages.

It has the ConvMixer models registered the moment a program imports ``timm``, so stock timm scripts
(validate.py, inference.py, benchmark.py) see them with no change. It imports ``convmixer_timm``, whose
``__init__`` uses only the standard library and puts one small finder on ``sys.meta_path`` (``_autoload.py``, the
same mechanism as an explicit ``import convmixer_timm``); torch and timm are imported only when the program
imports timm. ``CONVMIXER_TIMM_AUTOLOAD=0`` turns it off.
"""
import os


def install():
    if os.environ.get("CONVMIXER_TIMM_AUTOLOAD", "1").strip() == "0":
        return
    try:
        import convmixer_timm  # noqa: F401  (installs the finder, or registers if timm is already imported)
    except ImportError:  # the package was removed and this hook left behind: nothing to register
        pass


install()

"""Start-up hook of convmixer-timm, imported by ``convmixer_timm.pth`` in site-packages.

It has the ConvMixer models registered the moment a program imports ``timm``, so stock timm scripts
(validate.py, inference.py, benchmark.py) see them with no change. It imports ``convmixer_timm``, whose
``__init__`` uses only the standard library and puts one small finder on ``sys.meta_path`` (``_autoload.py``, the
same mechanism as an explicit ``import convmixer_timm``); torch and timm are imported only when the program
imports timm. ``CONVMIXER_TIMM_AUTOLOAD=0`` turns it off. It never stops Python from starting: a failure is one
warning.
"""
import os
import warnings


def install():
    if os.environ.get("CONVMIXER_TIMM_AUTOLOAD", "1").strip() == "0":
        return
    try:
        import convmixer_timm  # noqa: F401  (installs the finder, or registers if timm is already imported)
    except ModuleNotFoundError as error:
        if error.name == "convmixer_timm":  # the package was removed and this hook left behind
            return
        _warn(error)
    except Exception as error:
        _warn(error)


def _warn(error):
    cause = (str(error).strip().splitlines() or [""])[0]
    warnings.warn(
        f"convmixer-timm could not register its ConvMixer models with timm ({type(error).__name__}: {cause}); "
        "timm works without them. Reinstall convmixer-timm (pip install --force-reinstall convmixer-timm) to fix "
        "it, or set CONVMIXER_TIMM_AUTOLOAD=0 to stop registering on import; `import convmixer_timm` shows the "
        "full error.",
        RuntimeWarning,
        stacklevel=2,
    )


install()

"""Wheel build hook: compile convmixer_timm's CPU kernels into the wheel (``convmixer_timm/speed/build.py``).

Where no C++ compiler is found or the build fails, the wheel is built without them (a warning in pip's output)
and the package falls back to PyTorch's ops at run time; ``CONVMIXER_TIMM_BUILD_KERNELS=0`` skips the build.
An editable install builds them in place, beside the sources.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

_SPEED = Path(__file__).resolve().parent / "convmixer_timm" / "speed"


def _build_module() -> Any:
    spec = importlib.util.spec_from_file_location("_convmixer_kernel_build", _SPEED / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class KernelBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"
    _out_dir: Path | None = None

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if self._out_dir is not None:
            shutil.rmtree(self._out_dir, ignore_errors=True)

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        if os.environ.get("CONVMIXER_TIMM_BUILD_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
            self.app.display_warning("convmixer-timm: CONVMIXER_TIMM_BUILD_KERNELS=0, building without CPU kernels")
            return
        build = _build_module()
        if version == "editable":
            out_dir = _SPEED
            if build.is_current(out_dir):
                return
        else:
            out_dir = Path(tempfile.mkdtemp(prefix="convmixer-kernels-"))
            self._out_dir = out_dir
        try:
            library = build.build_kernels(out_dir)
        except build.KernelBuildError as error:
            self.app.display_warning(f"convmixer-timm: CPU kernels not built, PyTorch's ops will be used ({error})")
            return
        if version == "editable":
            return  # built in place, beside the sources the editable install imports
        for path in (library, out_dir / build.MANIFEST_NAME):
            build_data["force_include"][str(path)] = f"convmixer_timm/speed/{path.name}"
        # ctypes, not the Python C API: any Python 3, this platform only.
        build_data["pure_python"] = False
        build_data["tag"] = f"py3-none-{sysconfig.get_platform().replace('-', '_').replace('.', '_')}"

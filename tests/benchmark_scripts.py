"""The scripts in ``benchmarks/`` loaded as modules, for the tests of their bookkeeping (they are not a package)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/{name}.py`` as a module (registered in ``sys.modules``: its dataclasses look it up there)."""
    spec = importlib.util.spec_from_file_location(f"convmixer_benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

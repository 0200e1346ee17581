"""Registration with timm: every distinct way a program can get there registers every model, and nothing about it
can break timm.

One subprocess per mechanism (``sys.modules`` persists, so orders cannot share a process): the start-up hook on
``import timm``; the ``.pth`` hook file alone; the package's models imported first (timm is then imported from
inside them); autoload off, the package first (around ``find_spec("timm")`` probes, as transformers'
``is_timm_available`` makes), then timm; autoload off, timm first, then the package; ``python -m convmixer_timm``;
the speed layer first. A failing registration leaves ``import timm`` working with timm's built-in models and one
warning; concurrent imports and a retried import of timm register; timm's loader object is never changed.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import timm
from timm.models import model_entrypoint

import convmixer_timm.models.convmixer as ours
from convmixer_timm import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
TIMM_BUILTINS = ("convmixer_1024_20_ks9_p14", "convmixer_1536_20", "convmixer_768_32")

_CHECK_REGISTERED = textwrap.dedent("""
    import importlib.resources, importlib.util, sys, timm
    from timm.models import model_entrypoint
    names = sorted(timm.list_models("convmixer*"))
    assert names == sorted({expected}), names
    assert all(model_entrypoint(n).__module__ == "convmixer_timm.models.convmixer" for n in names)
    model = timm.create_model("convmixer_768_32", dim=8, depth=1, pretrained=False)
    assert type(model).__module__ == "convmixer_timm.models.convmixer", type(model)
    # timm's module holds the loader Python found for it, unchanged, and its package data is readable.
    loader = timm.__spec__.loader
    assert timm.__loader__ is loader and type(loader).__module__.startswith("_frozen_importlib"), loader
    assert "exec_module" not in vars(loader), "timm's loader object was patched"
    assert importlib.resources.files("timm").joinpath("__init__.py").is_file()
    print("REGISTERED", len(names))
""").format(expected=sorted(v.name for v in VARIANTS))


def _python(code: str, env: dict[str, str] | None = None, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *flags, "-W", "error::UserWarning:convmixer_timm", "-c", code],
                          capture_output=True, text=True, env=full_env, timeout=300, cwd=ROOT)


# Every attribute of timm's modules, by identity: a registration that replaced one would show here.
_SNAPSHOT_DEF = textwrap.dedent("""
    import importlib, json, types

    def _identity(value):
        if isinstance(value, types.ModuleType):
            return ["module", value.__name__]
        code = getattr(value, "__code__", None)
        if code is not None:  # functools.wraps copies the name, not the code or the absence of __wrapped__
            return ["function", getattr(value, "__module__", None), getattr(value, "__qualname__", None),
                    code.co_filename, code.co_firstlineno, hasattr(value, "__wrapped__")]
        if isinstance(value, type):
            return ["class", value.__module__, value.__qualname__]
        return ["object", type(value).__module__, type(value).__qualname__]

    def _snapshot(label):
        modules = ("timm", "timm.layers", "timm.models", "timm.models._helpers", "timm.models._builder",
                   "timm.models._hub", "timm.models._factory", "timm.models._registry")
        state = {name: {attr: _identity(value) for attr, value in vars(importlib.import_module(name)).items()}
                 for name in modules}
        print(label, json.dumps(state), flush=True)
""")
_SNAPSHOT_AFTER = '\n_snapshot("REGISTERED_SNAPSHOT")\n'


# What each mechanism runs before the check; the check itself imports timm (a no-op where it already is).
_MECHANISMS = {
    # The installed start-up hook put the finder in place; timm's import registers.
    # Stock timm programs (validate.py, inference.py, benchmark.py) only `import timm`.
    "hook-then-timm": (textwrap.dedent("""
        import importlib.util, sys, warnings
        assert "_convmixer_timm_hook" in sys.modules, "convmixer_timm.pth is not installed"
        # transformers' is_timm_available probe, long before it imports timm.
        assert importlib.util.find_spec("timm") is not None and importlib.util.find_spec("timm") is not None
        assert not {"timm", "torch", "convmixer_timm.models"} & set(sys.modules), "the hook imported too much"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            import timm
    """), {}),
    # This checkout's hook file run by itself, without site-packages' .pth files (python -S).
    "pth-hook-alone": (textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "startup")!r}, {sysconfig.get_paths()["purelib"]!r}]
        assert "convmixer_timm" not in sys.modules
        import _convmixer_timm_hook
        assert "timm" not in sys.modules and "torch" not in sys.modules  # the hook imports nothing heavy
    """), {"__flags__": "-S"}),
    # Explicit import of the models with timm not imported: timm is imported from inside their own import.
    "models-first": ("import convmixer_timm.models.checkpoint", {"CONVMIXER_TIMM_AUTOLOAD": "0"}),
    # Autoload off: timm first, then the package registers at once.
    # (A snapshot of plain timm is taken in between, for the attribute test below.)
    "autoload-off-timm-then-package": (_SNAPSHOT_DEF + textwrap.dedent("""
        import timm
        _snapshot("PLAIN_SNAPSHOT")
        import convmixer_timm
    """), {"CONVMIXER_TIMM_AUTOLOAD": "0"}),
    # What `python -m convmixer_timm --help` runs.
    "module-run": (textwrap.dedent("""
        import runpy, sys
        sys.argv = ["convmixer_timm", "--help"]
        try:
            runpy.run_module("convmixer_timm", run_name="__main__", alter_sys=True)
        except SystemExit:
            pass
    """), {}),
    # The speed layer imports no timm; importing timm afterwards registers.
    "speed-layer-first": (textwrap.dedent("""
        import sys
        from convmixer_timm.speed import kernel_info, optimize_for_inference
        assert "timm" not in sys.modules, "the speed layer imported timm"
    """), {}),
}


_SNAPSHOTTED = ("hook-then-timm", "autoload-off-timm-then-package")


@functools.cache
def _run_mechanism(mechanism: str) -> subprocess.CompletedProcess:
    first, env = _MECHANISMS[mechanism]
    env = dict(env)
    flags = (env.pop("__flags__"),) if "__flags__" in env else ()
    after = ""
    if mechanism in _SNAPSHOTTED:  # the other defines _snapshot before timm is imported
        after = (_SNAPSHOT_DEF if mechanism == "hook-then-timm" else "") + _SNAPSHOT_AFTER
    return _python(first + "\n" + _CHECK_REGISTERED + after, env=env, flags=flags)


@pytest.mark.parametrize("mechanism", list(_MECHANISMS))
@pytest.mark.slow
def test_every_mechanism_registers_every_model(mechanism):
    result = _run_mechanism(mechanism)
    assert result.returncode == 0 and "REGISTERED 9" in result.stdout, result.stderr[-3000:]
    assert "could not register" not in result.stderr, result.stderr[-3000:]


def _snapshot(result: subprocess.CompletedProcess, label: str) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith(label + " ")]
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.slow
def test_no_attribute_of_timm_is_replaced_by_registration():
    """Every attribute of timm's modules after registration (by the start-up hook inside timm's import, or by an
    explicit import of the package after a plain ``import timm``) is what the plain import had; new attributes may
    only be timm's own submodules. The snapshots come from the two mechanisms' processes above."""
    explicit = _run_mechanism("autoload-off-timm-then-package")
    plain = _snapshot(explicit, "PLAIN_SNAPSHOT")
    for registered in (_snapshot(explicit, "REGISTERED_SNAPSHOT"),
                       _snapshot(_run_mechanism("hook-then-timm"), "REGISTERED_SNAPSHOT")):
        for module, attributes in plain.items():
            now = registered[module]
            changed = {a: (v, now.get(a)) for a, v in attributes.items() if now.get(a) != v}
            assert not changed, (module, changed)
            added = {a: v for a, v in now.items() if a not in attributes}
            assert all(v[0] == "module" and v[1].startswith("timm.") for v in added.values()), (module, added)


# -- a failing registration never breaks timm ----------------------------------------------------------------------

_BREAK = {
    "models-unimportable": ("sys.modules['convmixer_timm.models'] = None", "ModuleNotFoundError"),
    # Raised from inside the models' own import, as a timm that moved a name the module reads would.
    "error-inside-the-models": (textwrap.dedent("""
        import types
        broken = types.ModuleType("convmixer_timm.models.pretrained")
        def __getattr__(name):
            if name == "check_pretrained_available":
                raise RuntimeError("simulated failure inside registration")
            raise AttributeError(name)
        broken.__getattr__ = __getattr__
        sys.modules["convmixer_timm.models.pretrained"] = broken
    """), "RuntimeError"),
}

_AFTER_BREAK = textwrap.dedent("""
    import timm
    from timm.models import model_entrypoint
    assert sorted(timm.list_models("convmixer*")) == {builtins}, timm.list_models("convmixer*")
    assert all(model_entrypoint(n).__module__ == "timm.models.convmixer" for n in {builtins})
    assert type(timm.create_model("convmixer_768_32")).__module__ == "timm.models.convmixer"
    timm.create_model("resnet18")
    print("TIMM WORKS", flush=True)
    try:
        import convmixer_timm.models
    except Exception as error:
        print("EXPLICIT IMPORT RAISES", type(error).__name__, error)
""").format(builtins=sorted(TIMM_BUILTINS))


@pytest.mark.parametrize("failure", list(_BREAK))
@pytest.mark.slow
def test_a_failing_registration_leaves_timm_working_with_one_warning(failure):
    breaker, error_type = _BREAK[failure]
    result = _python("import sys\n" + breaker + "\n" + _AFTER_BREAK)
    assert result.returncode == 0 and "TIMM WORKS" in result.stdout, result.stderr[-3000:]
    assert f"EXPLICIT IMPORT RAISES {error_type}" in result.stdout, result.stdout
    warnings = [line for line in result.stderr.splitlines() if "RegistrationWarning" in line]
    assert len(warnings) == 1, result.stderr
    (warning,) = warnings
    assert warning.startswith("<string>:"), warning  # points at the program's `import timm`
    assert f"({error_type}: " in warning and "could not register" in warning
    assert "pip install --force-reinstall convmixer-timm" in warning and "CONVMIXER_TIMM_AUTOLOAD=0" in warning


def test_a_registration_failing_part_way_gives_timm_its_models_back(monkeypatch):
    real_register = ours.register_model
    last = VARIANTS[-1].name

    def fail_on_the_last(entrypoint):
        if entrypoint.__name__ == last:
            raise RuntimeError("simulated")
        return real_register(entrypoint)

    monkeypatch.setattr(ours, "register_model", fail_on_the_last)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            ours._register_all()
        assert all(model_entrypoint(n).__module__ == "timm.models.convmixer" for n in TIMM_BUILTINS)
    finally:
        monkeypatch.undo()
        ours._register_all()
    assert all(model_entrypoint(v.name).__module__ == ours.__name__ for v in VARIANTS)
    assert type(timm.create_model("convmixer_768_32", dim=8, depth=1)) is ours.ConvMixer


# -- concurrent imports, a retried import of timm -----------------------------------------------------------------

_RACES_AND_RETRY = textwrap.dedent("""
    import json, sys, threading
    from convmixer_timm import _autoload  # standard library only: the first round starts with nothing imported

    def owner():
        try:
            import timm.models
            return timm.models.model_entrypoint("convmixer_768_32").__module__
        except BaseException as error:
            return repr(error)

    def forget_timm():
        # A fresh start for the next round: timm and our models imported again, the finder back in place.
        for name in list(sys.modules):
            if name == "timm" or name.startswith(("timm.", "convmixer_timm.models")):
                del sys.modules[name]
        _autoload.install()

    def race(first, second):
        barrier, errors = threading.Barrier(2), []
        def run(name):
            barrier.wait()
            try:
                __import__(name)
            except BaseException as error:
                errors.append(f"{name}: {type(error).__name__}: {error}")
        threads = [threading.Thread(target=run, args=(name,)) for name in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return dict(errors=errors, owner=owner())

    rounds = []
    for i in range(4):
        pair = ["timm.models", "convmixer_timm.models.convmixer"]
        rounds.append(race(*(pair if i % 2 == 0 else pair[::-1])))
        forget_timm()

    sys.modules["timm.layers"] = None  # timm's first import fails...
    try:
        import timm
        first = "imported"
    except ImportError as error:
        first = type(error).__name__
    del sys.modules["timm.layers"]  # ...and the program retries
    import timm
    print(json.dumps(dict(rounds=rounds, first=first, retry_owner=owner())))
""")


@pytest.fixture(scope="module")
def races_and_retry() -> dict:
    result = _python(_RACES_AND_RETRY)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_concurrent_imports_of_timm_and_the_models_register(races_and_retry):
    for round_ in races_and_retry["rounds"]:
        assert round_ == dict(errors=[], owner="convmixer_timm.models.convmixer"), round_


@pytest.mark.slow
def test_a_retried_import_of_timm_registers(races_and_retry):
    assert races_and_retry["first"] == "ModuleNotFoundError"  # timm.layers could not be imported
    assert races_and_retry["retry_owner"] == "convmixer_timm.models.convmixer"


@pytest.mark.slow
def test_importing_the_package_registers_with_timm_when_timm_loads():
    """Lazy package import: nothing heavy at `import convmixer_timm`, models registered as timm loads. With
    transformers' ``is_timm_available`` probe (``find_spec``) before and after, which must not import timm."""
    code = textwrap.dedent("""
        import importlib.util, sys
        assert importlib.util.find_spec("timm") is not None and "timm" not in sys.modules
        import convmixer_timm
        assert "torch" not in sys.modules, "torch imported"
        assert importlib.util.find_spec("timm") is not None and "timm" not in sys.modules
        import timm
        print("convmixer_256_8_ks5_p2" in timm.list_models(), convmixer_timm.ConvMixer.__module__,
              convmixer_timm.__version__)
    """)
    env = {**os.environ, "CONVMIXER_TIMM_AUTOLOAD": "0", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "convmixer_timm.models.convmixer", "0.1.0"]

"""The test session leaves the developer's home folder alone (``conftest.py``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from isolation import TELEMETRY_OFF, prepare_home

# An onnxruntime session and OpenVINO compiling a one-node graph: each wrote telemetry to the home folder.
RUNTIMES = """
import os, tempfile
import onnx, onnx.helper as h, numpy as np
graph = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [h.make_tensor_value_info("x", 1, [2])],
                     [h.make_tensor_value_info("y", 1, [2])])
model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
import onnxruntime
session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
print(session.run(None, {"x": np.array([-1, 2], dtype=np.float32)})[0].tolist())
import openvino
with tempfile.TemporaryDirectory() as tmp:
    onnx.save(model, os.path.join(tmp, "m.onnx"))
    core = openvino.Core()
    compiled = core.compile_model(core.read_model(os.path.join(tmp, "m.onnx")), "CPU")
print(compiled(np.array([-1, 2], dtype=np.float32))[0].tolist())
"""


def test_the_session_runs_in_a_home_folder_of_its_own(user_env):
    assert Path.home() != Path(user_env.get("HOME", "/nonexistent"))
    assert Path.home().name.startswith("convmixer-timm-tests-home-")


def test_onnxruntime_and_openvino_write_nothing_to_the_home_folder(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    home = tmp_path / "home"
    prepare_home(home)
    before = sorted(p.relative_to(home).as_posix() for p in home.rglob("*"))
    env = {**os.environ, "HOME": str(home)}  # the session's settings, in a fresh home folder
    done = subprocess.run([sys.executable, "-c", RUNTIMES], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["[0.0, 2.0]", "[0.0, 2.0]"]
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == before


# What backend="auto" does in a user's program: import both runtimes, race them, serve a call.
AUTO = """
import os, sys, torch
from convmixer_timm import ConvMixer
from convmixer_timm.speed import installed_runtimes, optimize_for_inference
model = ConvMixer(8, 1, 3, 2, num_classes=3).eval()
with torch.no_grad():
    out = optimize_for_inference(model)(torch.randn(2, 3, 8, 8))
print(sorted(installed_runtimes()), sorted(name for name in ("onnxruntime", "openvino") if name in sys.modules),
      os.environ.get("ORT_DISABLE_TELEMETRY"), os.environ.get("CI"))
"""


@pytest.mark.slow
def test_optimize_for_inference_with_the_runtimes_writes_nothing_to_an_empty_home(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    home = tmp_path / "home"
    home.mkdir()  # empty: no consent file, and none of the session's telemetry switches below
    env = {key: value for key, value in os.environ.items()
           if key not in (*TELEMETRY_OFF, "CI", "TF_BUILD", "JENKINS_URL")}
    env.update(HOME=str(home), CONVMIXER_TIMM_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", AUTO], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runtimes = "['onnxruntime', 'openvino']"
    assert done.stdout.split("\n")[0] == f"{runtimes} {runtimes} None None"  # imported; switches put back
    assert not list(home.rglob("*"))


# int8 with NNCF (OpenVINO's quantizer, which reports its own usage through openvino_telemetry).
NNCF_INT8 = """
import os, sys, torch
from convmixer_timm import ConvMixer
from convmixer_timm.speed.lowp import LowPrecisionConvMixer
model = ConvMixer(8, 1, 3, 2, num_classes=3).eval()
tuned = LowPrecisionConvMixer(model, "int8", [torch.randn(4, 3, 8, 8)], runtimes=("openvino",), cache_dir=None)
runner = tuned._foreign_builders()["openvino nncf int8 latency"](tuned.plain, (4, 3, 8, 8), True)
with torch.no_grad():
    out = runner(torch.randn(4, 3, 8, 8))
print(list(out.shape), "nncf" in sys.modules, os.environ.get("NNCF_CI"), os.environ.get("CI"))
"""


@pytest.mark.slow
def test_int8_with_nncf_writes_nothing_to_an_empty_home(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key not in (*TELEMETRY_OFF, "CI", "TF_BUILD", "JENKINS_URL", "NNCF_CI", "NNCF_DEV")}
    env.update(HOME=str(home), CONVMIXER_TIMM_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", NNCF_INT8], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().split("\n")[-1] == "[4, 3] True None None"  # quantized and run; switches put back
    assert not list(home.rglob("*"))


CHECK_ONNX = """
import sys, torch
from convmixer_timm import ConvMixer
from convmixer_timm.export import check_onnx, export_onnx
model = ConvMixer(8, 1, 3, 2, num_classes=3).eval()
print(check_onnx(model, export_onnx(model, sys.argv[1], (3, 8, 8)), torch.randn(2, 3, 8, 8)) < 1e-4)
"""


@pytest.mark.slow
def test_check_onnx_writes_nothing_to_an_empty_home(tmp_path):
    pytest.importorskip("onnxruntime")
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in TELEMETRY_OFF}
    env.update(HOME=str(home))
    done = subprocess.run([sys.executable, "-c", CHECK_ONNX, str(tmp_path / "m.onnx")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "True"
    assert not list(home.rglob("*"))

"""Hugging Face Hub round trips against ``LocalHub``, a real HTTP server on 127.0.0.1 speaking the Hub API.

Covers: ``pretrained=True`` downloading the weights a variant's pretrained config names; ``hf-hub:`` round trips
of folders pushed by ``convmixer-timm push`` and by timm's own ``push_to_hf_hub``; and the failures users meet
(a download cut midway, a missing repo, a server that is down, no token, a folder that does not load), each
with a clear error, no corrupt cache entry, and a retry that then succeeds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from hub_env import hub_env_vars, hub_environment
from hub_server import LocalHub
from huggingface_hub import HfApi
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
from torch import nn

from convmixer_timm import cli
from convmixer_timm.hub import save_hub_folder
from convmixer_timm.models.variants import VARIANTS_BY_NAME

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR = "convmixer_256_8_ks5_p2"
TOKEN = "local-test-token"


def randomise(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator) * 0.05
                tensor.copy_(noise.abs() + 0.5 if name.endswith(("running_var", "bn.weight")) else noise)
    return model.eval()


def small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return randomise(timm.create_model(CIFAR, dim=32, depth=2), seed)


def images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(321))


def assert_same_model(expected: nn.Module, actual: nn.Module, size: int = 32) -> None:
    actual_state = actual.state_dict()
    for key, tensor in expected.state_dict().items():
        assert torch.equal(actual_state[key], tensor), key
    x = images(1 if size > 32 else 2, size)
    with torch.inference_mode():
        assert torch.equal(actual.eval()(x), expected.eval()(x))


def cached_files(cache: Path, repo_id: str) -> dict[str, list[str]]:
    """What the huggingface_hub cache holds for one repo: complete blobs, partial downloads, snapshot files."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    blobs = sorted(p.name for p in (folder / "blobs").glob("*")) if (folder / "blobs").is_dir() else []
    snapshots = sorted(str(p.relative_to(folder / "snapshots")) for p in (folder / "snapshots").rglob("*")
                       if not p.is_dir()) if (folder / "snapshots").is_dir() else []
    return {"blobs": [b for b in blobs if not b.endswith(".incomplete")],
            "partial": [b for b in blobs if b.endswith(".incomplete")], "snapshots": snapshots}


def seed_folder(hub: LocalHub, repo_id: str, model: nn.Module, tmp_path: Path) -> None:
    folder = save_hub_folder(model, tmp_path / repo_id.replace("/", "_"), CIFAR)
    hub.add_files(repo_id, {p.name: p.read_bytes() for p in folder.iterdir()})


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    # Any token is "me": the server creates repos only in the caller's own namespace, as the Hub does.
    with LocalHub(tmp_path_factory.mktemp("hub"), username="me") as server:
        yield server


@pytest.fixture()
def env(hub, tmp_path):
    hub.clear_faults()
    with hub_environment(hub.endpoint, tmp_path / "hf_home", token=TOKEN) as environment:
        yield environment


# A server that is down makes huggingface_hub retry with back-off (about 23 s per file) before it gives up, so
# that check runs in a separate process from the start of this module while the other tests run.
_DOWN_SCRIPT = textwrap.dedent("""
    import json, sys, timm
    try:
        timm.create_model("hf-hub:org/down", pretrained=True)
    except Exception as exc:
        print(json.dumps({"type": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
                          "message": str(exc)}))
        sys.exit(1)
    print(json.dumps({"type": None}))
""")


@pytest.fixture(scope="module")
def server_down_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("down")
    dead = LocalHub(root / "server").start()
    endpoint, port = dead.endpoint, dead.port
    dead.stop()
    home = root / "hf_home"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    environ.update(hub_env_vars(endpoint, home, TOKEN))
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    process = subprocess.Popen([sys.executable, "-c", _DOWN_SCRIPT], env=environ, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    yield dict(process=process, endpoint=endpoint, port=port, home=home, root=root)
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module", autouse=True)
def _start_server_down_early(request):
    """Starts the server-down process (it waits out retries) before the first test of this module, where the
    session runs the test that reads it."""
    if any(item.name == "test_server_down_gives_clear_errors_and_a_retry_succeeds" for item in request.session.items):
        request.getfixturevalue("server_down_run")


# ---------------------------------------------------------------------------------------------------- downloads


def test_pretrained_true_downloads_the_weights_its_config_names(hub, env):
    variant = VARIANTS_BY_NAME["convmixer_768_32"]
    torch.manual_seed(0)
    published = timm.create_model(variant.name).eval()  # full size: 21M random parameters, 85 MB
    assert sum(p.numel() for p in published.parameters()) == variant.param_count()
    assert published.pretrained_cfg["hf_hub_id"] == variant.hf_hub_id == "timm/convmixer_768_32.in1k"
    data = safetensors.torch.save({k: v.contiguous() for k, v in published.state_dict().items()})
    hub.add_file(variant.hf_hub_id, "model.safetensors", data)

    downloaded = timm.create_model(variant.name, pretrained=True)
    # Every tensor bit-equal, and one forward (at 64 px: 224 px costs ~4 s per pass on two shared cores).
    assert_same_model(published, downloaded, size=64)
    assert any(r.method == "GET" and r.path.endswith(f"/{variant.hf_hub_id}/resolve/main/model.safetensors")
               for r in hub.requests)
    assert cached_files(env.hub_cache, variant.hf_hub_id)["snapshots"][0].endswith("/model.safetensors")


def test_download_cut_midway_is_resumed_and_correct(hub, env, tmp_path):
    model = small_model(1)
    seed_folder(hub, "org/cut-once", model, tmp_path)
    hub.fail_midway("model.safetensors", repo_id="org/cut-once")
    loaded = timm.create_model("hf-hub:org/cut-once", pretrained=True)
    assert_same_model(model, loaded)
    path = "/org/cut-once/resolve/main/model.safetensors"
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith(path)]
    assert len(gets) == 2, "one cut download, then one resumed by huggingface_hub"


def test_download_reset_midway_fails_clearly_and_leaves_no_corrupt_cache(hub, env, tmp_path):
    model = small_model(2)
    seed_folder(hub, "org/reset", model, tmp_path)
    hub.fail_midway("model.safetensors", repo_id="org/reset", reset=True)
    with pytest.raises(Exception) as info:
        timm.create_model("hf-hub:org/reset", pretrained=True)
    # huggingface_hub 2.4 lets the transport error through unwrapped: httpx2.ReadError, errno 104.
    assert type(info.value).__name__ == "ReadError" and "Connection reset by peer" in str(info.value)
    state = cached_files(env.hub_cache, "org/reset")
    assert not any(s.endswith("model.safetensors") for s in state["snapshots"]), state

    loaded = timm.create_model("hf-hub:org/reset", pretrained=True)  # the retry after the fault
    assert_same_model(model, loaded)
    assert cached_files(env.hub_cache, "org/reset")["partial"] == []


def test_missing_repo_is_a_clear_error_and_caches_nothing(hub, env):
    with pytest.raises(RepositoryNotFoundError, match="Repository Not Found") as info:
        timm.create_model("hf-hub:org/no-such-model", pretrained=True)
    assert "org/no-such-model" in str(info.value)
    assert cached_files(env.hub_cache, "org/no-such-model") == {"blobs": [], "partial": [], "snapshots": []}
    # Also through pretrained=True on a variant whose Hub repo is absent from this server.
    with pytest.raises(RepositoryNotFoundError, match=r"timm/convmixer_1536_20\.in1k"):
        timm.create_model("convmixer_1536_20", pretrained=True)


# ---------------------------------------------------------------------------------------------------- push


def test_cli_push_round_trips_bit_identical(hub, env, tmp_path, capsys):
    model = small_model(3)
    folder = save_hub_folder(model, tmp_path / "folder", CIFAR, metrics={"top1": 91.5, "dataset": "cifar-10"})
    assert cli.main(["push", str(folder), "--repo-id", "me/pushed", "--private"]) == 0
    out = capsys.readouterr().out
    assert 'timm.create_model("hf-hub:me/pushed", pretrained=True)' in out
    assert {"README.md", "config.json", "model.safetensors"} <= set(hub.list_files("me/pushed"))
    assert HfApi().model_info("me/pushed").private is True
    card = hub.read_file("me/pushed", "README.md").decode()
    assert yaml.safe_load(card.split("---\n")[1])["library_name"] == "timm"

    assert_same_model(model, timm.create_model("hf-hub:me/pushed", pretrained=True))

    # A second push to an existing branch; the first version stays on main.
    newer = small_model(4)
    save_hub_folder(newer, folder, CIFAR, overwrite=True)
    hub.create_branch("me/pushed", "dev")
    assert cli.main(["push", str(folder), "--repo-id", "me/pushed", "--revision", "dev",
                     "--commit-message", "newer weights"]) == 0
    assert_same_model(newer, timm.create_model("hf-hub:me/pushed@dev", pretrained=True))
    assert_same_model(model, timm.create_model("hf-hub:me/pushed", pretrained=True))


def test_timm_push_to_hf_hub_round_trips_bit_identical(hub, env):
    model = small_model(5)
    timm.models.push_to_hf_hub(model, "me/via-timm", safe_serialization=True)
    assert_same_model(model, timm.create_model("hf-hub:me/via-timm", pretrained=True))


_TRANSFORMERS_FROM_HUB = textwrap.dedent("""
    import json, sys
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    repo_id = sys.argv[1]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    model = AutoModelForImageClassification.from_pretrained(repo_id).eval()
    pixels = AutoImageProcessor.from_pretrained(repo_id)(image, return_tensors="pt")["pixel_values"]
    top = pipeline("image-classification", model=repo_id)(image, top_k=3)
    print(json.dumps({"logits": model(pixel_values=pixels).logits.tolist(), "pixels": pixels.tolist(),
                      "id2label": model.config.id2label, "top": top,
                      "registered_by_hook": "convmixer_timm.models" in sys.modules}))
""")


@pytest.mark.slow
def test_pushed_folder_loads_in_transformers_from_the_hub(hub, env, tmp_path):
    """A user's script: transformers alone, the repo id, the Hub (here the local one) named by HF_ENDPOINT.

    transformers calls timm.create_model(architecture): the start-up hook registered the models on timm's import.
    """
    model = small_model(11)
    folder = save_hub_folder(model, tmp_path / "folder", CIFAR, dataset="cifar-10")
    assert cli.main(["push", str(folder), "--repo-id", "me/for-transformers"]) == 0
    environ = {k: v for k, v in os.environ.items() if k != "CONVMIXER_TIMM_AUTOLOAD"}  # HF_* from hub_environment
    done = subprocess.run([sys.executable, "-c", _TRANSFORMERS_FROM_HUB, "me/for-transformers"], env=environ,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["registered_by_hook"], "transformers got the model without convmixer_timm being imported?"
    names = json.loads((folder / "config.json").read_text())["label_names"]
    assert [result["id2label"][str(i)] for i in range(10)] == names
    with torch.no_grad():
        expected = model(torch.tensor(result["pixels"]))
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=0,
                               atol=1e-6 * float(expected.abs().max()))
    assert [r["label"] for r in result["top"]] == [names[i] for i in expected[0].softmax(-1).topk(3).indices]
    # Downloaded from this server (transformers pins the revision it resolved first to a commit).
    assert any(r.method == "GET" and r.path.startswith("/me/for-transformers/resolve/")
               and r.path.endswith("/model.safetensors") for r in hub.requests)


def test_push_refuses_a_folder_transformers_cannot_load(hub, env, tmp_path, capsys):
    folder = save_hub_folder(small_model(12), tmp_path / "old-style", CIFAR)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["num_classes"] = 10  # as timm's save_for_hf writes it
    (folder / "config.json").write_text(json.dumps(config))
    assert cli.main(["push", str(folder), "--repo-id", "me/old-style"]) == 1
    err = capsys.readouterr().err
    assert "repeats num_classes in model_args" in err and "transformers cannot load it" in err
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("me/old-style")  # nothing was created


@pytest.mark.slow
def test_push_subprocess_takes_endpoint_and_token_from_environment(hub, env, tmp_path):
    model = small_model(6)
    folder = save_hub_folder(model, tmp_path / "folder", CIFAR)
    environ = dict(os.environ)  # hub_environment exported HF_ENDPOINT and HF_TOKEN
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "convmixer_timm", "push", str(folder), "--repo-id", "me/sub"],
                            env=environ, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert hub.last_authorization == f"Bearer {TOKEN}"
    assert_same_model(model, timm.create_model("hf-hub:me/sub", pretrained=True))


def test_push_refuses_a_folder_that_does_not_load(hub, env, tmp_path, capsys):
    folder = save_hub_folder(small_model(7), tmp_path / "broken", CIFAR)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert cli.main(["push", str(folder), "--repo-id", "me/broken"]) == 1
    assert "does not load with timm" in capsys.readouterr().err
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("me/broken")  # nothing was created

    assert cli.main(["push", str(tmp_path / "missing"), "--repo-id", "me/broken"]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_push_without_token_names_the_fix(hub, tmp_path, capsys):
    folder = save_hub_folder(small_model(8), tmp_path / "folder", CIFAR)
    with hub_environment(hub.endpoint, tmp_path / "no_token_home", token=None):
        assert cli.main(["push", str(folder), "--repo-id", "me/no-token"]) == 1
    err = capsys.readouterr().err
    assert "(401)" in err and "no token was found" in err and "HF_TOKEN" in err

    # --endpoint and --token override the environment (here: a default endpoint where nothing listens).
    with hub_environment("http://127.0.0.1:9", tmp_path / "no_token_home", token=None):
        assert cli.main(["push", str(folder), "--repo-id", "me/flags", "--endpoint", hub.endpoint,
                         "--token", "flag-token"]) == 0
    assert hub.last_authorization == "Bearer flag-token"
    assert "model.safetensors" in hub.list_files("me/flags")


# ---------------------------------------------------------------------------------------------------- server down


@pytest.mark.slow  # waits out huggingface_hub's retries
def test_server_down_gives_clear_errors_and_a_retry_succeeds(server_down_run, tmp_path, capsys):
    run = server_down_run
    # push fails at once, naming the endpoint.
    folder = save_hub_folder(small_model(9), tmp_path / "folder", CIFAR)
    with hub_environment(run["endpoint"], run["root"] / "push_home", token=TOKEN):
        assert cli.main(["push", str(folder), "--repo-id", "me/down"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the Hub at {run['endpoint']}" in err and "HF_ENDPOINT" in err

    # A download with nothing cached gives up after huggingface_hub's retries (in the process started early).
    stdout, stderr = run["process"].communicate(timeout=240)
    assert run["process"].returncode == 1, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["type"] == LocalEntryNotFoundError.__name__
    assert "cannot find the requested files in the local cache" in result["message"]
    assert "check your connection" in result["message"]
    cache = run["home"] / "hub"
    assert cached_files(cache, "org/down") == {"blobs": [], "partial": [], "snapshots": []}

    # The server comes back on the same address: the same cache now fills correctly.
    model = small_model(10)
    with LocalHub(run["root"] / "server", port=run["port"]) as back, \
            hub_environment(back.endpoint, run["home"], token=TOKEN):
        seed_folder(back, "org/down", model, tmp_path)
        assert_same_model(model, timm.create_model("hf-hub:org/down", pretrained=True))

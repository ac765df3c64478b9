"""Framework integrations (issue 3): the vLLM loader plugin, transformers, `python -m client snapshot`.

Real agents (run in this process: ``inproc_factory``), a real S3 server and the real
all-MiniLM-L6-v2 model. The
vLLM plugin's own logic (extra config, snapshot -> reference, the weights
iterator) runs here without vLLM; the one test that starts a real vLLM engine is
marked ``vllm`` and runs when vLLM imports in this Python or when
``WARMSTART_VLLM_PYTHON`` names a Python that has vLLM and warmstart installed
(README, "Integrations").
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import client
from client import vllm_plugin
from client.transport import DEFAULT_TIMEOUT
from client.vllm_plugin import LoaderConfigError, LoaderSettings

MODEL_FILE = "model.safetensors"
SENTENCES = ["hello world", "warm starts are fast", "a GPU node pulls tens of gigabytes of weights"]


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def client_cli(*args: str, socket: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "WARMSTART_SOCKET"}
    if socket is not None:
        env["WARMSTART_SOCKET"] = str(socket)
    return subprocess.run([sys.executable, "-m", "client", *args], capture_output=True, text=True, timeout=120, env=env)


# ---------------------------------------------------------------------- importing without vLLM


def test_import_pulls_in_neither_vllm_nor_torch() -> None:
    proc = run_python(
        """
        import sys
        import client.vllm_plugin
        print(sorted(m for m in ("vllm", "torch") if m in sys.modules))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_register_without_vllm_is_a_clear_import_error() -> None:
    # sys.modules["vllm"] = None makes `import vllm` fail as if it were not installed.
    proc = run_python(
        """
        import sys
        sys.modules["vllm"] = None
        import client.vllm_plugin as plugin
        try:
            plugin.register()
        except ImportError as exc:
            print("ImportError:", exc)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ImportError:") and "vLLM, which is not installed" in proc.stdout


def test_entry_point_is_registered_for_vllm() -> None:
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "warmstart"]
    assert ep.value == "client.vllm_plugin:register"
    assert ep.load() is vllm_plugin.register


# ---------------------------------------------------------------------- extra config


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"reff": "s3://models/x"}, "unknown key(s) reff; known: ref, socket, timeout, device"),
        ({"ref": 7}, "'ref' must be a model reference string"),
        ({"ref": ""}, "'ref' must be a model reference string"),
        ({"ref": "models/minilm"}, "is not a model reference: use s3://"),
        ({"ref": "gopher://host/x"}, "is not a model reference"),
        ({"ref": "s3://models/x", "timeout": 0}, "'timeout' must be a positive number"),
        ({"ref": "s3://models/x", "timeout": True}, "'timeout' must be a positive number"),
        ({"ref": "s3://models/x", "timeout": "30"}, "'timeout' must be a positive number"),
        ({"ref": "s3://models/x", "timeout": float("nan")}, "'timeout' must be a positive number"),
        ({"ref": "s3://models/x", "socket": ""}, "'socket' must be the agent's socket path"),
        ({"ref": "s3://models/x", "device": "gpu7"}, "'device' 'gpu7' is not a torch device"),
        ({"ref": "s3://models/x", "device": 0}, "'device' must be a torch device string"),
        ('{"ref": ', "is not valid JSON"),
        (["s3://models/x"], "must be a JSON object, got list"),
    ],
)
def test_bad_extra_config_names_the_key(extra: Any, says: str) -> None:
    with pytest.raises(LoaderConfigError) as info:
        vllm_plugin.parse_extra_config(extra)
    assert says in str(info.value)
    assert str(info.value).startswith("--load-format warmstart: --model-loader-extra-config")
    assert isinstance(info.value, ValueError)  # what vLLM's own loaders raise for a bad extra config


def test_good_extra_config() -> None:
    assert vllm_plugin.parse_extra_config(None) == {}
    assert vllm_plugin.parse_extra_config({}) == {}
    assert vllm_plugin.parse_extra_config("") == {}
    full = {"ref": "hf://org/name@main", "socket": "/run/ws.sock", "timeout": 5, "device": "cuda:1"}
    assert vllm_plugin.parse_extra_config(full) == {**full, "timeout": 5.0}
    assert vllm_plugin.parse_extra_config(json.dumps({"ref": "/models/llama"})) == {"ref": "/models/llama"}
    settings = vllm_plugin.resolve_settings({"ref": "s3://models/x"}, "org/some-hub-id")
    assert settings == LoaderSettings(ref="s3://models/x", socket=None, timeout=DEFAULT_TIMEOUT, device="cpu")


def test_no_ref_and_no_snapshot_says_how_to_give_one(tmp_path: Path) -> None:
    for model in (str(tmp_path), "org/hub-id", None):
        with pytest.raises(LoaderConfigError) as info:
            vllm_plugin.resolve_settings({}, model)
        message = str(info.value)
        assert "does not know which model to read" in message
        assert "python -m client snapshot REF" in message and '{"ref": ' in message


def fake_snapshot(root: Path, manifest: Any, key: str = "s3--models--x--0123456789", rev: str = "abc123") -> Path:
    snap = root / "snapshots" / key / rev
    snap.mkdir(parents=True)
    if manifest is not None:
        (root / "manifests" / key).mkdir(parents=True)
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        (root / "manifests" / key / f"{rev}.json").write_text(text)
    return snap


def test_snapshot_manifest_problems_are_clear(tmp_path: Path) -> None:
    assert vllm_plugin.ref_from_snapshot(fake_snapshot(tmp_path / "a", None)) is None  # not made by an agent
    ok = fake_snapshot(tmp_path / "b", {"ref": "s3://models/x", "revision": "abc123", "files": []})
    assert vllm_plugin.ref_from_snapshot(ok) == "s3://models/x@abc123"
    assert vllm_plugin.ref_from_snapshot(f"{ok}/") == "s3://models/x@abc123"
    for manifest, says in [
        ("{not json", "is not valid"),
        ({"ref": "s3://models/x"}, "no 'ref' and 'revision'"),
        ([1, 2], "is not valid"),
        ({"ref": "s3://models/x", "revision": "other"}, "is of revision 'other', not 'abc123'"),
    ]:
        snap = fake_snapshot(tmp_path / f"c{len(says)}{type(manifest).__name__}", manifest)
        with pytest.raises(LoaderConfigError, match="manifest") as info:
            vllm_plugin.ref_from_snapshot(snap)
        assert says in str(info.value) and str(snap) in str(info.value)


def test_unloaded_parameters_mirrors_vllm_exemptions() -> None:
    class Method:
        def process_weights_after_loading(self, layer: Any) -> None:
            pass

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    model[0].quant_method = Method()  # type: ignore[assignment]
    assert vllm_plugin.unloaded_parameters(model, set()) == {"1.weight", "1.bias"}
    assert vllm_plugin.unloaded_parameters(model, {"1.weight", "1.bias"}) == set()


# ---------------------------------------------------------------------- through a real agent


def test_weights_iterator_is_bit_exact(inproc_factory: Any, s3_model: Any) -> None:
    agent = inproc_factory()
    settings = vllm_plugin.resolve_settings({"ref": s3_model.ref, "socket": str(agent.socket_path)}, "org/hub-id")
    names = []
    got = {}
    for name, tensor in vllm_plugin.weights(settings):  # cold: the agent fetches from S3 first
        names.append(name)
        got[name] = tensor
    assert len(names) == len(set(names))
    assert_bit_exact(got, load_file(str(s3_model.local_dir / MODEL_FILE)))


def test_snapshot_dir_names_its_pinned_ref(inproc_factory: Any, s3_model: Any) -> None:
    agent = inproc_factory()
    snap = client.snapshot(s3_model.ref, socket=str(agent.socket_path))
    ref = vllm_plugin.ref_from_snapshot(snap)
    assert ref == f"{s3_model.ref}@{os.path.basename(snap)}"
    settings = vllm_plugin.resolve_settings({"socket": str(agent.socket_path)}, snap)
    assert settings.ref == ref
    assert_bit_exact(dict(vllm_plugin.weights(settings)), load_file(str(s3_model.local_dir / MODEL_FILE)))


def test_client_cli_snapshot(inproc_factory: Any, s3_model: Any, tmp_path: Path) -> None:
    agent = inproc_factory()
    done = client_cli("snapshot", s3_model.ref, socket=agent.socket_path)
    assert done.returncode == 0, done.stderr
    path = done.stdout.strip()
    assert done.stdout == path + "\n" and path == client.snapshot(s3_model.ref, socket=str(agent.socket_path))
    assert (Path(path) / "config.json").read_bytes() == (s3_model.local_dir / "config.json").read_bytes()

    missing = client_cli("snapshot", "s3://models/no-such-prefix", socket=agent.socket_path)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1 and "nothing at" in missing.stderr

    nobody = tmp_path / "nobody.sock"
    down = client_cli("snapshot", s3_model.ref, "--timeout", "5", socket=nobody)
    assert down.returncode == 1 and str(nobody) in down.stderr

    usage = client_cli("snapshot")
    assert usage.returncode == 2 and "usage:" in usage.stderr


# ---------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def minilm_reference(minilm_dir: Path) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    """(tokenizer, inputs, last_hidden_state) from transformers loading the packaged model directly."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    inputs = dict(tokenizer(SENTENCES, return_tensors="pt", padding=True))
    model = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        return tokenizer, inputs, model(**inputs).last_hidden_state


def test_transformers_from_pretrained_snapshot(
    inproc_factory: Any, s3_model: Any, minilm_reference: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a directory load must not reach for a hub
    agent = inproc_factory()
    path = client.snapshot(s3_model.ref, socket=str(agent.socket_path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    _, inputs, want = minilm_reference
    assert dict(tokenizer(SENTENCES, return_tensors="pt", padding=True)).keys() == inputs.keys()
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, want)


def test_transformers_state_dict(inproc_factory: Any, s3_model: Any, minilm_reference: Any) -> None:
    from transformers import AutoConfig, AutoModel

    agent = inproc_factory()
    path = client.snapshot(s3_model.ref, socket=str(agent.socket_path))
    model = AutoModel.from_config(AutoConfig.from_pretrained(path))
    result = model.load_state_dict(client.open_tensors(s3_model.ref, socket=str(agent.socket_path)), strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys == ["embeddings.position_ids"]  # a buffer newer transformers no longer saves
    _, inputs, want = minilm_reference
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).last_hidden_state, want)


# ---------------------------------------------------------------------- a real vLLM engine

VLLM_SCRIPT = """
import json, sys
from vllm import LLM

if __name__ == "__main__":  # vLLM spawns its engine processes
    model, extra, sentences = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    llm = LLM(model=model, runner="pooling", load_format="warmstart", model_loader_extra_config=extra,
              dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    out = llm.embed(sentences)
    print("EMBEDDINGS " + json.dumps([o.outputs.embedding for o in out]), flush=True)
"""


def vllm_python() -> str | None:
    """A Python with vLLM: ``$WARMSTART_VLLM_PYTHON``, else this one if vLLM imports here, else None."""
    named = os.environ.get("WARMSTART_VLLM_PYTHON")
    if named:
        return named
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


@pytest.mark.vllm
@pytest.mark.timeout(600)
# Decided at collection, before the fixtures: skipping from the body cost the agent and the S3 model's setup (7.7 s).
@pytest.mark.skipif(
    vllm_python() is None,
    reason="vLLM is not installed here; set WARMSTART_VLLM_PYTHON to a Python that has vllm and warmstart",
)
def test_vllm_serves_embeddings_from_a_snapshot(
    inproc_factory: Any, s3_model: Any, minilm_reference: Any, tmp_path: Path
) -> None:
    python = vllm_python()
    assert python is not None
    check = subprocess.run(
        [python, "-c", "from importlib.metadata import entry_points as e;"
         "print([p.value for p in e(group='vllm.general_plugins') if p.name == 'warmstart'])"],
        capture_output=True, text=True, timeout=60,
    )
    assert check.stdout.strip() == "['client.vllm_plugin:register']", (
        f"{python} lacks warmstart's vLLM entry point; `pip install --no-deps -e .` there\n{check.stderr}"
    )
    agent = inproc_factory()
    snap = client_cli("snapshot", s3_model.ref, socket=agent.socket_path)
    assert snap.returncode == 0, snap.stderr
    script = tmp_path / "serve_embeddings.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "WARMSTART_SOCKET": str(agent.socket_path), "HF_HUB_OFFLINE": "1", "VLLM_PLUGINS": "warmstart"}
    proc = subprocess.run(
        [python, str(script), snap.stdout.strip(), "{}", json.dumps(SENTENCES)],
        capture_output=True, text=True, timeout=540, env=env, cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "warmstart: 104 tensors" in output  # our loader ran, not vLLM's own
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("EMBEDDINGS ")]
    got = torch.tensor(json.loads(line.removeprefix("EMBEDDINGS ")))

    # all-MiniLM-L6-v2's sentence-transformers pipeline: mean pooling over the mask, then L2 normalisation.
    _, inputs, hidden = minilm_reference
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)

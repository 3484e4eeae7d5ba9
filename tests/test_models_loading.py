"""Model loading: the conversion cache key, broken and pickle-only directories, the parity check,
dtype/device options on the CLI, placement and batch sizes. Tiny random models, private cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from replab_testutil import run_cli

from replab.errors import ReplabError
from replab.models.zoo import build_tiny as build


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    from replab.models import load_tokenizer

    load_tokenizer(None)                     # the tokenizer comes from the shared cache
    path = tmp_path / "cache"
    monkeypatch.setenv("REPLAB_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build("llama", tmp_path_factory.mktemp("llama") / "m")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    with torch.inference_mode():
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)(input_ids=ids).logits


def _one_line_cli_error(args, capsys, needle):
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.count("error:") == 1 and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and needle in err, err
    return err


def test_editing_config_json_reconverts(cache, llama_dir, tmp_path):
    """Issue 11, item 1: the cache was keyed on the weights only, so an edited config.json
    silently reused the old conversion."""
    from replab.models import load_model

    folder = _copy(llama_dir, tmp_path / "m")
    ids = torch.tensor([[5, 300, 4000, 22, 7, 90, 1000, 3]])
    first = load_model(str(folder), device="cpu")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = 500.0
    cfg["rms_norm_eps"] = 1e-2
    (folder / "config.json").write_text(json.dumps(cfg))
    second = load_model(str(folder), device="cpu")
    a, b = first.replab_identity, second.replab_identity
    assert a.weights_sha256 == b.weights_sha256 and a.config_sha256 != b.config_sha256
    with torch.inference_mode():
        old, new = first(ids), second(ids)
    assert float((old - new).abs().max()) > 1e-3                     # the edit changed the model
    torch.testing.assert_close(new, _hf_logits(folder, ids), atol=1e-4, rtol=0)
    assert len(list((cache / "models").iterdir())) == 2
    # formatting-only edits (key order, whitespace) keep the key
    (folder / "config.json").write_text(json.dumps(cfg, indent=4, sort_keys=True))
    assert load_model(str(folder), device="cpu").replab_identity.config_sha256 == b.config_sha256
    assert len(list((cache / "models").iterdir())) == 2


def test_tokenizer_files_are_part_of_the_key(cache, llama_dir, tmp_path):
    from replab.models.loading import local_cache_dir

    folder = _copy(llama_dir, tmp_path / "m")
    before, facts = local_cache_dir(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 77
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    after, facts2 = local_cache_dir(folder)
    assert before != after and facts["tokenizer_sha256"] != facts2["tokenizer_sha256"]
    assert facts["conversion_version"] == facts2["conversion_version"]


def test_truncated_safetensors_is_one_line(cache, llama_dir, tmp_path, capsys):
    from replab.models import load_model

    folder = _copy(llama_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReplabError, match="truncated") as err:
        load_model(str(folder), device="cpu")
    assert "model.safetensors" in str(err.value) and len(str(err.value).splitlines()) == 1
    _one_line_cli_error(["models", "info", "--model", folder], capsys, "truncated")
    weights.write_bytes(b"\x00" * 3)
    _one_line_cli_error(["models", "info", "--model", folder], capsys, "not a valid safetensors")
    assert not (cache / "models").exists() or not list((cache / "models").iterdir())


def test_invalid_config_json_is_one_line(cache, llama_dir, tmp_path, capsys):
    folder = _copy(llama_dir, tmp_path / "m")
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": ')
    _one_line_cli_error(["models", "info", "--model", folder], capsys, "invalid JSON")
    (folder / "config.json").write_text('{"hidden_size": 64}')
    _one_line_cli_error(["models", "info", "--model", folder], capsys, "architectures")
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    _one_line_cli_error(["models", "info", "--model", folder], capsys, "LlamaForCausalLM")
    assert not (cache / "models").exists() or not list((cache / "models").iterdir())


def _bin_only(llama_dir, folder):
    from safetensors.torch import load_file

    _copy(llama_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pickle_only_weights_refused_unless_allowed(cache, llama_dir, tmp_path, capsys):
    from replab.models import load_model

    folder = _bin_only(llama_dir, tmp_path / "bin")
    _one_line_cli_error(["models", "info", "--model", folder], capsys, "pickle")
    assert not (cache / "models").exists() or not list((cache / "models").iterdir())
    code, out, _ = run_cli(["models", "info", "--model", folder, "--allow-bin", "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["identity"]["parity"]["max_abs_logit_diff"] <= 1e-4
    # converted once: the cached safetensors conversion loads without the flag (no pickle read)
    ids = torch.tensor([[5, 300, 4000, 22]])
    model = load_model(str(folder), device="cpu")
    torch.testing.assert_close(model(ids), _hf_logits(llama_dir, ids), atol=1e-4, rtol=0)


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_allow_bin_never_runs_pickled_code(cache, llama_dir, tmp_path):
    from replab.models import load_model

    folder = _copy(llama_dir, tmp_path / "evil")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Evil(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ReplabError) as err:
        load_model(str(folder), device="cpu", allow_bin=True)
    assert len(str(err.value).splitlines()) == 1
    assert not marker.exists()


def test_damaged_cache_fails_the_parity_check(cache, llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from replab.models import load_model

    folder = _copy(llama_dir, tmp_path / "m")
    model = load_model(str(folder), device="cpu")
    assert model.replab_identity.parity["passed"]
    (entry,) = list((cache / "models").iterdir())
    state = load_file(str(entry / "model.safetensors"))
    state["blocks.1.mlp.W_out"] = state["blocks.1.mlp.W_out"] * 1.5
    save_file(state, str(entry / "model.safetensors"))
    with pytest.raises(ReplabError, match="parity check failed"):
        load_model(str(folder), device="cpu")


def test_parity_in_identity_and_artifacts_keep_only_its_stable_part(cache, llama_dir, tmp_path):
    from replab.models import load_model

    model = load_model(str(_copy(llama_dir, tmp_path / "m")), device="cpu", dtype="bfloat16")
    parity = model.replab_identity.parity
    assert parity["dtype"] == "bfloat16" and parity["device"] == "cpu"
    assert 0 < parity["max_abs_logit_diff"] <= parity["tolerance"]
    assert parity["conversion_max_abs_logit_diff"] <= 1e-4           # float32, at conversion
    recorded = model.replab_identity.to_dict()
    assert "device" not in recorded and "max_abs_logit_diff" not in recorded["parity"]
    assert recorded["parity"]["passed"] and recorded["config_sha256"]


def test_model_options_reach_every_model_running_command(capsys):
    import typer

    from replab.cli import app
    from replab.cli.models import TOKENIZER_ONLY

    root = typer.main.get_command(app)

    def walk(cmd, path=()):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, (*path, name))
        else:
            yield path, cmd

    n = 0
    for path, cmd in walk(root):
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        if "--model" in opts and path not in TOKENIZER_ONLY:
            assert {"--dtype", "--device"} <= opts, path
            n += 1
    assert n >= 20
    code, out, _ = run_cli(["models", "info", "--model", "tiny", "--dtype", "bfloat16", "--json"], capsys)
    assert code == 0 and json.loads(out)["identity"]["dtype"] == "bfloat16"
    _one_line_cli_error(["test-prompt", "Today it is Monday so tomorrow it is", "--model", "tiny",
                         "--dtype", "int8"], capsys, "int8")
    if not torch.cuda.is_available():
        _one_line_cli_error(["test-prompt", "Hi", "--model", "tiny", "--device", "cuda"], capsys, "CUDA")


def test_block_placement_matches_transformer_lens():
    from types import SimpleNamespace

    from transformer_lens.utilities.multi_gpu import get_device_for_block_index

    from replab.models.placement import block_devices

    for n_layers, n_devices in [(30, 2), (80, 4), (62, 8), (3, 4), (26, 3)]:
        plan = block_devices(n_layers, n_devices, "cuda")
        cfg = SimpleNamespace(n_layers=n_layers, device="cuda", n_devices=n_devices)
        assert plan == [str(get_device_for_block_index(i, cfg)) for i in range(n_layers)]
        assert plan == sorted(plan, key=lambda d: int(d.split(":")[1]))   # contiguous runs
        assert len(set(plan)) == min(n_layers, n_devices)
    assert block_devices(4, 2, "cuda:2") == ["cuda:2", "cuda:2", "cuda:3", "cuda:3"]
    assert block_devices(4, 3, "cpu") == ["cpu"] * 4


def test_placement_on_cpu_and_refusals(tiny):
    from replab.models import load_model
    from replab.models.placement import place

    ids = torch.tensor([[5, 300, 4000, 22]])
    model = load_model("tiny", device="cpu")
    place(model, 1, "cpu")
    torch.testing.assert_close(model(ids), tiny(ids))
    with pytest.raises(ReplabError, match="CUDA"):
        place(model, 2, "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ReplabError, match="CUDA"):
            load_model("tiny", device="cuda")
        with pytest.raises(ReplabError, match="CUDA"):
            load_model("tiny", device="cuda", n_devices=2)


def test_auto_batch_size(tiny, monkeypatch):
    from replab.models import placement

    assert placement.auto_batch_size(tiny, 64) == 32                        # CPU default
    monkeypatch.setattr(placement, "device_memory", lambda device: 80 << 30)
    monkeypatch.setattr(tiny.cfg, "device", "cuda")
    big = placement.auto_batch_size(tiny, 64)
    assert big == placement.auto_batch_size(tiny, 64) and big & (big - 1) == 0   # stable, power of 2
    assert 32 < big <= 1024
    monkeypatch.setattr(placement, "device_memory", lambda device: 64 << 20)
    small = placement.auto_batch_size(tiny, 256)
    assert 1 <= small < big


def test_harvest_cli_model_dtype_and_store_dtype(tmp_path, capsys):
    import numpy as np

    from replab.store import open_store

    out = tmp_path / "s"
    code, _, err = run_cli(["harvest", "--model", "tiny", "--dataset", "next_day", "--layers", "1",
                            "--dtype", "bfloat16", "--store-dtype", "float16", "--out", out, "--json"], capsys)
    assert code == 0, err
    store = open_store(out)
    assert store.model["dtype"] == "bfloat16" and store.manifest["config"]["dtype"] == "float16"
    assert np.asarray(store.acts("blocks.1.hook_resid_post")).dtype == np.float16
    assert store.manifest["config"]["batch_size"] == 32                # auto on CPU
    _one_line_cli_error(["harvest", "--model", "tiny", "--dataset", "next_day", "--store-dtype", "int8",
                         "--out", tmp_path / "t"], capsys, "int8")

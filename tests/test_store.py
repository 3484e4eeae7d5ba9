"""Harvest + activation store on the tiny model: values, positions, format, resume, damage."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from replab_testutil import harvest_cmd, kill_mid_run, tree_digest

from replab.errors import ReplabError
from replab.harvesting import harvest
from replab.prompts import load_prompts, token_ids
from replab.store import open_store


def direct_acts(model, prompt, hook):
    ids = token_ids(model.tokenizer, prompt, prepend_bos=model.cfg.default_prepend_bos)
    with torch.inference_mode():
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=[hook])
    act = cache[hook][0]
    return act.reshape(act.shape[0], -1).numpy()


def test_values_equal_direct_forward(tiny, people_jsonl, tmp_path):
    hooks = ["blocks.1.hook_resid_post", "blocks.2.attn.hook_z", "blocks.3.mlp.hook_post",
             "blocks.0.hook_attn_out"]
    store = harvest(tiny, people_jsonl, hooks=hooks, positions="all", batch_size=2,
                    out=tmp_path / "s", progress=False)
    index = store.index
    assert len(index) == sum(len(token_ids(tiny.tokenizer, p)) for p in index.drop_duplicates("example_id")["prompt"])
    for hook in hooks:
        acts = np.asarray(store.acts(hook))
        for _ex, rows in index.groupby("example_id"):
            want = direct_acts(tiny, rows["prompt"].iloc[0], hook)
            got = acts[rows["row"].to_numpy()]
            np.testing.assert_allclose(got, want[rows["position"].to_numpy()], atol=1e-5, rtol=1e-5)
    assert store.acts("blocks.2.attn.hook_z").shape[1] == tiny.cfg.n_heads * tiny.cfg.d_head


def test_positions_and_index(tiny, people_jsonl, tmp_path):
    store = harvest(tiny, people_jsonl, hooks="resid_pre", layers="0", positions="entity_last",
                    out=tmp_path / "ent", progress=False)
    ix = store.index
    assert list(ix["token"].str.strip()) == ["Picasso", "Einstein", "Monet", "ie", "France"]
    assert all(e.endswith(t.strip()) for e, t in zip(ix["entity"], ix["token"], strict=True))
    assert {"row", "example_id", "position", "token_id", "token", "split", "superclass",
            "entity", "template", "group", "prompt", "answer"} <= set(ix.columns)
    last = harvest(tiny, people_jsonl, hooks="resid_pre", layers="0", positions="last",
                   out=tmp_path / "last", progress=False).index
    assert last["is_last"].all()
    pair = harvest(tiny, people_jsonl, hooks="resid_pre", layers="0", positions="0,-1",
                   out=tmp_path / "pair", progress=False).index
    assert len(pair) == 10 and set(pair.groupby("example_id")["position"].min()) == {0}


def test_bad_positions(tiny, people_jsonl, tmp_path):
    for rule in ["nope_last", "40", "middle"]:
        with pytest.raises(ReplabError):
            harvest(tiny, people_jsonl, positions=rule, layers="0", out=tmp_path / rule, progress=False)
        assert not (tmp_path / rule).exists()


def test_manifest_and_plain_numpy(tiny, people_jsonl, tmp_path):
    store = harvest(tiny, people_jsonl, hooks="resid_post", layers="all", dtype="float16",
                    out=tmp_path / "s", progress=False)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model"]["name"] == "tiny"
    assert manifest["model"]["weights_sha256"] == tiny.replab_identity.weights_sha256
    assert manifest["replab_version"] and manifest["config"]["dtype"] == "float16"
    for t in manifest["tensors"]:
        arr = np.load(tmp_path / "s" / t["file"], mmap_mode="r", allow_pickle=False)
        assert list(arr.shape) == t["shape"] and arr.dtype == np.float16
    np.testing.assert_array_equal(store.acts("blocks.3.hook_resid_post")[0],
                                  np.load(tmp_path / "s/tensors/blocks.3.hook_resid_post.npy")[0])


def test_rerun_is_a_noop_and_other_config_is_refused(tiny, people_jsonl, tmp_path):
    out = tmp_path / "s"
    harvest(tiny, people_jsonl, layers="0-1", out=out, progress=False)
    before = tree_digest(out)
    harvest(tiny, people_jsonl, layers="0-1", out=out, progress=False)
    assert tree_digest(out) == before
    with pytest.raises(ReplabError, match="manifest.json"):
        harvest(tiny, people_jsonl, layers="0-2", out=out, progress=False)


def test_damage_is_detected(tiny, people_jsonl, tmp_path):
    out = tmp_path / "s"
    harvest(tiny, people_jsonl, layers="0-1", out=out, progress=False)
    victim = out / "tensors" / "blocks.1.hook_resid_post.npy"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    open_store(out)  # sizes and headers are still fine
    with pytest.raises(ReplabError, match="blocks.1.hook_resid_post.npy"):
        open_store(out, verify=True)
    victim.write_bytes(bytes(data[:-100]))
    with pytest.raises(ReplabError, match="blocks.1.hook_resid_post.npy.*truncated"):
        open_store(out)
    result = subprocess.run([sys.executable, "-m", "replab", "store", "verify", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "truncated" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_kill_and_resume_is_byte_identical(tmp_path):
    args = ["--model", "tiny", "--dataset", "next_day", "--hooks", "resid_post,z",
            "--positions", "all", "--batch-size", "4"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(harvest_cmd(ref, *args), check=True, capture_output=True)
    done = kill_mid_run(harvest_cmd(killed, *args), killed, min_batches=3, delay=0.2)
    assert done >= 3 and not (killed / "manifest.json").exists()
    with pytest.raises(ReplabError, match="interrupted"):
        open_store(killed)
    other = subprocess.run(harvest_cmd(killed, *args[:-1], "8"), capture_output=True, text=True)
    assert other.returncode == 2 and "_progress.json" in other.stderr
    subprocess.run(harvest_cmd(killed, *args), check=True, capture_output=True)
    assert tree_digest(killed) == tree_digest(ref)


def test_empty_and_missing_inputs(tiny, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ReplabError):
        harvest(tiny, empty, out=tmp_path / "e", progress=False)
    with pytest.raises(ReplabError):
        harvest(tiny, "no_such_dataset", out=tmp_path / "n", progress=False)
    assert not (tmp_path / "e").exists() and not (tmp_path / "n").exists()
    ps = load_prompts("next_day", tokenizer=tiny.tokenizer)
    with pytest.raises(ReplabError):
        harvest(tiny, ps, out=None, progress=False)


def test_head_hooks_are_flattened_with_gqa_widths(tiny, people_jsonl, tmp_path):
    store = harvest(tiny, people_jsonl, hooks="z,q,k,v", layers="1", out=tmp_path / "h",
                    progress=False)
    cfg = tiny.cfg
    assert cfg.n_key_value_heads < cfg.n_heads  # the tiny model has grouped-query attention
    widths = {hook.split(".")[-1]: store.acts(hook).shape[1] for hook in store.hooks}
    assert widths == {"hook_z": cfg.n_heads * cfg.d_head, "hook_q": cfg.n_heads * cfg.d_head,
                      "hook_k": cfg.n_key_value_heads * cfg.d_head,
                      "hook_v": cfg.n_key_value_heads * cfg.d_head}

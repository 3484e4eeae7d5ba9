"""Integration tests on the real default model (SmolLM2-135M-Instruct)."""

import subprocess

import numpy as np
import pytest
import torch

from replab.harvest import harvest
from replab.prompts import answer_ids, check_dataset, check_pairs, list_datasets, load_prompts
from replab.prompts import token_ids
from replab.store import open_store
from replab_testutil import harvest_cmd, kill_mid_run, tree_digest

pytestmark = pytest.mark.integration


def test_default_model_identity_and_logits(smol):
    ident = smol.replab_identity
    assert ident.name == "SmolLM2-135M-Instruct" and len(ident.weights_sha256) == 64
    assert (ident.n_layers, ident.d_model, ident.n_heads, ident.n_kv_heads) == (30, 576, 9, 3)
    assert ident.prepend_bos is False
    logits = smol(smol.to_tokens("The capital of France is"))[0, -1]
    assert smol.tokenizer.decode(int(logits.argmax())) == " Paris"


def test_converted_model_matches_huggingface(smol):
    from replab.models import load_hf_model

    hf = load_hf_model()
    ids = torch.tensor([token_ids(smol.tokenizer, "Today it is Monday so tomorrow it is")])
    with torch.inference_mode():
        ours = smol(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-3
    assert torch.allclose(ours.log_softmax(-1), theirs.log_softmax(-1), atol=1e-4)


def test_harvest_equals_direct_forward(smol, tmp_path):
    ps = load_prompts("fact_recall", tokenizer=smol.tokenizer)
    ps = ps.subset(list(range(12)))
    hooks = ["blocks.0.hook_resid_pre", "blocks.14.hook_resid_post", "blocks.29.hook_resid_post",
             "blocks.7.attn.hook_z", "blocks.20.mlp.hook_post", "blocks.3.hook_attn_out"]
    store = harvest(smol, ps, hooks=hooks, positions="all", batch_size=5, out=tmp_path / "s",
                    progress=False)
    ix = store.index
    worst = 0.0
    for ex, rows in ix.groupby("example_id"):
        ids = torch.tensor([token_ids(smol.tokenizer, rows["prompt"].iloc[0])])
        with torch.inference_mode():
            _, cache = smol.run_with_cache(ids, names_filter=hooks)
        for hook in hooks:
            want = cache[hook][0].reshape(ids.shape[1], -1).numpy()[rows["position"].to_numpy()]
            got = np.asarray(store.acts(hook))[rows["row"].to_numpy()]
            scale = np.maximum(1.0, np.abs(want))
            worst = max(worst, float((np.abs(got - want) / scale).max()))
    # Absolute 1e-5, relative for the few entries above 1 (massive activations reach ~1e3,
    # where float32 spacing alone is 6e-5).
    assert worst < 1e-5, worst


def test_kill_and_resume_on_default_model(tmp_path):
    args = ["--dataset", "next_day", "--hooks", "resid_post", "--layers", "0-29",
            "--positions", "all", "--batch-size", "6"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(harvest_cmd(ref, *args), check=True, capture_output=True)
    kill_mid_run(harvest_cmd(killed, *args), killed, min_batches=2, delay=0.5)
    assert not (killed / "manifest.json").exists()
    subprocess.run(harvest_cmd(killed, *args), check=True, capture_output=True)
    assert tree_digest(killed) == tree_digest(ref)
    open_store(killed, verify=True)


def test_builtin_sets_tokenize_and_pair(smol):
    tok = smol.tokenizer
    for name in list_datasets()["name"]:
        ps = load_prompts(name, tokenizer=tok)
        check_pairs(ps, tok)
        for answer in ps.rows["answer"].dropna():
            assert answer_ids(tok, answer)
        for foils in ps.rows["foils"]:
            for foil in foils:
                assert answer_ids(tok, foil)


@pytest.mark.parametrize("name, min_candidate_accuracy", [
    ("next_day", 0.6), ("fact_recall", 0.6), ("superset", 0.5), ("sequence_types", 0.5),
])
def test_model_knows_builtin_sets(smol, name, min_candidate_accuracy):
    ps = load_prompts(name, tokenizer=smol.tokenizer)
    scores, summary = check_dataset(smol, ps)
    assert summary["candidate_accuracy"] >= min_candidate_accuracy, summary
    assert summary["median_rank"] == summary["median_rank"]  # not NaN

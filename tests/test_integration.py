"""Integration tests on the real default model (SmolLM2-135M-Instruct)."""

import subprocess

import numpy as np
import pytest
import torch
from replab_testutil import harvest_cmd, kill_mid_run, tree_digest

from replab.harvesting import harvest
from replab.prompts import answer_ids, check_dataset, check_pairs, list_datasets, load_prompts, token_ids
from replab.store import open_store

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


HOOKS = ["blocks.0.hook_resid_pre", "blocks.14.hook_resid_post", "blocks.29.hook_resid_post",
         "blocks.7.attn.hook_z", "blocks.20.mlp.hook_post", "blocks.3.hook_attn_out"]


def _harvest_vs_direct(smol, out, batch_size):
    """(max abs error, max error relative to the vector's norm) against per-prompt forwards."""
    ps = load_prompts("fact_recall", tokenizer=smol.tokenizer).subset(list(range(12)))
    store = harvest(smol, ps, hooks=HOOKS, positions="all", batch_size=batch_size, out=out,
                    progress=False)
    worst_abs = worst_rel = 0.0
    for _ex, rows in store.index.groupby("example_id"):
        ids = torch.tensor([token_ids(smol.tokenizer, rows["prompt"].iloc[0])])
        with torch.inference_mode():
            _, cache = smol.run_with_cache(ids, names_filter=HOOKS)
        for hook in HOOKS:
            want = cache[hook][0].reshape(ids.shape[1], -1).numpy()[rows["position"].to_numpy()]
            got = np.asarray(store.acts(hook))[rows["row"].to_numpy()]
            err = np.abs(got - want)
            worst_abs = max(worst_abs, float(err.max()))
            rel = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
            worst_rel = max(worst_rel, float(rel.max()))
    return worst_abs, worst_rel


def test_harvest_equals_direct_forward(smol, tmp_path):
    # One prompt per forward: the same computation as a direct TransformerLens forward.
    worst_abs, _ = _harvest_vs_direct(smol, tmp_path / "b1", batch_size=1)
    assert worst_abs < 1e-5, worst_abs


def test_batched_harvest_matches_direct_forward(smol, tmp_path):
    # Right-padded batches of 5: float32 matmuls of another shape round differently. Late
    # residual entries reach ~2e4 (massive activations), so compare per vector: the error
    # is below 1e-5 of each vector's norm.
    _, worst_rel = _harvest_vs_direct(smol, tmp_path / "b5", batch_size=5)
    assert worst_rel < 1e-5, worst_rel


def test_kill_and_resume_on_default_model(tmp_path):
    args = ["--dataset", "next_day", "--hooks", "resid_post,mlp_out", "--layers", "0-7",
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

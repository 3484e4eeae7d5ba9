"""Lens correctness and acceptance checks on the default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import math

import pytest
import torch
from lens_testutil import PROMPT, one_torch_thread  # noqa: F401 (an autouse fixture)

from replab.lenses.decoders import LogitLens, TunedLensDecoder

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def hf():
    from replab.lenses.tuned import quiet_hf_model

    return quiet_hf_model(None)


@pytest.fixture(scope="module")
def tokens(smol):
    from replab.prompts import token_ids

    return torch.tensor([token_ids(smol.tokenizer, "The capital of France is Paris, and " + PROMPT)])


@pytest.fixture(scope="module")
def ours(smol, tokens):
    return LogitLens(smol).logits(tokens).log_softmax(-1)  # [31, 1, pos, vocab]


def test_logit_lens_equals_tuned_lens_logit_lens(ours, hf, tokens):
    from tuned_lens.nn.lenses import LogitLens as TLLogitLens

    hs = hf(input_ids=tokens, output_hidden_states=True).hidden_states
    theirs = TLLogitLens.from_model(hf)
    for layer in range(hf.config.num_hidden_layers):
        ref = theirs(hs[layer], idx=layer).log_softmax(-1)
        torch.testing.assert_close(ours[layer], ref, atol=1e-4, rtol=0, msg=f"layer {layer}")


def test_logit_lens_equals_transformer_lens_accumulated_resid(smol, ours, tokens):
    _, cache = smol.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
    stack = cache.accumulated_resid(apply_ln=True)  # [31, 1, pos, d_model]
    ref = smol.unembed(stack.flatten(0, 1)).view(*stack.shape[:3], -1).log_softmax(-1)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_last_layer_equals_model_logits(smol, ours, tokens):
    torch.testing.assert_close(ours[-1], smol(tokens).log_softmax(-1), atol=1e-4, rtol=0)


def test_untrained_tuned_lens_equals_logit_lens(hf, ours, tokens):
    from tuned_lens.nn.lenses import TunedLens

    got = TunedLensDecoder(hf, TunedLens.from_model(hf)).logits(tokens).log_softmax(-1)
    torch.testing.assert_close(got, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dataset", ["next_day", "fact_recall"])
def test_first_top1_layer_is_reported(dataset, tmp_path):
    import pandas as pd

    from replab.lenses.run import apply_lens

    s = apply_lens("logit", None, dataset=dataset, limit=8, out=tmp_path, progress=False)
    ft = s["first_top1"]
    assert ft["n_prompts"] == 8 and ft["n_final_top1"] >= 1
    assert ft["frac_ever_top1"] == ft["n_ever_top1"] / 8 and len(ft["per_prompt"]) == 8
    # every prompt whose answer is top-1 at the output has a first top-1 layer within range
    rows = pd.read_csv(tmp_path / "first_top1.csv")
    assert {"prompt", "answer", "template", "ever_top1"} <= set(rows.columns)
    right = rows[rows["final_rank"] == 0]
    assert right["first_top1_layer"].between(0, 30).all()
    assert (right["stable_top1_layer"] >= right["first_top1_layer"]).all()
    assert 0 <= ft["median_first_top1_layer"] <= 30
    # the table's final point is the model: its target probability is the model's
    table = pd.read_parquet(tmp_path / "table.parquet")
    last = table[(table["point"] == "final")
                 & (table["position"] == table.groupby("prompt_id")["position"].transform("max"))]
    assert last["target_prob"].to_numpy() == pytest.approx(rows["final_prob"].to_numpy(), abs=1e-6)
    if dataset == "next_day":
        curve = pd.read_csv(tmp_path / "logit_diff.csv")
        assert curve["depth"].nunique() == 61 and s["logit_diff_final_mean"] > 0


def test_lens_table_matches_direct_decoding(smol):
    """The vectorised table (prefix sharing, batching) equals decoding each prompt alone."""
    from replab.lenses.table import lens_table
    from replab.prompts import token_ids

    prompts = [PROMPT, "Today it is Friday so tomorrow it is", "The capital of France is"]
    df = lens_table(LogitLens(smol), smol.tokenizer, prompts, [" Tuesday", " Saturday", " Paris"])
    for j, prompt in enumerate(prompts):
        ids = torch.tensor([token_ids(smol.tokenizer, prompt)])
        logp = LogitLens(smol).logits(ids).log_softmax(-1)[:, 0]      # [31, pos, vocab]
        got = df[df["prompt_id"] == j].sort_values(["layer", "position"])
        ent = -(logp.exp() * logp).sum(-1).flatten()
        torch.testing.assert_close(torch.tensor(got["entropy"].to_numpy()).float(), ent,
                                   atol=1e-3, rtol=1e-5)
        top = logp.argmax(-1).flatten()
        assert [smol.tokenizer.decode([int(i)]) for i in top] == got["top1"].tolist()


def test_default_tuned_lens_loads_with_tuned_lens_loader(hf, tmp_path):
    """The cached default lens (if trained), exported as ``replab lens export`` does, is a valid
    tuned-lens artifact."""
    from tuned_lens.nn.lenses import TunedLens

    from replab.lenses.cache import load_lens, read_meta
    from replab.lenses.tuned import default_lens_dir, export_lens, model_identity

    identity = model_identity(None)
    path = default_lens_dir(identity)
    if not path.exists():
        pytest.skip("no cached default tuned lens (run `replab lens train`)")
    theirs = TunedLens.from_model_and_pretrained(hf, lens_resource_id=str(export_lens(tmp_path / "tl")))
    ours = load_lens(path, hf, identity)
    h = torch.randn(1, 3, hf.config.hidden_size)
    for layer in (0, 15, 29):
        torch.testing.assert_close(theirs(h, idx=layer), ours(h, idx=layer))
    assert read_meta(path)["stats"]["fit_tokens"] > 0


@pytest.mark.slow
def test_acceptance_tuned_lens_beats_logit_lens_on_heldout(smol, hf):
    """Issue acceptance, small: the real training code (least squares on 1,024 tokens, then
    4 steps of tuned-lens's KL objective) gives a lens whose KL to the final distribution on
    held-out text is below the logit lens's at every layer 0-28 (and 29)."""
    from replab.lenses.evaluate import evaluate_lenses, wide
    from replab.lenses.train import TrainConfig, train_tuned_lens
    from replab.prompts.corpus import read_corpus, token_chunks

    cfg = TrainConfig(fit_tokens=1024, steps=4, batch_positions=8, val_positions=64)
    lens, stats = train_tuned_lens(hf, smol.tokenizer, cfg, progress=False)
    assert stats["init"] == "least_squares" and stats["final_norm"] == "rms"
    assert stats["final_phase"] == "kl" and len(stats["kl_losses"]) == 4
    chunks = token_chunks(read_corpus("builtin-heldout"), smol.tokenizer, 64, 128)
    assert chunks.shape == (2, 64)
    w = wide(evaluate_lenses([LogitLens(smol), TunedLensDecoder(hf, lens)], chunks))
    inner = w[w["layer"] < 30]
    assert list(inner["layer"]) == list(range(30))
    assert (inner["kl_tuned"] < inner["kl_logit"]).all(), inner.to_string()
    final = w[w["layer"] == 30].iloc[0]
    assert final["kl_logit"] < 1e-4 and final["kl_tuned"] < 1e-4
    assert math.isclose(final["ce_logit"], final["ce_tuned"], rel_tol=1e-4)

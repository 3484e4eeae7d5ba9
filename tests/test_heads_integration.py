"""Head function and the W1 report on SmolLM2 (integration): TransformerLens agreement for the
detectors and composition scores, gradient norms against plain autograd on the HF model."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def detected(smol):
    from replab.heads.detectors import detect

    return detect(smol, "previous,duplicate,induction", n_seqs=2, half=12)


def test_detectors_match_transformer_lens_on_smollm2(smol, detected):
    from replab.heads.detectors import tl_crosscheck

    table, summary = detected
    diffs = tl_crosscheck(smol, summary["inputs"]["texts"], table)
    assert max(diffs.values()) < 1e-4
    best = table.groupby("detector")["score"].max()
    # a perfect head scores summary["ideal"] (0.96 previous, 0.5 induction / duplicate)
    assert best["previous"] > 0.7 and best["induction"] > 0.25


def test_composition_matches_transformer_lens_on_smollm2(smol):
    """replab's scores for senders in layers 0-2 and receivers in layers 27-29 equal
    TransformerLens's composition_scores on the same (GQA-expanded) factored matrices."""
    from transformer_lens import FactoredMatrix
    from transformer_lens import utilities as utils

    from replab.heads.composition import grams, pair_scores

    left = grams(smol, "ov_left", layers=[0, 1, 2])
    W_Q, W_K, W_V, W_O = (w[27:30] for w in (smol.W_Q, smol.W_K, smol.W_V, smol.W_O))
    rights = {"Q": FactoredMatrix(W_Q, W_K.transpose(-2, -1)), "K": FactoredMatrix(W_K, W_Q.transpose(-2, -1)),
              "V": FactoredMatrix(W_V, W_O)}
    sender = FactoredMatrix(smol.W_V[0:3], smol.W_O[0:3])
    for mode, right in rights.items():
        ref = utils.composition_scores(sender, right, broadcast_dims=True)             # [3, 9, 3, 9]
        mine = pair_scores(left, grams(smol, f"{mode.lower()}_right", layers=[27, 28, 29])).reshape(3, 9, 3, 9)
        assert (ref - mine.float()).abs().max() < 1e-4, mode


@pytest.fixture(scope="module")
def smol_hf():
    from replab.models import load_hf_model

    return load_hf_model(None)


@pytest.fixture(scope="module")
def fact_report(smol, smol_hf):
    from replab.circuits.report import component_report
    from replab.prompts import load_prompts

    rows = load_prompts("fact_recall", smol.tokenizer).rows
    return rows, component_report(smol, rows, 0, corruption="other-prompt", top=5, hf_model=smol_hf, layers="24-29")


def test_component_report_on_a_fact(smol, smol_hf, fact_report):
    """The report's gradient norms equal plain autograd on the HF model (1e-4 relative), every
    name is in named_parameters(), every sanity check passed, and the model knows the fact."""
    from replab.prompts import answer_ids, token_ids

    rows, rep = fact_report
    r = rep.report
    assert r["target"]["rank"] == 1 and r["target"]["text"] == rows.answer[0]
    assert all(c["ok"] for c in r["checks"].values())
    names = dict(smol_hf.named_parameters())
    assert len(r["grad_norms"]) == 30 * 7 and set(r["grad_norms"]) <= set(names)
    assert all(set(c["parameters"]) <= set(names) for c in r["candidates"])
    ids = token_ids(smol.tokenizer, rows.prompt[0])
    target = answer_ids(smol.tokenizer, rows.answer[0])[0]
    smol_hf.zero_grad(set_to_none=True)
    loss = -torch.log_softmax(smol_hf(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)[target]
    loss.backward()
    for name, value in r["grad_norms"].items():
        ref = float(names[name].grad.norm())
        assert abs(value - ref) <= 1e-4 * ref, name
    smol_hf.zero_grad(set_to_none=True)
    # layers 24-29 only (to keep the test short): 54 heads + 6 MLPs; the best one removes a real part of the logit
    assert len(rep.components) == 60 and r["layers"] == list(range(24, 30))
    assert max(c["evidence"]["patch"]["drop"] for c in r["candidates"]) > 1.0

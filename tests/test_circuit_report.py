"""The W1 component report on the tiny Hugging Face model (2 layers, 4 query heads sharing 2 KV
heads): gradient norms against plain autograd, patched drops against TransformerLens hooks,
the JSON keys, and the CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from replab_testutil import run_cli

ROWS = pd.DataFrame([
    {"prompt": "The capital of France is", "answer": " Paris", "corrupt_prompt": "The capital of Spain is"},
    {"prompt": "The capital of Italy is", "answer": " Rome", "corrupt_prompt": None},
    {"prompt": "The capital of Japan is", "answer": " Tokyo", "corrupt_prompt": None},
    {"prompt": "Berlin is a very large and very old city in the middle of", "answer": " Germany",
     "corrupt_prompt": None},
    {"prompt": "The Eiffel Tower is in", "answer": " Paris France", "corrupt_prompt": None},
])


@pytest.fixture(scope="module")
def tiny_hf():
    """``(TransformerLens model, Hugging Face model)`` of the same tiny HF directory."""
    from replab.models import load_hf_model, load_model
    from replab.models.tiny_hf import tiny_hf_dir

    d = str(tiny_hf_dir())
    return load_model(d, device="cpu"), load_hf_model(d)


@pytest.fixture(scope="module")
def reports(tiny_hf):
    from replab.circuits.report import component_report

    tl, hf = tiny_hf
    return {c: component_report(tl, ROWS, 0, corruption=c, top=4, hf_model=hf)
            for c in ("other-prompt", "zero", "mean")}


def _plain_grad_norms(hf, ids: list[int], targets: list[int]) -> dict[str, float]:
    """Reference: plain autograd on the HF model, loss = -sum log p(target_k | prefix)."""
    hf.zero_grad(set_to_none=True)
    x = torch.tensor([ids + targets[:-1]])
    logp = torch.log_softmax(hf(input_ids=x).logits[0].float(), -1)
    loss = -sum(logp[len(ids) - 1 + k, t] for k, t in enumerate(targets))
    loss.backward()
    out = {n: float(p.grad.norm()) for n, p in hf.named_parameters() if p.grad is not None and p.ndim == 2
           and (".self_attn." in n or ".mlp." in n)}
    hf.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("scoring, row", [("first_token", 0), ("sum_logprob", 4)])
def test_grad_norms_equal_plain_autograd(tiny_hf, scoring, row):
    """Every attention/MLP weight matrix, named exactly as in named_parameters(), 1e-4 relative."""
    from replab.circuits.gradients import gradient_norms
    from replab.prompts import answer_ids, token_ids

    tl, hf = tiny_hf
    ids = token_ids(tl.tokenizer, ROWS.prompt[row])
    targets = answer_ids(tl.tokenizer, ROWS.answer[row])
    assert len(targets) == (1 if row == 0 else 2)
    mine, _, _ = gradient_norms(hf, ids, targets, scoring)
    ref = _plain_grad_norms(hf, ids, targets if scoring == "sum_logprob" else targets[:1])
    names = dict(hf.named_parameters())
    assert set(mine) == set(ref) and len(mine) == 2 * 7 and set(mine) <= set(names)
    for n, v in ref.items():
        assert abs(mine[n] - v) <= 1e-4 * max(v, 1e-12), n


def test_report_json_keys_and_parameters(tiny_hf, reports):
    tl, hf = tiny_hf
    names, modules = dict(hf.named_parameters()), dict(hf.named_modules())
    for corruption, rep in reports.items():
        r = rep.report
        assert {"target", "corruption", "candidates", "grad_norms"} <= set(r)
        assert r["corruption"]["kind"] == corruption
        assert len(r["candidates"]) == 4 and [c["rank"] for c in r["candidates"]] == [1, 2, 3, 4]
        for c in r["candidates"]:
            assert set(c) == {"component", "rank", "evidence", "parameters"}
            assert c["parameters"] and set(c["parameters"]) <= set(names)
        assert set(r["grad_norms"]) <= set(names) and len(r["grad_norms"]) == 14
        assert set(r["lora"]["target_modules"]) <= set(modules)
        assert all(ch["ok"] for ch in r["checks"].values()) and len(r["checks"]) == 4
        assert len(rep.components) == 2 * 4 + 2            # every head and every MLP
        scores = [c["evidence"]["combined_score"] for c in r["candidates"]]
        assert scores == sorted(scores, reverse=True)
    assert reports["other-prompt"].report["corruption"]["corrupt_prompt"] == "The capital of Spain is"
    assert reports["mean"].report["corruption"]["n_mean_prompts"] == 3        # the three "capital of" prompts
    assert r["target"]["rank"] >= 1 and 0 < r["target"]["prob"] < 1


def _hooked_logit(tl, ids, target, hook, value, head=None):
    """Independent reference: TL forward with ``hook`` (all prompt positions) overwritten."""
    def patch(act, hook=None):
        act = act.clone()
        if head is None:
            act[0] = value
        else:
            act[0, :, head] = value[:, head]
        return act

    return float(tl.run_with_hooks(torch.tensor([ids]), fwd_hooks=[(hook, patch)])[0, -1, target])


def test_drops_equal_hooked_forwards(tiny_hf, reports):
    """The drop of a head's z and of an MLP's post equals a plain TransformerLens-hook forward
    with that activation replaced by the corrupt prompt's / zeros / the same-length mean."""
    from replab.prompts import answer_ids, token_ids

    tl, _ = tiny_hf
    ids = token_ids(tl.tokenizer, ROWS.prompt[0])
    target = answer_ids(tl.tokenizer, ROWS.answer[0])[0]
    same = [token_ids(tl.tokenizer, p) for p in ROWS.prompt]
    same = torch.tensor([s for s in same if len(s) == len(ids)])
    with torch.no_grad():
        clean = float(tl(torch.tensor([ids]))[0, -1, target])
    hooks = ["blocks.1.attn.hook_z", "blocks.0.mlp.hook_post"]
    _, corrupt = tl.run_with_cache(torch.tensor([token_ids(tl.tokenizer, ROWS.corrupt_prompt[0])]), names_filter=hooks)
    _, mean = tl.run_with_cache(same, names_filter=hooks)
    values = {"other-prompt": {h: corrupt[h][0] for h in hooks},
              "zero": {h: torch.zeros_like(corrupt[h][0]) for h in hooks},
              "mean": {h: mean[h].mean(0) for h in hooks}}
    for corruption, rep in reports.items():
        t = rep.components.set_index("component")
        for comp, hook, head in (("L1H3", hooks[0], 3), ("L0MLP", hooks[1], None)):
            ref = clean - _hooked_logit(tl, ids, target, hook, values[corruption][hook], head)
            assert abs(t.loc[comp, "drop"] - ref) < 1e-4, (corruption, comp)


def test_sum_logprob_and_refinement(tiny_hf):
    """sum_logprob on a two-token target: the drop of a head equals the hooked teacher-forced
    reference; v refinement is per KV head (query heads 2 and 3 share KV head 1)."""
    from replab.circuits.report import component_report
    from replab.prompts import answer_ids, token_ids

    tl, hf = tiny_hf
    rep = component_report(tl, ROWS, 4, corruption="zero", scoring="sum_logprob", top=10, hf_model=hf)
    assert rep.report["target"]["tokens"] == [" Paris", " France"] and rep.report["target"]["metric"] == "sum_logprob"
    ids = token_ids(tl.tokenizer, ROWS.prompt[4])
    tg = answer_ids(tl.tokenizer, ROWS.answer[4])
    T = len(ids)

    def zero_z(act, hook=None):
        act = act.clone()
        act[0, :T, 2] = 0.0
        return act

    def total(fwd_hooks):
        lp = torch.log_softmax(tl.run_with_hooks(torch.tensor([ids + tg[:1]]), fwd_hooks=fwd_hooks)[0].double(), -1)
        return float(lp[T - 1, tg[0]] + lp[T, tg[1]])

    ref = total([]) - total([("blocks.0.attn.hook_z", zero_z)])
    t = rep.components.set_index("component")
    assert abs(t.loc["L0H2", "drop"] - ref) < 1e-4
    assert t.loc["L0H2", "refine_drop"] == t.loc["L0H3", "refine_drop"]          # one KV head
    ev = next(c["evidence"] for c in rep.report["candidates"] if c["component"] == "L0H2")
    assert ev["refinement"]["unit"] == "KV head 1 (query heads 2-3)" and ev["kv_head"] == 1
    slices = ev["grad_slices"]
    assert slices["model.layers.0.self_attn.k_proj.weight"]["rows"] == [16, 32]      # d_head 16
    assert slices["model.layers.0.self_attn.o_proj.weight"]["cols"] == [32, 48]


def test_report_errors(tiny, tiny_hf):
    from replab.circuits.report import component_report
    from replab.errors import ReplabError

    tl, hf = tiny_hf
    with pytest.raises(ReplabError, match="no corrupt_prompt and no other prompt"):
        component_report(tl, ROWS, 3, corruption="other-prompt", hf_model=hf)
    with pytest.raises(ReplabError, match="at least 2 prompts"):
        component_report(tl, ROWS, 3, corruption="mean", hf_model=hf)
    with pytest.raises(ReplabError, match="out of range"):
        component_report(tl, ROWS, 9, hf_model=hf)
    with pytest.raises(ReplabError, match="unknown corruption"):
        component_report(tl, ROWS, 0, corruption="noise", hf_model=hf)
    with pytest.raises(ReplabError, match="Hugging Face weights"):
        component_report(tiny, ROWS, 0)
    # without a corrupt_prompt, other-prompt takes the next prompt of the same length
    from replab.circuits.report import build_setup

    setup, _, _ = build_setup(tl, ROWS, 1, "other-prompt")
    assert setup.corrupt_source == "row 0" and setup.corrupt_prompt == ROWS.prompt[0]


def test_circuit_report_cli(tiny_hf, tmp_path, capsys):
    from replab.models.tiny_hf import tiny_hf_dir

    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n"
                            for r in ROWS.to_dict("records")))
    args = ["circuit", "report", "--model", str(tiny_hf_dir()), "--dataset", data, "--prompt-index", "1",
            "--corruption", "mean", "--top", "3", "--layers", "1", "--out", tmp_path / "r"]
    code, out, err = run_cli([*args, "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["corruption"]["kind"] == "mean" and len(r["candidates"]) == 3 and r["layers"] == [1]
    assert all(c["component"].startswith("L1") for c in r["candidates"])
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"report.json", "report.md", "components.parquet", "grad_norms.csv", "drops.png", "summary.json"} <= files
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["candidates"] == r["candidates"] and saved["model"]["n_kv_heads"] == 2
    assert "target_modules = [" in (tmp_path / "r" / "report.md").read_text()
    code, _, err = run_cli(["circuit", "report", "--model", "tiny", "--task", "fact_recall", "--corruption", "blur"],
                           capsys)
    assert code == 2 and "unknown corruption" in err and err.count("\n") == 1
    code, _, err = run_cli(["circuit", "report", "--model", "tiny"], capsys)
    assert code == 2 and "exactly one of" in err

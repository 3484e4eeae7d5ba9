"""Iterative pruning on the tiny model: levels re-measured against hand-written hooks, exact
greedy's choice, the attribution estimate against autograd, orders and agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replab.circuits.ablation import Ablation
from replab.circuits.components import parse_components
from replab.circuits.prune import parse_orders, prune_heads
from replab.errors import ReplabError
from replab.patching import load_task
from replab.patching.task import PatchTask


@pytest.fixture(scope="module")
def task(tiny):
    """next_day with answer and foil swapped: the random tiny model's logit difference is then
    positive on the clean prompts (pruning divides by it)."""
    t = load_task("next_day", tiny.tokenizer, limit=4)
    cand = t.candidates.clone()
    cand[:, [0, 1]] = cand[:, [1, 0]]
    return PatchTask("flipped", t.clean, t.corrupt, t.foil, t.answer, cand, t.prompts, t.corrupt_prompts, t.str_tokens)


def _perf(model, task, removed):
    """Reference: mean-ablate ``removed`` heads' z in the clean run with hooks; mean metric ratio."""
    with torch.inference_mode():
        _, cc = model.run_with_cache(task.clean)

        def ld(logits):
            i = torch.arange(task.n_prompts)
            return float((logits[i, task.answer] - logits[i, task.foil]).mean())
        intact = ld(model(task.clean)[:, -1])
        hooks = []
        for layer in {c.layer for c in removed}:
            idx = [c.head for c in removed if c.layer == layer]
            name = f"blocks.{layer}.attn.hook_z"

            def f(a, hook, idx=idx, name=name):
                a = a.clone()
                a[:, :, idx] = cc[name].mean(0)[None][:, :, idx]
                return a
            hooks.append((name, f))
        return ld(model.run_with_hooks(task.clean, fwd_hooks=hooks)[:, -1]) / intact


def test_levels_are_remeasured_and_greedy_is_exact(tiny, task):
    res = prune_heads(tiny, task, thresholds=(0.95, 0.9), orders="greedy,reverse,random:2", n_boot=20)
    assert len(res.levels) == 8
    heads = {f"L{layer}H{h}" for layer in range(4) for h in range(4)}
    for lv in res.levels:
        assert set(lv) >= {"order", "threshold", "heads", "n_heads", "performance", "ablation", "metric"}
        removed = parse_components(sorted(heads - set(lv["heads"])), tiny) if len(lv["heads"]) < 16 else []
        assert lv["performance"] == pytest.approx(_perf(tiny, task, removed), abs=1e-4)
        assert lv["performance"] >= lv["threshold"] or not lv["crossed"]
        assert lv["search_performance"] == pytest.approx(lv["performance"], abs=1e-4)   # chained states are exact
        # every candidate's logit is logged with the level (logit_diff = answer - foil on prompt means)
        assert lv["answer_logit"] - lv["foil_logit"] == pytest.approx(lv["metric_value"], abs=1e-4)
        assert len(lv["candidate_logits"]) == task.candidates.shape[1]
    # greedy's first removal is the head whose removal hurts least, measured by hand
    first = res.curves[(res.curves.order == "greedy") & (res.curves.step == 1)].iloc[0]
    singles = {name: _perf(tiny, task, parse_components(name, tiny)) for name in sorted(heads)}
    assert first["removed"] == max(singles, key=singles.get)
    assert first["performance"] == pytest.approx(max(singles.values()), abs=1e-4)
    # reverse: last layer first; the level is the circuit just before the first crossing
    rev = res.curves[res.curves.order == "reverse"]
    assert list(rev["removed"].iloc[1:4]) == ["L3H3", "L3H2", "L3H1"]
    lv = [x for x in res.levels if x["order"] == "reverse" and x["threshold"] == 0.9][0]
    below = rev[rev.performance < 0.9]
    if len(below):
        assert lv["n_heads"] == 16 - (int(below.iloc[0]["step"]) - 1)
    assert set(res.survival.columns) >= {"head", "threshold", "survival"} and len(res.diffs) > 0


def test_attribution_estimate_is_the_gradient_product(tiny, task):
    from replab.circuits.attribution import ablation_attribution
    from replab.circuits.components import all_heads, interventions
    from replab.patching.engine import Variant
    from replab.patching.plan import plan_forwards

    heads = all_heads(tiny)
    removed = parse_components("L1H1", tiny)
    fw = plan_forwards(tiny, task, [Variant(interventions(heads, tiny, "mean", task.n_tokens))], base="clean")
    est = ablation_attribution(tiny, task, removed, heads, "mean", "logit_diff", fw)
    _, cc = tiny.run_with_cache(task.clean)
    store = {}

    def hook(a, hook):
        layer = int(hook.name.split(".")[1])
        if layer == 1:
            a = a.clone()
            a[:, :, 1] = cc[hook.name].mean(0)[:, 1]
        a.retain_grad()
        store[layer] = a
        return a
    with torch.enable_grad():
        hooks = [("hook_embed", lambda a, hook: a.detach().requires_grad_(True))]
        logits = tiny.run_with_hooks(task.clean, fwd_hooks=hooks + [(f"blocks.{k}.attn.hook_z", hook)
                                                                     for k in range(4)])[:, -1]
        i = torch.arange(task.n_prompts)
        (logits[i, task.answer] - logits[i, task.foil]).mean().backward()
    want = [float(((cc[f"blocks.{c.layer}.attn.hook_z"].mean(0)[None][:, :, c.head] - store[c.layer][:, :, c.head])
                   * store[c.layer].grad[:, :, c.head]).sum()) for c in heads]
    np.testing.assert_allclose(est, want, atol=1e-5)
    assert est[5] == 0.0                    # L1H1 is already ablated


def test_greedy_with_candidates_reports_agreement(tiny, task):
    res = prune_heads(tiny, task, thresholds=(0.9,), orders="greedy,attribution", candidates=3, check_every=2,
                      ablation=Ablation("zero"), n_boot=20)
    a = res.agreement
    assert a["candidates"] == 3 and a["steps_checked"] >= 2 and 0 <= a["exact_choice_in_k"] <= 1
    assert res.summary["attribution_passes"] >= 2 and res.summary["timing"]["greedy"]["variant_forwards"] > 0
    assert parse_orders("greedy,random:3") == ["greedy", "random0", "random1", "random2"]
    with pytest.raises(ReplabError, match="unknown order"):
        parse_orders("sideways")
    with pytest.raises(ReplabError, match="pruning divides"):
        prune_heads(tiny, task, metric="kl")

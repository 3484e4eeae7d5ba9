"""Component vocabulary, random-set baselines and circuit validation (necessity, sufficiency,
minimality) on the tiny model, against hand-written TransformerLens hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from replab.circuits.ablation import Ablation
from replab.circuits.baselines import random_sets
from replab.circuits.components import Component, interventions, layer_profile, parse_components
from replab.circuits.validate import complement, minimality, necessity, sufficiency
from replab.errors import ReplabError
from replab.patching import load_task


@pytest.fixture(scope="module")
def task(tiny):
    return load_task("next_day", tiny.tokenizer, limit=4)


def test_component_vocabulary(tiny, tmp_path):
    comps = parse_components("L1H2, l2h3.v@-1, L0MLP@3,4,L3ATTN,EMBED,L2RESID,L1H2", tiny, n_tokens=8)
    assert [c.name for c in comps] == ["L1H2", "L2H3.v@-1", "L0MLP@3,4", "L3ATTN", "EMBED", "L2RESID"]
    ivs = {c.name: c.intervention(tiny, "zero", 8) for c in comps}
    assert (ivs["L2H3.v@-1"].site, ivs["L2H3.v@-1"].head, ivs["L2H3.v@-1"].positions) == ("v", 1, (7,))
    assert comps[1].kv_group(tiny) == "L2H2,L2H3"
    assert (ivs["EMBED"].site, ivs["EMBED"].layer) == ("resid_pre", 0)
    assert (ivs["L2RESID"].site, ivs["L3ATTN"].site, ivs["L0MLP@3,4"].positions) == ("resid_post", "attn_out", (3, 4))
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"components": ["L1H2", "L1H0"]}))
    grouped = interventions(parse_components(str(path)), tiny, "mean", 8)
    assert len(grouped) == 1 and grouped[0].head == (0, 2)          # one several-head intervention
    for bad, msg in [("L9H1", "layer 9 is out of range"), ("L1H7", "head 7 is out of range"),
                     ("L1X", "unknown component"), ("", "empty")]:
        with pytest.raises(ReplabError, match=msg):
            parse_components(bad, tiny, 8)
    with pytest.raises(ReplabError, match="out of range"):
        parse_components("L1H1@9", tiny, 8)


def test_random_sets_keep_size_and_layer_profile(tiny):
    comps = parse_components("L1H2,L1H0,L2H3.q@-1,L3MLP", tiny)
    sets = random_sets(tiny, comps, 25, seed=3)
    assert len(sets) == 25 and sets == random_sets(tiny, comps, 25, seed=3)
    for s in sets:
        heads = [c for c in s if c.kind == "head"]
        assert layer_profile(heads) == layer_profile([c for c in comps if c.kind == "head"])
        assert s[2].part == "q" and s[2].positions == (-1,) and abs(s[3].layer - 3) <= 2
    assert any(set(s) != set(comps) for s in sets)
    with pytest.raises(ReplabError, match="cannot tell it apart"):
        random_sets(tiny, [Component("head", 1, h) for h in range(4)], 20)


def _ld(logits, task):
    i = torch.arange(task.n_prompts)
    return (logits[i, task.answer] - logits[i, task.foil]).numpy()


def _mean_ablated(model, task, heads, mlps=()):
    """Reference: the clean run with the heads' z (and the MLPs' outputs) replaced by their mean
    over the clean prompts, per position."""
    with torch.inference_mode():
        _, cc = model.run_with_cache(task.clean)
        hooks = []
        for layer in {h[0] for h in heads}:
            idx = [h for lay, h in heads if lay == layer]
            name = f"blocks.{layer}.attn.hook_z"

            def f(a, hook, idx=idx, name=name):
                a = a.clone()
                a[:, :, idx] = cc[name].mean(0)[None][:, :, idx]
                return a
            hooks.append((name, f))
        for layer in mlps:
            name = f"blocks.{layer}.hook_mlp_out"
            hooks.append((name, lambda a, hook, name=name: cc[name].mean(0, keepdim=True).expand_as(a)))
        return _ld(model.run_with_hooks(task.clean, fwd_hooks=hooks)[:, -1], task)


def test_necessity_and_sufficiency_match_manual_hooks(tiny, task):
    comps = parse_components("L1H2,L2H0,L3MLP", tiny)
    res = necessity(tiny, task, comps, Ablation("mean"), n_random=20, n_boot=50)
    rec = res.records[0]
    want = _mean_ablated(tiny, task, [(1, 2), (2, 0)], mlps=[3])
    np.testing.assert_allclose(rec["metric"], want.mean(), atol=1e-4)
    assert set(rec) >= {"components", "ablation", "metric", "clean_metric", "corrupt_metric", "normalized_effect",
                        "kl", "ci_low", "ci_high", "random_mean", "random_p95"}
    assert rec["n_random"] == 20 and len(res.table) == 21 and rec["kl"] > 0
    keep = parse_components("L1H2,L2H0,L3H1", tiny)
    res = sufficiency(tiny, task, keep, Ablation("mean"), ablate_mlps=True, n_random=0, n_boot=50)
    rest = [(layer, h) for layer in range(4) for h in range(4) if (layer, h) not in {(1, 2), (2, 0), (3, 1)}]
    want = _mean_ablated(tiny, task, rest, mlps=range(4))
    np.testing.assert_allclose(res.records[0]["metric"], want.mean(), atol=1e-4)
    assert res.records[0]["n_ablated"] == len(rest) + 4


def test_minimality_and_errors(tiny, task):
    comps = parse_components("L1H2,L2H0,L3H1", tiny)
    res = minimality(tiny, task, comps, Ablation("zero"), n_random=20, n_boot=50)
    assert [r["components"] for r in res.records] == [["L1H2"], ["L2H0"], ["L3H1"]]
    full = res.plan.effect[0]
    for i, r in enumerate(res.records):
        assert r["delta"] == pytest.approx(full - res.plan.effect[1 + i])
        assert r["delta_ci_low"] <= r["delta"] + 1e-9 <= r["delta_ci_high"] + 2e-9
    with pytest.raises(ReplabError, match="keeps every head"):
        complement(tiny, [Component("attn", layer) for layer in range(4)], 8)
    with pytest.raises(ReplabError, match="not q/k/v"):
        sufficiency(tiny, task, parse_components("L1H2.q", tiny), n_random=0)
    with pytest.raises(ReplabError, match="at least 20"):
        necessity(tiny, task, comps, n_random=5)
    with pytest.raises(ReplabError, match="mean-over"):
        Ablation("mean-other")
    with pytest.raises(ReplabError, match="unknown ablation"):
        Ablation("shuffle")

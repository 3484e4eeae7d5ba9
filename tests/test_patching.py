"""Patching engine on the tiny model: agreement with TransformerLens, interventions, checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from replab.errors import ReplabError
from replab.patching import Intervention, Variant, load_task, run_variants, sweep
from replab.patching.metrics import metric_values, readout


@pytest.fixture(scope="module")
def task(tiny):
    return load_task("next_day", tiny.tokenizer, limit=3)


def _tl_metric(task):
    def metric(logits):
        last = logits[:, -1]
        return (last.gather(1, task.answer[:, None])[:, 0] - last.gather(1, task.foil[:, None])[:, 0]).mean()
    return metric


def _grid(table, axes):
    return table.sort_values(list(axes))["metric_after"].to_numpy()


@pytest.mark.parametrize("fn, site, by, axes", [
    ("get_act_patch_resid_pre", "resid_pre", "layer,position", ("layer", "position")),
    ("get_act_patch_attn_out", "attn_out", "layer,position", ("layer", "position")),
    ("get_act_patch_mlp_out", "mlp_out", "layer,position", ("layer", "position")),
    ("get_act_patch_attn_head_out_all_pos", "z", "layer,head", ("layer", "head")),
    ("get_act_patch_attn_head_out_by_pos", "z", "layer,head,position", ("layer", "position", "head")),
    ("get_act_patch_attn_head_v_all_pos", "v", "layer,head", ("layer", "head")),
    ("get_act_patch_attn_head_pattern_all_pos", "pattern", "layer,head", ("layer", "head")),
])
def test_agrees_with_transformer_lens(tiny, task, fn, site, by, axes):
    from transformer_lens import patching

    _, clean_cache = tiny.run_with_cache(task.clean)
    ref = getattr(patching, fn)(tiny, task.corrupt, clean_cache, _tl_metric(task))
    res = sweep(tiny, task, site=site, by=by, n_boot=10)
    mine = _grid(res.table, axes)
    assert ref.numel() == len(mine)
    # the grid must vary far beyond the tolerance, or agreement within 1e-4 would say nothing
    assert float(ref.max() - ref.min()) > 100 * 1e-4
    np.testing.assert_allclose(mine, ref.flatten().numpy(), atol=1e-4)


def test_noising_agrees_with_transformer_lens(tiny, task):
    from transformer_lens import patching

    _, corrupt_cache = tiny.run_with_cache(task.corrupt)
    ref = patching.get_act_patch_resid_pre(tiny, task.clean, corrupt_cache, _tl_metric(task))
    res = sweep(tiny, task, site="resid_pre", by="layer,position", direction="noise", n_boot=10)
    np.testing.assert_allclose(_grid(res.table, ("layer", "position")), ref.flatten().numpy(), atol=1e-4)


def test_prefix_shortcut_is_exact(tiny, task):
    vs = [Variant((Intervention("resid_pre", layer, positions=(p,)),)) for layer in range(4) for p in (2, 4, 7)]
    vs += [Variant((Intervention("z", 1, head=2, positions=(5, 6)), Intervention("mlp_out", 3)))]
    a, _ = run_variants(tiny, task.clean, task.corrupt, vs, use_prefix=True)
    b, _ = run_variants(tiny, task.clean, task.corrupt, vs, use_prefix=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _with_hook(model, tokens, hook, fn):
    with torch.inference_mode():
        return model.run_with_hooks(tokens, fwd_hooks=[(hook, fn)])[:, -1]


def _final_logits(model, task, variant, base="corrupt"):
    fin, _ = run_variants(model, task.clean, task.corrupt, [variant], base=base)
    r = readout(model, fin[0], torch.arange(model.cfg.d_vocab).repeat(task.n_prompts, 1), False)
    return r.cand


@pytest.mark.parametrize("source", ["zero", "mean", "resample", "noise"])
def test_ablation_sources_match_manual_hooks(tiny, task, source):
    iv = Intervention("mlp_out", 2, positions=(6,), source=source, scale=0.5 if source == "noise" else None, seed=3)
    _, cache = tiny.run_with_cache(task.corrupt)
    act = cache[iv.hook]
    from replab.patching.patch_values import derangement as _derangement

    if source == "zero":
        new = torch.zeros_like(act)
    elif source == "mean":
        new = act.mean(0, keepdim=True).expand_as(act)
    elif source == "resample":
        new = act[_derangement(act.shape[0], 3)]
    else:
        new = act + 0.5 * torch.randn(act.shape, generator=torch.Generator().manual_seed(3))

    def hook(a, hook):
        a = a.clone()
        a[:, 6] = new[:, 6]
        return a
    want = _with_hook(tiny, task.corrupt, iv.hook, hook)
    got = _final_logits(tiny, task, Variant((iv,)))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("site, head, positions, neurons", [
    ("resid_mid", None, (4, 6), None),
    ("resid_post", None, None, None),
    ("q", 3, (5, 7), None),
    ("k", 1, None, None),            # a KV head: its whole query group reads it
    ("v", 0, (6,), None),
    ("z", 2, (5,), None),
    ("pattern", 1, (7,), None),     # destination position 7
    ("mlp_pre", None, (6, 7), (3, 17, 64)),
    ("mlp_post", None, None, (0, 5, 127)),
])
def test_every_site_matches_a_manual_hook(tiny, task, site, head, positions, neurons):
    """Clean → corrupt at each site (heads, positions, neuron subsets) equals copying the
    same entries by hand with a TransformerLens hook."""
    iv = Intervention(site, 2, head=head, positions=positions, neurons=neurons)
    _, cache = tiny.run_with_cache(task.clean)
    src = cache[iv.hook]
    pos = slice(None) if positions is None else list(positions)

    def hook(a, hook):
        a = a.clone()
        if site == "pattern":
            a[:, head, pos] = src[:, head, pos]
        elif head is not None:
            a[:, pos, head] = src[:, pos, head]
        elif neurons is not None:
            for n in neurons:
                a[:, pos, n] = src[:, pos, n]
        else:
            a[:, pos] = src[:, pos]
        return a
    want = _with_hook(tiny, task.corrupt, iv.hook, hook)
    got = _final_logits(tiny, task, Variant((iv,)))
    base = _with_hook(tiny, task.corrupt, iv.hook, lambda a, hook: a)
    assert float((want - base).abs().max()) > 1e-3       # the patch does something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_sweep_reuses_its_runs_for_the_identity_check(tiny, task, monkeypatch):
    from replab.patching import engine

    made = []
    init = engine.ForwardCache.__init__
    monkeypatch.setattr(engine.ForwardCache, "__init__",
                        lambda self, *a, **k: (made.append(1), init(self, *a, **k))[1])
    res = sweep(tiny, task, site="z", by="layer,head", n_boot=10)
    assert res.summary["checks"]["engine_identity"]["ok"]
    assert len(made) == 2                                   # one clean and one corrupt forward


def test_direction_patch_replaces_only_the_subspace(tiny, task):
    d = tiny.cfg.d_model
    rng = np.random.default_rng(0)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    iv = Intervention("resid_post", 1, positions=(5,), direction=tuple(u))
    _, cc = tiny.run_with_cache(task.clean)
    _, xc = tiny.run_with_cache(task.corrupt)
    ut = torch.tensor(u, dtype=torch.float32)

    def hook(a, hook):
        a = a.clone()
        diff = cc[iv.hook][:, 5] - xc[iv.hook][:, 5]
        a[:, 5] = a[:, 5] + (diff @ ut)[:, None] * ut
        return a
    want = _with_hook(tiny, task.corrupt, iv.hook, hook)
    got = _final_logits(tiny, task, Variant((iv,)))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    full = Intervention("resid_post", 1, positions=(5,), direction=tuple(map(tuple, np.eye(d))))
    plain = Intervention("resid_post", 1, positions=(5,))
    a = _final_logits(tiny, task, Variant((full,)))
    b = _final_logits(tiny, task, Variant((plain,)))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gqa_kv_patch_changes_its_query_group_only(tiny, task):
    from replab.hooks import query_heads_of

    cfg = tiny.cfg
    assert cfg.n_key_value_heads == 2 and cfg.n_heads == 4
    assert query_heads_of(1, 4, 2) == [2, 3]
    layer, kv = 1, 1
    seen = {}

    def grab(a, hook):
        seen["z"] = a.clone()
        return a

    def patch_v(a, hook):
        a = a.clone()
        a[:, :, kv] = 0.0
        return a
    with torch.inference_mode():
        tiny.run_with_hooks(task.corrupt, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", grab)])
        base = seen["z"]
        tiny.run_with_hooks(task.corrupt, fwd_hooks=[(f"blocks.{layer}.attn.hook_v", patch_v),
                                                     (f"blocks.{layer}.attn.hook_z", grab)])
    changed = (seen["z"] - base).abs().amax(dim=(0, 1, 3))
    assert torch.all(changed[[2, 3]] > 1e-6) and torch.all(changed[[0, 1]] == 0)
    res = sweep(tiny, task, site="head_v", by="layer,head", layers="1", n_boot=10)
    assert list(res.table["query_heads"]) == ["0,1", "2,3"]
    with pytest.raises(ReplabError, match="2 KV heads"):
        run_variants(tiny, task.clean, task.corrupt, [Variant((Intervention("v", 1, head=2),))])


def test_metrics_match_hand_computation(tiny, task):
    with torch.inference_mode():
        full = tiny(task.corrupt)[:, -1]
        clean = tiny(task.clean)[:, -1]
        from replab.patching.engine import ForwardCache

        run = ForwardCache(tiny, task.corrupt, set())
        r = readout(tiny, run.final, task.candidates, True, True)
        rc = readout(tiny, ForwardCache(tiny, task.clean, set()).final, task.candidates, True, True)
    logp = full.log_softmax(-1)
    a, f = task.answer, task.foil
    idx = torch.arange(task.n_prompts)
    torch.testing.assert_close(metric_values("logit_diff", r), full[idx, a] - full[idx, f], atol=1e-4, rtol=0)
    others = full.gather(1, task.candidates[:, 1:]).max(1).values
    torch.testing.assert_close(metric_values("margin", r), full[idx, a] - others, atol=1e-4, rtol=0)
    torch.testing.assert_close(metric_values("logprob", r), logp[idx, a], atol=1e-4, rtol=0)
    torch.testing.assert_close(metric_values("prob", r), logp[idx, a].exp(), atol=1e-5, rtol=0)
    want_kl = (clean.softmax(-1) * (clean.log_softmax(-1) - logp)).sum(-1)
    torch.testing.assert_close(metric_values("kl", r, rc.logp), want_kl, atol=1e-4, rtol=0)


def test_sweep_table_checks_and_ci(tiny, task, tmp_path):
    res = sweep(tiny, task, site="resid_pre", by="layer,position", n_boot=200)
    t = res.table
    assert {"layer", "position", "head", "token", "metric_before", "metric_after", "normalized_effect",
            "ci_low", "ci_high", "answer_logit", "foil_logit"} <= set(t.columns)
    assert len(t) == 4 * task.n_tokens
    assert all(c["ok"] for c in res.summary["checks"].values())
    assert ((t["ci_low"] <= t["normalized_effect"] + 1e-9) & (t["normalized_effect"] <= t["ci_high"] + 1e-9)).all()
    # positions before the first differing token cannot change anything
    shared = int((task.clean != task.corrupt).any(0).nonzero()[0])
    assert np.allclose(t[t["position"] < shared]["normalized_effect"], 0.0, atol=1e-6)
    summary = res.save(tmp_path / "run", tiny)
    assert (tmp_path / "run" / "summary.json").exists() and (tmp_path / "run" / "heatmap.png").exists()
    assert summary["model"]["name"] and summary["replab_version"]


def test_failed_sanity_check_stops_the_run(tiny, task, monkeypatch):
    from replab.patching import plan

    monkeypatch.setattr(plan, "ENGINE_TOL", -1.0)
    with pytest.raises(ReplabError, match="sanity check 'engine_full' failed"):
        sweep(tiny, task, site="mlp_out", by="layer", n_boot=10)


def test_intervention_roundtrip_and_validation():
    iv = Intervention("head_z", 3, head=2, positions=[4, 5], source="noise", scale=0.1, seed=7)
    again = Intervention.from_dict(json.loads(json.dumps(iv.to_dict())))
    assert again == iv and again.site == "z" and again.hook == "blocks.3.attn.hook_z"
    assert Intervention("blocks.2.hook_resid_pre", None).layer == 2
    for kwargs, msg in [(dict(site="z", layer=1), "needs a head"), (dict(site="nope", layer=1), "unknown site"),
                        (dict(site="resid_pre", layer=1, head=0), "no heads"),
                        (dict(site="resid_pre", layer=1, source="steer", scale=1.0), "direction"),
                        (dict(site="attn_out", layer=1, neurons=(1,)), "neurons")]:
        with pytest.raises(ReplabError, match=msg):
            Intervention(**kwargs)


def test_task_errors(tiny, tmp_path):
    from replab.patching.catalog import load_task

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "The capital of France is", "answer": " Paris", "foils": [" Rome"],
                               "corrupt_prompt": "The capital of the United Kingdom is"}) + "\n")
    with pytest.raises(ReplabError, match="length"):
        load_task(str(bad), tiny.tokenizer)
    with pytest.raises(ReplabError, match="unknown template"):
        load_task("next_day", tiny.tokenizer, template="nope")
    from replab.patching.task import task_from_rows
    from replab.prompts import load_prompts

    rows = load_prompts("next_day", tiny.tokenizer).rows            # 8 templates, 5-10 tokens
    with pytest.raises(ReplabError, match="different token lengths"):
        task_from_rows(rows, tiny.tokenizer, "next_day")
    with pytest.raises(ReplabError, match="no corrupt_prompt"):
        task_from_rows(rows.assign(corrupt_prompt=None).head(2), tiny.tokenizer, "x")


def test_dla_sums_and_matches_transformer_lens(tiny, task):
    from replab.patching.logit_attribution import dla

    res = dla(tiny, task)
    assert res["check"]["abs_error"].max() < 1e-4
    _, cache = tiny.run_with_cache(task.clean)
    u = (tiny.W_U[:, task.answer] - tiny.W_U[:, task.foil]).T
    stack, labels = cache.decompose_resid(layer=-1, mode="all", pos_slice=-1, return_labels=True)
    ref = (cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1) * u[None]).sum(-1)   # [comp, N]
    lay = res["layers"]
    for i, label in enumerate(labels):
        if label == "embed":
            mine = lay[lay.component == "embed"]
        else:
            layer, kind = label.split("_")[0], label.split("_")[1]
            mine = lay[(lay.layer == int(layer)) & (lay.component == kind)]
        np.testing.assert_allclose(mine.sort_values("prompt_id")["logit_diff"], ref[i].detach().numpy(), atol=1e-4)
    heads = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)
    ref_h = (heads * u[None]).sum(-1).detach().numpy()                              # [L*H, N]
    mine_h = res["heads"].pivot_table(index=["layer", "head"], columns="prompt_id", values="logit_diff").to_numpy()
    np.testing.assert_allclose(mine_h, ref_h, atol=1e-4)
    acc = res["accumulated"]
    last = acc[(acc.run == "clean") & (acc.point == "final_post")].sort_values("prompt_id")["logit_diff"]
    np.testing.assert_allclose(last, res["check"]["logit_diff"], atol=1e-4)


def test_dla_uses_the_final_norm_weight_and_the_real_logits(tiny, task):
    """With a non-trivial final-norm weight the components still sum to the logit difference
    of the model's own forward pass (a DLA that ignored the weight would not)."""
    import copy

    from replab.patching.logit_attribution import dla

    model = copy.deepcopy(tiny)
    with torch.no_grad():
        model.ln_final.w.copy_(torch.rand(model.cfg.d_model, generator=torch.Generator().manual_seed(1)) * 2)
    res = dla(model, task)
    with torch.inference_mode():
        last = model(task.clean)[:, -1]
    want = (last.gather(1, task.answer[:, None]) - last.gather(1, task.foil[:, None]))[:, 0]
    np.testing.assert_allclose(res["check"]["logit_diff"], want.numpy(), atol=1e-4)
    assert res["check"]["abs_error"].max() < 1e-4
    assert float((want - dla(tiny, task)["check"]["logit_diff"].to_numpy()).abs().max()) > 1e-2


def test_atp_estimate_is_the_gradient_product_and_ranks_heads(tiny, task):
    from replab.patching.attribution import atp_with_exact

    table, summary = atp_with_exact(tiny, task, top=3)
    heads = table[table.kind == "head"]
    assert len(heads) == 16 and heads["exact_effect"].notna().all()
    assert summary["heads_spearman"] > 0.7
    # one head by hand: (z_clean - z_corrupt) . dM/dz on the corrupt run
    name = "blocks.1.attn.hook_z"
    _, cc = tiny.run_with_cache(task.clean)
    store = {}

    def leaf(a, hook):
        a = a.detach().requires_grad_(True)
        store["z"] = a
        return a
    with torch.enable_grad():
        logits = tiny.run_with_hooks(task.corrupt, fwd_hooks=[(name, leaf)])[:, -1]
        _tl_metric(task)(logits[:, None]).backward()
    by_hand = ((cc[name] - store["z"].detach()) * store["z"].grad).sum(dim=(0, 1, 3))
    got = heads[heads.layer == 1].sort_values("head")["atp_delta"].to_numpy()
    np.testing.assert_allclose(got, by_hand.numpy(), atol=1e-4)


def test_custom_source_values(tiny, task):
    iv = Intervention("resid_mid", 2, positions=(5, 7))
    _, cc = tiny.run_with_cache(task.clean, names_filter=iv.hook)
    custom = Intervention("resid_mid", 2, positions=(5, 7), source="custom:mine")
    a, _ = run_variants(tiny, task.clean, task.corrupt, [Variant((iv,)), Variant((custom,))],
                        sources={"mine": cc[iv.hook]})
    torch.testing.assert_close(a[0], a[1])
    with pytest.raises(ReplabError, match="not passed"):
        run_variants(tiny, task.clean, task.corrupt, [Variant((custom,))])


def test_bootstrap_ci_pairs_and_people():
    """Pairs: the plain bootstrap of the ratio of prompt means. People: the two-way cluster
    bootstrap of replab.patching.bootstrap, wider when pairs share people."""
    from replab.patching.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    n = 40
    clean, corrupt = 2 + rng.normal(size=n), rng.normal(size=n)
    people = (np.arange(n) % 4, np.arange(n) % 5)        # 4 clean × 5 corrupt people
    person_effect = 0.3 * rng.normal(size=4)[people[0]]   # shared by every pair of a clean person
    patched = corrupt + 0.5 * (clean - corrupt) + person_effect
    lo, hi = bootstrap_ci(patched[None], clean, corrupt, n_boot=500, seed=1)
    idx = np.random.default_rng(1).integers(0, n, size=(500, n))
    eff = [(patched[i].mean() - corrupt[i].mean()) / (clean[i].mean() - corrupt[i].mean()) for i in idx]
    np.testing.assert_allclose([lo[0], hi[0]], np.quantile(eff, [0.025, 0.975]), atol=1e-9)
    plo, phi = bootstrap_ci(patched[None], clean, corrupt, n_boot=500, seed=1, groups=people)
    assert phi[0] - plo[0] > hi[0] - lo[0]


def test_sweep_on_a_task_with_people_resamples_people(tiny):
    from replab.patching import load_task

    task = load_task("superclass", tiny.tokenizer, limit=6)
    res = sweep(tiny, task, site="resid_pre", by="layer", layers="0", metric="class_mass", n_boot=50)
    assert res.summary["bootstrap"].startswith("people")

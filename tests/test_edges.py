"""Edge-level circuits on the tiny model: the graph, exact edge patching against hand-written
TransformerLens hooks, EAP / EAP-IG / AtP* against first-order estimates computed by hand, and
the whole-graph faithfulness checks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from replab.circuits.eap import attribute_edges
from replab.circuits.graph import circuit_heads, edge_graph, head_overlap, node_view_overlap, parse_node
from replab.errors import ReplabError
from replab.patching import load_task
from replab.patching.edge_patch import EdgePatch, edge_mode
from replab.patching.engine import Variant, run_variants
from replab.patching.plan import run_plan


@pytest.fixture(scope="module")
def task(tiny):
    return load_task("next_day", tiny.tokenizer, limit=3)


@pytest.fixture(scope="module")
def graph(tiny):
    return edge_graph(tiny)


@pytest.fixture(scope="module")
def eap(tiny, task):
    return attribute_edges(tiny, task, "eap")


@pytest.fixture(scope="module")
def atp_star(tiny, task):
    return attribute_edges(tiny, task, "atp*", graddrop=True)


# --------------------------------------------------------------------------- hand references

RECEIVER_HOOK = {"q": "blocks.{}.hook_q_input", "k": "blocks.{}.hook_k_input", "v": "blocks.{}.hook_v_input",
                 "mlp": "blocks.{}.hook_mlp_in", "logits": "blocks.{}.hook_resid_post"}


def _sender_out(model, cache, sender):
    """A sender's output from a TransformerLens cache, written out by hand."""
    kind, layer, head = sender
    if kind == "embed":
        return cache["hook_embed"]                                   # rotary: no positional embedding
    if kind == "mlp":
        return cache[f"blocks.{layer}.hook_mlp_out"]
    return cache[f"blocks.{layer}.attn.hook_z"][:, :, head] @ model.blocks[layer].attn.W_O[head]


def _logit_diff(logits, task):
    last = logits[:, -1]
    return last.gather(1, task.answer[:, None])[:, 0] - last.gather(1, task.foil[:, None])[:, 0]


_CACHES: dict = {}


def _caches(model, task):
    key = (id(model), id(task))
    if key not in _CACHES:
        with torch.inference_mode(), edge_mode(model):
            _, clean = model.run_with_cache(task.clean)
            _, corrupt = model.run_with_cache(task.corrupt)
        _CACHES[key] = (clean, corrupt)
    return _CACHES[key]


def _add_at(head, delta, scale=1.0):
    def fn(act, hook):
        act = act.clone()
        if head is None:
            act += scale * delta
        else:
            act[:, :, head] += scale * delta
        return act
    return fn


def _reference_circuit(model, task, graph, removed):
    """Plain hook-by-hook forward of the clean run where the edges ``removed`` carry their corrupt
    value: every sender's live output is recorded as it is computed, and each receiver's input gets
    Σ over its removed senders of (corrupt output − live output). Returns the logits."""
    _, corrupt = _caches(model, task)
    live: dict = {}
    by_receiver: dict = {}
    for i in removed:
        by_receiver.setdefault(int(graph.edge_receiver[i]), []).append(graph.senders[int(graph.edge_sender[i])])

    def record(name):
        def fn(act, hook):
            live[name] = act.detach().clone()
        return fn

    def receive(r):
        kind, layer, head = graph.receivers[r]

        def fn(act, hook):
            act = act.clone()
            for s in by_receiver[r]:
                cache = {"hook_embed": live["hook_embed"],
                         f"blocks.{s[1]}.hook_mlp_out": live.get(f"blocks.{s[1]}.hook_mlp_out"),
                         f"blocks.{s[1]}.attn.hook_z": live.get(f"blocks.{s[1]}.attn.hook_z")}
                d = _sender_out(model, corrupt, s) - _sender_out(model, cache, s)
                if head is None:
                    act += d
                else:
                    act[:, :, head] += d
            return act
        return fn

    hooks = [("hook_embed", record("hook_embed"))]
    for layer in range(model.cfg.n_layers):
        hooks += [(f"blocks.{layer}.attn.hook_z", record(f"blocks.{layer}.attn.hook_z")),
                  (f"blocks.{layer}.hook_mlp_out", record(f"blocks.{layer}.hook_mlp_out"))]
    for r in by_receiver:
        kind, layer, _ = graph.receivers[r]
        hooks.append((RECEIVER_HOOK[kind].format(layer), receive(r)))
    # TransformerLens runs a hook point's hooks in registration order: records before receivers
    with torch.inference_mode(), edge_mode(model):
        return model.run_with_hooks(task.clean, fwd_hooks=hooks)


# --------------------------------------------------------------------------- the graph

def test_edge_count_tiny_by_hand(graph):
    # 4 layers, 4 query heads, 2 KV heads. Senders: EMBED + 4 x (4 heads + MLP) = 21.
    # q/k/v receivers of layer L (4 + 2 + 2 = 8 of them) read 1 + 5L senders: 8 x (1 + 6 + 11 + 16) = 272;
    # the MLP of layer L reads 1 + 5L + 4: 5 + 10 + 15 + 20 = 50; LOGITS reads all 21.
    assert graph.n_edges == 272 + 50 + 21 == 343
    assert graph.counts() == {"edges": 343, "senders": 21, "receivers": 37, "edges_into_q": 136,
                              "edges_into_k": 68, "edges_into_v": 68, "edges_into_mlp": 50, "edges_into_logits": 21}


def test_edge_count_smollm2_config():
    cfg = SimpleNamespace(n_layers=30, n_heads=9, n_key_value_heads=3, positional_embedding_type="rotary",
                          original_architecture="LlamaForCausalLM")
    g = edge_graph(SimpleNamespace(cfg=cfg))
    # attention inputs: 15 per layer reading 1 + 10L senders; MLP: 1 + 10L + 9; LOGITS: 301
    hand = sum(15 * (1 + 10 * L) + (10 + 10 * L) for L in range(30)) + 301
    assert g.n_edges == hand == 70651


def test_names_parse_and_lookup(graph):
    names = graph.edge_names()
    assert names[0] == "EMBED->L0H0.q"
    assert names[-1] == "L3MLP->LOGITS"
    assert "L1H2->L2KV1.k" in names and "L2H3->L2MLP" in names and "L2MLP->L2MLP" not in names
    idx = graph.edge_index(["L1H2->L2KV1.k", "EMBED->L0MLP"])
    assert [names[i] for i in idx] == ["L1H2->L2KV1.k", "EMBED->L0MLP"]
    with pytest.raises(ReplabError, match="unknown edge"):
        graph.edge_index(["L3H0->L1H0.q"])                      # downstream sender
    assert graph.query_heads(graph.receiver_names.index("L2KV1.k")) == [2, 3]
    assert parse_node("L9KV1.k") == ("receiver", ("k", 9, 1))
    assert parse_node("L7MLP") == ("node", ("mlp", 7, None))
    with pytest.raises(ReplabError):
        parse_node("L1X2")


def test_circuit_heads_and_overlap(graph):
    idx = graph.edge_index(["L0H1->L2KV1.v", "EMBED->L1H0.q"])
    assert circuit_heads(graph, idx) == ["L0H1", "L1H0", "L2H2", "L2H3"]
    o = head_overlap(["L0H1", "L1H0", "L2H2"], ["L2H2", "L3H1"])
    assert o["shared"] == ["L2H2"] and o["only_a"] == ["L0H1", "L1H0"] and o["jaccard"] == pytest.approx(0.25)
    # node-level view against a pruning circuit: every touched head, and the heaviest heads
    # (a k/v edge's weight is split over its KV group: L2H2, L2H3 get 0.3 each here)
    circuit = {"heads": circuit_heads(graph, idx),
               "edges": [{"sender": "L0H1", "receiver": "L2KV1.v", "score": -0.6},
                         {"sender": "EMBED", "receiver": "L1H0.q", "score": 0.5}]}
    v = node_view_overlap(circuit, ["L0H1", "L1H0", "L3H3"], 4, 2)
    assert v["heaviest_heads"] == ["L0H1", "L1H0", "L2H2"] and v["ranks_of_heads"] == {"L0H1": 1, "L1H0": 2,
                                                                                       "L3H3": None}
    assert v["touched"]["n_shared"] == 2 and v["touched"]["jaccard"] == pytest.approx(2 / 5)
    assert v["heaviest"]["shared"] == ["L0H1", "L1H0"] and v["heaviest"]["jaccard"] == pytest.approx(0.5)


def test_edge_patch_validation(tiny, task):
    with pytest.raises(ReplabError, match="not upstream"):
        run_variants(tiny, task.clean, task.corrupt, [Variant((EdgePatch("q", 1, 0, (("head", 1, 0),)),))])
    with pytest.raises(ReplabError, match="out of range"):
        run_variants(tiny, task.clean, task.corrupt, [Variant((EdgePatch("k", 1, 2, (("embed", 0),)),))])
    with pytest.raises(ReplabError, match="last layer"):
        run_variants(tiny, task.clean, task.corrupt, [Variant((EdgePatch("logits", 1, None, (("embed", 0),)),))])
    with pytest.raises(ReplabError, match="clean or corrupt"):
        EdgePatch("mlp", 1, None, (("embed", 0),), source="zero")
    assert not tiny.cfg.use_split_qkv_input and not tiny.cfg.use_hook_mlp_in   # edge mode restored


# --------------------------------------------------------------------------- exact edge patching

EDGES = ["EMBED->L0H1.q", "EMBED->L0KV1.k", "L0H2->L2KV0.v", "L1MLP->L3H3.q", "L2H3->L2MLP", "L0MLP->L2MLP",
         "L1H0->LOGITS", "L3MLP->LOGITS", "EMBED->L3KV1.v"]


def test_exact_edges_match_hook_reference(tiny, task, graph):
    from replab.circuits.edges import exact_edges

    idx = graph.edge_index(EDGES)
    table, res = exact_edges(tiny, task, graph, idx)
    assert set(res.checks) >= {"engine_full", "engine_empty", "edges_all_corrupt", "edges_identity"}
    clean_c, corrupt_c = _caches(tiny, task)
    for j, i in enumerate(idx):
        s, r = graph.senders[graph.edge_sender[i]], graph.receivers[graph.edge_receiver[i]]
        delta = _sender_out(tiny, corrupt_c, s) - _sender_out(tiny, clean_c, s)
        with torch.inference_mode(), edge_mode(tiny):
            logits = tiny.run_with_hooks(task.clean, fwd_hooks=[(RECEIVER_HOOK[r[0]].format(r[1]),
                                                                 _add_at(r[2], delta))])
        want = _logit_diff(logits, task).numpy()
        np.testing.assert_allclose(res.patched[j], want, atol=1e-4)
    assert float(np.ptp(res.patched[:len(idx)].mean(1))) > 1e-2      # the edges differ: the test can fail


def test_edge_patch_at_chosen_positions(tiny, task, graph):
    clean_c, corrupt_c = _caches(tiny, task)
    s = ("head", 0, 2)
    delta = _sender_out(tiny, corrupt_c, s) - _sender_out(tiny, clean_c, s)
    mask = torch.zeros_like(delta)
    mask[:, 5:] = 1
    with torch.inference_mode(), edge_mode(tiny):
        want = tiny.run_with_hooks(task.clean, fwd_hooks=[("blocks.2.hook_k_input", _add_at(1, delta * mask))])
    fin, _ = run_variants(tiny, task.clean, task.corrupt, [Variant((EdgePatch("k", 2, 1, (s,), positions=(5, 6, 7)),))],
                          base="clean")
    with torch.inference_mode():
        mine = tiny.unembed(tiny.ln_final(fin[0][:, None]))[:, 0]
    torch.testing.assert_close(mine, want[:, -1], atol=1e-4, rtol=0)


def test_circuit_forward_matches_hook_reference(tiny, task, graph):
    rng = np.random.default_rng(0)
    removed = np.flatnonzero(rng.random(graph.n_edges) < 0.6)
    fin, fw = run_variants(tiny, task.clean, task.corrupt, [Variant(graph.patches(removed))], base="clean")
    with torch.inference_mode():
        mine = tiny.unembed(tiny.ln_final(fin[0][:, None]))[:, 0]
    ref = _reference_circuit(tiny, task, graph, removed)[:, -1]
    torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)
    with torch.inference_mode():
        clean_logits = tiny.unembed(tiny.ln_final(fw["clean"].final[:, None]))[:, 0]
    assert float((ref - clean_logits).abs().max()) > 1e-2                # the circuit changes the output


def test_full_and_empty_graph_faithfulness(tiny, task, graph):
    from replab.circuits.discover import discover_circuits

    d = discover_circuits(tiny, task, ["eap"], [graph.n_edges, 40])
    full = d.table[d.table["n_edges"] == graph.n_edges].iloc[0]
    assert full["faithfulness"] == pytest.approx(1.0, abs=1e-6)
    checks = d.plan["checks"]
    assert abs(checks["edges_all_corrupt"]["value"]) < 1e-4                # empty circuit = corrupt run
    assert checks["edges_identity"]["value"] == pytest.approx(1.0, abs=1e-4)
    empty = run_plan(tiny, task, [Variant(graph.patches(np.arange(graph.n_edges)))], base="clean")
    assert abs(float(empty.effect[0])) < 1e-4
    c = d.circuits[("eap", 40)]
    assert len(c["edges"]) == 40 and c["n_effective"] == sum(e["effective"] for e in c["edges"])


def test_effective_edges_by_hand(graph):
    from replab.circuits.discover import effective_edges

    keep = np.zeros(graph.n_edges, bool)
    keep[graph.edge_index(["EMBED->L0H1.q", "L0H1->L2KV0.v", "L2H0->LOGITS", "L1H3->LOGITS",
                           "EMBED->L3MLP"])] = True
    eff = effective_edges(graph, keep)
    names = {graph.edge_names()[i] for i in np.flatnonzero(eff)}
    # L1H3 is never fed, L3MLP never reaches LOGITS; L2KV0.v feeds L2H0 and L2H1
    assert names == {"EMBED->L0H1.q", "L0H1->L2KV0.v", "L2H0->LOGITS"}


# --------------------------------------------------------------------------- attribution

class _no_param_grads:
    """Parameters stop requiring gradients inside (the hand derivatives only need ε's)."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def _edge_derivative(model, task, graph, i, input_value=None, drop=None):
    """d/dε of the mean logit difference when edge ``i``'s receiver input gets ``ε Δ``, at ε = 0
    (optionally with the embedding replaced and layer ``drop``'s outputs detached), by hand."""
    clean_c, corrupt_c = _caches(model, task)
    s, (kind, layer, head) = graph.senders[graph.edge_sender[i]], graph.receivers[graph.edge_receiver[i]]
    delta = (_sender_out(model, corrupt_c, s) - _sender_out(model, clean_c, s)).detach().clone()
    eps = torch.zeros((), requires_grad=True)
    hooks = [(RECEIVER_HOOK[kind].format(layer), _add_at(head, delta, eps))]
    if input_value is not None:
        hooks.append(("hook_embed", lambda act, hook: input_value))
    if drop is not None:
        hooks += [(f"blocks.{drop}.hook_attn_out", lambda act, hook: act.detach()),
                  (f"blocks.{drop}.hook_mlp_out", lambda act, hook: act.detach())]
    with torch.enable_grad(), edge_mode(model), _no_param_grads(model):
        m = _logit_diff(model.run_with_hooks(task.clean, fwd_hooks=hooks), task).mean()
        if not m.requires_grad:           # every path from the edge was detached
            return 0.0
        m.backward()
    return float(eps.grad)


PICK = ["EMBED->L0H1.q", "EMBED->L0KV1.k", "L0H2->L2KV0.v", "L1MLP->L3H3.q", "L2H3->L2MLP", "L1H0->LOGITS",
        "L0MLP->L3KV1.k"]


def test_eap_equals_first_order_estimate_by_hand(tiny, task, graph, eap):
    denom = eap.clean_metric - eap.corrupt_metric
    start = int((task.clean != task.corrupt).any(0).nonzero()[0])
    assert start > 0 and eap.passes == {"forwards": 2, "backwards": 1, "shared_prefix": start}
    for i in graph.edge_index(PICK):
        assert eap.scores[i] == pytest.approx(_edge_derivative(tiny, task, graph, i) / denom, rel=1e-4, abs=1e-7)
    assert float(np.abs(eap.scores).max()) > 1e-2


def test_eap_ig_one_step_is_eap_and_matches_hand_integral(tiny, task, graph, eap):
    one = attribute_edges(tiny, task, "eap-ig", steps=1, rule="riemann")
    np.testing.assert_array_equal(one.scores, eap.scores)
    ig = attribute_edges(tiny, task, "eap-ig", steps=3, rule="riemann")
    assert {k: ig.passes[k] for k in ("forwards", "backwards")} == {"forwards": 4, "backwards": 3}
    clean_c, corrupt_c = _caches(tiny, task)
    e0, e1 = corrupt_c["hook_embed"], clean_c["hook_embed"]
    denom = ig.clean_metric - ig.corrupt_metric
    for i in graph.edge_index(PICK[:4]):
        hand = np.mean([_edge_derivative(tiny, task, graph, i, input_value=e0 + (k / 3) * (e1 - e0))
                        for k in (1, 2, 3)])
        assert ig.scores[i] == pytest.approx(hand / denom, rel=1e-3, abs=1e-6)
    assert not np.allclose(ig.scores, eap.scores)


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_shared_prefix_gives_the_scores_of_whole_sequences(tiny, task, method):
    """The prefix where clean and corrupt agree, computed once (a frozen key/value cache), gives
    the same scores as running every pass on whole sequences."""
    fast = attribute_edges(tiny, task, method, steps=3)
    full = attribute_edges(tiny, task, method, steps=3, share_prefix=False)
    assert fast.passes["shared_prefix"] > 0 and "shared_prefix" not in full.passes
    np.testing.assert_allclose(fast.scores, full.scores, rtol=1e-4, atol=1e-7)
    assert fast.clean_metric == pytest.approx(full.clean_metric, abs=1e-5)
    assert fast.corrupt_metric == pytest.approx(full.corrupt_metric, abs=1e-5)


@pytest.mark.parametrize("rule", ["midpoint", "gauss-legendre"])
def test_eap_ig_rules_match_hand_quadrature(tiny, task, graph, rule):
    """The midpoint and Gauss–Legendre rules: the same hand-written edge derivative, evaluated at the
    rule's nodes and weighted by hand; one more forward than the Riemann sum (the clean senders)."""
    from replab.circuits.eap import ig_nodes

    ig = attribute_edges(tiny, task, "eap-ig", steps=3, rule=rule)
    assert {k: ig.passes[k] for k in ("forwards", "backwards")} == {"forwards": 5, "backwards": 3}
    assert ig.rule == rule
    alphas = {"midpoint": [1 / 6, 1 / 2, 5 / 6],
              "gauss-legendre": [0.5 - 0.5 * np.sqrt(0.6), 0.5, 0.5 + 0.5 * np.sqrt(0.6)]}[rule]
    weights = {"midpoint": [1 / 3] * 3, "gauss-legendre": [5 / 18, 8 / 18, 5 / 18]}[rule]
    np.testing.assert_allclose(ig_nodes(3, rule), [alphas, weights], atol=1e-12)
    clean_c, corrupt_c = _caches(tiny, task)
    e0, e1 = corrupt_c["hook_embed"], clean_c["hook_embed"]
    denom = ig.clean_metric - ig.corrupt_metric
    for i in graph.edge_index(PICK[:4]):
        hand = sum(w * _edge_derivative(tiny, task, graph, i, input_value=e0 + a * (e1 - e0))
                   for a, w in zip(alphas, weights, strict=True))
        assert ig.scores[i] == pytest.approx(hand / denom, rel=1e-3, abs=1e-6)
    with pytest.raises(ReplabError, match="unknown integration rule"):
        attribute_edges(tiny, task, "eap-ig", steps=3, rule="trapezoid")


def test_atp_star_qk_fix_by_hand(tiny, task, graph, eap, atp_star):
    """q/k edges: (pattern with the edge patched, from a TransformerLens forward) − pattern, times
    ∂M/∂pattern at the clean run; every other edge keeps the linear estimate."""
    assert atp_star.checks["qk_recompute"]["ok"]
    # AtP* runs whole sequences, EAP computes the shared prefix once: equal up to float rounding
    np.testing.assert_allclose(atp_star.extra["atp"], eap.scores, rtol=1e-4, atol=2e-6)
    kinds = np.array([graph.receivers[r][0] for r in graph.edge_receiver])
    lin = ~np.isin(kinds, ("q", "k"))
    # value, MLP and logit edges keep the linear estimate: EAP's (an independent run), and exactly
    # the run's own plain AtP (only the QK mask decides which edges change)
    np.testing.assert_allclose(atp_star.scores[lin], eap.scores[lin], rtol=1e-4, atol=2e-6)
    np.testing.assert_array_equal(atp_star.scores[lin], atp_star.extra["atp"][lin])
    clean_c, corrupt_c = _caches(tiny, task)
    pats = {}
    def keep(act, hook):
        act.retain_grad()
        pats[hook.layer()] = act
        return act

    with torch.enable_grad(), edge_mode(tiny), _no_param_grads(tiny):
        hooks = [("hook_embed", lambda act, hook: act.detach().requires_grad_(True)),
                 (lambda n: n.endswith("hook_pattern"), keep)]
        _logit_diff(tiny.run_with_hooks(task.clean, fwd_hooks=hooks), task).mean().backward()
    denom = eap.clean_metric - eap.corrupt_metric
    group = tiny.cfg.n_heads // tiny.cfg.n_key_value_heads
    for i in graph.edge_index(["EMBED->L0H1.q", "L0H2->L2H3.q", "EMBED->L0KV1.k", "L1MLP->L3KV0.k"]):
        s, (kind, layer, head) = graph.senders[graph.edge_sender[i]], graph.receivers[graph.edge_receiver[i]]
        delta = _sender_out(tiny, corrupt_c, s) - _sender_out(tiny, clean_c, s)
        got = {}
        with torch.inference_mode(), edge_mode(tiny):
            tiny.run_with_hooks(task.clean, fwd_hooks=[
                (RECEIVER_HOOK[kind].format(layer), _add_at(head, delta)),
                (f"blocks.{layer}.attn.hook_pattern", lambda act, hook, got=got: got.setdefault("p", act.clone()))])
        heads = [head] if kind == "q" else list(range(head * group, (head + 1) * group))
        p0 = pats[layer].detach()
        hand = sum(float(((got["p"][:, h] - p0[:, h]) * pats[layer].grad[:, h]).sum()) for h in heads)
        assert atp_star.scores[i] == pytest.approx(hand / denom, rel=1e-3, abs=1e-7)


def test_graddrop_by_hand(tiny, task, graph, atp_star):
    """GradDrop = Σ_ℓ |estimate with layer ℓ's outputs detached| / (L − 1) (value and MLP edges,
    whose estimates are linear)."""
    denom = atp_star.clean_metric - atp_star.corrupt_metric
    n = tiny.cfg.n_layers
    for i in graph.edge_index(["L0H2->L2KV0.v", "EMBED->L1MLP", "L0MLP->LOGITS"]):
        hand = sum(abs(_edge_derivative(tiny, task, graph, i, drop=ell)) for ell in range(n)) / (n - 1)
        assert atp_star.extra["graddrop"][i] == pytest.approx(hand / abs(denom), rel=1e-3, abs=1e-7)


def test_score_edges_verifies_in_the_same_run(tiny, task, eap):
    from replab.circuits.edges import score_edges

    res = score_edges(tiny, task, "eap", n_top=10, n_random=20, seed=1, attribution=eap)
    v = res.verification
    assert v["status"] == "ran" and v["score"]["n"] == 30 and v["sample"] == {"top": 10, "random": 20, "chosen": 0}
    assert v["score"]["spearman"] > 0.8 and "score_top" in v
    sample = res.sample
    assert len(sample) == 30 and sample["exact"].notna().all()
    top10 = res.table.nsmallest(10, "rank")
    assert (top10["sampled"] == "top").all()
    off = score_edges(tiny, task, "eap", verify=False, attribution=eap)
    assert off.verification["status"].startswith("not run") and off.table["exact"].isna().all()
    with pytest.raises(ReplabError, match="--edges"):
        score_edges(tiny, task, "exact")


def test_compare_reports_when_it_cannot_run():
    from replab.circuits.edges import agreement

    assert agreement(np.ones(5), np.arange(5.0), list("abcde"))["status"].startswith("not run")
    assert agreement(np.ones(2), np.arange(2.0), list("ab"))["status"].startswith("not run")
    c = agreement(np.array([1.0, -2, 3, 0.5]), np.array([1.1, -1.9, 2.5, -0.2]), list("abcd"))
    assert c["sign_disagreements"] == 1 and c["sign_disagreements_material"] == 1
    assert c["worst_sign_disagreements"][0]["edge"] == "d"


def test_existing_results_are_unchanged_by_edge_mode(tiny, task):
    from replab.patching import Intervention

    v = [Variant((Intervention("z", 1, head=2),)), Variant((Intervention("resid_pre", 2, positions=(3,)),))]
    a, _ = run_variants(tiny, task.clean, task.corrupt, v)
    run_variants(tiny, task.clean, task.corrupt, [Variant(edge_graph(tiny).patches([5]))], base="clean")
    b, _ = run_variants(tiny, task.clean, task.corrupt, v)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------- command line

def test_cli_edges_and_discover(tmp_path, capsys):
    import json

    from replab_testutil import run_cli

    code, out, err = run_cli(["circuit", "edges", "--model", "tiny", "--limit", "3", "--method", "atp*",
                              "--no-graddrop", "--top", "5", "--random", "10", "--out", tmp_path / "e", "--json"],
                             capsys)
    assert code == 0, err
    s = json.loads(out)
    assert s["graph"]["edges"] == 343 and s["verification"]["status"] == "ran"
    assert "atp" in s["verification"] and s["attribution"]["checks"]["qk_recompute"]["ok"]
    assert (tmp_path / "e" / "edges.parquet").exists() and (tmp_path / "e" / "approx_vs_exact.svg").exists()
    code, out, err = run_cli(["circuit", "discover", "--model", "tiny", "--limit", "3", "--method", "eap-ig",
                              "--steps", "2", "--edges", "20,343", "--threshold", "0.99", "--compare-heads",
                              "L0H1,L3H2", "--out", tmp_path / "d", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert len(d["curve"]) == 2 and {r["n_edges"] for r in d["curve"]} == {20, 343}
    assert all(r["faithfulness"] == 1.0 for r in d["curve"] if r["n_edges"] == 343)
    assert set(d["overlap_with_compare_heads"]) == {"eap-ig"}
    circuit = json.loads((tmp_path / "d" / "circuits" / "eap-ig_20.json").read_text())
    assert len(circuit["edges"]) == 20 and (tmp_path / "d" / "circuits" / "eap-ig_20.png").exists()
    assert (tmp_path / "d" / "faithfulness.png").exists()
    # both runs are replayable from their config.yaml (written first; summary.json last)
    import yaml

    for run, kind in (("e", "edges"), ("d", "discover")):
        config = yaml.safe_load((tmp_path / run / "config.yaml").read_text())
        assert config["kind"] == kind and config["command"].startswith(f"replab circuit {kind} ")
        first, last = ((tmp_path / run / f).stat().st_mtime_ns for f in ("config.yaml", "summary.json"))
        assert last >= first
    assert "--top 5 --random 10" in yaml.safe_load((tmp_path / "e" / "config.yaml").read_text())["command"]
    code, out, err = run_cli(["circuit", "replay", tmp_path / "d", "--out", tmp_path / "d2", "--json"], capsys)
    assert code == 0, err
    again = json.loads(out)
    assert again["kind"] == "circuit_discover" and again["curve"] == d["curve"]
    assert again["overlap_with_compare_heads"] == d["overlap_with_compare_heads"]


@pytest.mark.parametrize("args, message", [
    (["edges", "--method", "exact"], "--edges"),
    (["edges", "--method", "nope"], "unknown edge method"),
    (["edges", "--metric", "kl"], "kl"),
    (["edges", "--method", "exact", "--edges", "L3H0->L1H0.q"], "unknown edge"),
    (["discover", "--method", "exact"], "unknown edge method"),
    (["discover", "--edges", "0,10"], "positive"),
    (["discover", "--compare-heads", "L1MLP"], "query heads"),
    (["edges", "--method", "eap-ig", "--rule", "simpson"], "unknown integration rule"),
    (["discover", "--rule", "simpson"], "unknown integration rule"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    from replab_testutil import run_cli

    code, _, err = run_cli(["circuit", *args, "--model", "tiny", "--limit", "2", "--out", tmp_path / "x"], capsys)
    assert code == 2 and err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1


def test_random_sample_does_not_follow_the_last_digits_of_the_scores():
    """The 200 random edges of the exact check are drawn in graph order: noise that leaves the
    top 50 alone leaves the sample alone (drawn by rank, this noise changed 79 of the 200)."""
    from replab.circuits.edges import sample_edges

    rng = np.random.default_rng(1)
    scores = rng.normal(size=20_000) * np.where(np.arange(20_000) < 50, 100.0, 1e-3)
    noisy = scores * (1 + 1e-4 * rng.normal(size=scores.size))
    a, why = sample_edges(scores, 50, 200, seed=0)
    b, _ = sample_edges(noisy, 50, 200, seed=0)
    assert why == ["top"] * 50 + ["random"] * 200 and len(set(a)) == 250
    assert set(a[:50]) == set(range(50)) and set(b[:50]) == set(range(50))
    np.testing.assert_array_equal(a[50:], b[50:])
    assert not set(a[50:]) & set(range(50))
    c, _ = sample_edges(scores, 50, 200, seed=1)
    assert set(c[50:]) != set(a[50:])                     # the seed still picks the sample

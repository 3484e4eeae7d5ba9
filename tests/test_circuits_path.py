"""Path patching against a hand-written TransformerLens implementation of Wang et al.'s
semantics (three plain forwards per path, hooks only), within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replab.circuits.components import parse_components
from replab.circuits.path import parse_receiver, path_patch
from replab.errors import ReplabError
from replab.patching import load_task


@pytest.fixture(scope="module")
def task(tiny):
    return load_task("next_day", tiny.tokenizer, limit=4)


def tl_path_patch(model, task, senders, receiver: str, freeze_mlps: bool = False):
    """Reference: clean cache, corrupt cache; stage 1 = clean run with every head's z frozen at
    clean except the senders (corrupt), MLPs frozen if asked; receiver logits -> that run's
    logit difference; receiver L.H.x -> record hook_x there, stage 2 = clean run with only that
    head's (KV head's) x replaced. ``senders``: ``(layer, head)`` or ``(layer, head, positions)``.
    Returns the per-prompt logit difference."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    group = H // (model.cfg.n_key_value_heads or H)
    with torch.inference_mode():
        _, cc = model.run_with_cache(task.clean)
        _, xc = model.run_with_cache(task.corrupt)
    rec_layer = rec_head = part = None
    mlp_receiver = None
    if receiver.endswith("MLP"):
        mlp_receiver = int(receiver[1:-3])
    elif receiver != "logits":
        head, part = receiver.split(".")
        rec_layer, rec_head = (int(x) for x in head[1:].split("H"))

    def z_hook(a, hook):
        layer = int(hook.name.split(".")[1])
        new = cc[hook.name].clone()
        for s_layer, s_head, *pos in senders:
            if s_layer == layer:
                p = list(pos[0]) if pos else slice(None)
                new[:, p, s_head] = xc[hook.name][:, p, s_head]
        return new
    hooks = [(f"blocks.{layer}.attn.hook_z", z_hook) for layer in range(L)]
    if freeze_mlps:
        hooks += [(f"blocks.{layer}.hook_mlp_out", lambda a, hook: cc[hook.name]) for layer in range(L)
                  if layer != mlp_receiver]
    seen = {}
    target = None
    if receiver != "logits":
        target = (f"blocks.{mlp_receiver}.hook_mlp_out" if mlp_receiver is not None
                  else f"blocks.{rec_layer}.attn.hook_{part}")
        hooks.append((target, lambda a, hook: seen.setdefault("x", a.clone())))
    with torch.inference_mode():
        logits = model.run_with_hooks(task.clean, fwd_hooks=hooks)[:, -1]
        if receiver != "logits":
            idx = None if mlp_receiver is not None else rec_head if part == "q" else rec_head // group

            def put(a, hook):
                a = a.clone()
                if mlp_receiver is not None:
                    return seen["x"]
                a[:, :, idx] = seen["x"][:, :, idx]
                return a
            logits = model.run_with_hooks(task.clean, fwd_hooks=[(target, put)])[:, -1]
    i = torch.arange(task.n_prompts)
    return (logits[i, task.answer] - logits[i, task.foil]).numpy()


@pytest.mark.parametrize("receiver, freeze", [("logits", False), ("logits", True), ("L3H2.v", False),
                                              ("L3H1.q", True), ("L2MLP", False)])
def test_path_patching_matches_hand_written_transformer_lens(tiny, task, receiver, freeze):
    senders = [(0, 1), (1, 2), (2, 3)]
    sets = [[c] for c in parse_components(",".join(f"L{a}H{b}" for a, b in senders), tiny)]
    sets.append(parse_components("L1H0,L2H1", tiny))
    res = path_patch(tiny, task, sets, parse_receiver(receiver, tiny), freeze_mlps=freeze, n_boot=20)
    refs = [tl_path_patch(tiny, task, [(c.layer, c.head) for c in s], receiver, freeze) for s in sets]
    mine = res.plan.patched[:len(sets)]
    np.testing.assert_allclose(mine, np.stack(refs), atol=1e-4)
    # the sender sets' results differ by more than 10x the tolerance, so agreement says something
    assert float(np.ptp(np.stack(refs), axis=0).max()) > 10 * 1e-4
    assert res.summary["checks"]["path_empty_senders"]["ok"]
    if receiver == "logits":
        assert {"path_all_senders", "path_direct_dla"} <= set(res.summary["checks"])
    if receiver == "L3H2.v":      # GQA: the receiver is the KV head query head 2 reads
        assert res.records[0]["kv_head"] == 1 and res.records[0]["kv_group"] == "L3H2,L3H3"
    rec = res.records[-1]
    assert set(rec) >= {"sender", "receiver", "metric", "clean_metric", "corrupt_metric", "normalized_effect",
                        "ci_low", "ci_high"}
    assert rec["sender"] == ["L1H0", "L2H1"] and rec["receiver"] == receiver


def test_senders_at_positions(tiny, task):
    sets = [parse_components("L1H2@5,6", tiny), parse_components("L0H1@-1,L2H0", tiny)]
    res = path_patch(tiny, task, sets, parse_receiver("L3H0.q"), n_boot=20)
    ref = [tl_path_patch(tiny, task, [(1, 2, (5, 6))], "L3H0.q"),
           tl_path_patch(tiny, task, [(0, 1, (7,)), (2, 0)], "L3H0.q")]
    np.testing.assert_allclose(res.plan.patched[:2], np.stack(ref), atol=1e-4)


def test_path_ablation_and_errors(tiny, task):
    from replab.circuits.ablation import Ablation

    sets = [parse_components("L1H2", tiny)]
    res = path_patch(tiny, task, sets, parse_receiver("logits"), ablation=Ablation("mean"), freeze_mlps=True,
                     n_boot=20)
    assert res.records[0]["ablation"] == "mean"
    with pytest.raises(ReplabError, match="not below the receiver"):
        path_patch(tiny, task, [parse_components("L3H1", tiny)], parse_receiver("L3H2.q"))
    with pytest.raises(ReplabError, match="needs its input"):
        parse_receiver("L3H2")
    with pytest.raises(ReplabError, match="out of range"):
        parse_receiver("L9H1.q", tiny)

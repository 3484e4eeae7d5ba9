"""Engine extensions the circuit tools need, each against a hand-written TransformerLens hook:
several heads in one intervention, the vectorised masked writes (bit-identical to one-by-one
writes), recording a variant's activations, custom sources per hook, other metrics from the
same forwards, and the mean over another prompt set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from replab.patching import Intervention, Variant, load_task, run_variants
from replab.patching.metrics import readout


@pytest.fixture(scope="module")
def task(tiny):
    return load_task("next_day", tiny.tokenizer, limit=3)


def _logits(model, task, variants, base="corrupt", **kw):
    fin, _ = run_variants(model, task.clean, task.corrupt, variants, base=base, **kw)
    cols = torch.arange(model.cfg.d_vocab).repeat(task.n_prompts, 1)
    return torch.stack([readout(model, f, cols, False).cand for f in fin])


def _hooked(model, tokens, hooks):
    with torch.inference_mode():
        return model.run_with_hooks(tokens, fwd_hooks=hooks)[:, -1]


def test_several_heads_in_one_intervention_match_a_manual_hook(tiny, task):
    _, cc = tiny.run_with_cache(task.clean)
    hook = "blocks.2.attn.hook_z"

    def patch(a, hook):
        a = a.clone()
        a[:, 5:, [0, 3]] = cc[hook.name][:, 5:, [0, 3]]
        return a
    want = _hooked(tiny, task.corrupt, [(hook, patch)])
    got = _logits(tiny, task, [Variant((Intervention("z", 2, head=(3, 0), positions=(5, 6, 7)),))])[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    one_by_one = Variant((Intervention("z", 2, head=0, positions=(5, 6, 7)),
                          Intervention("z", 2, head=3, positions=(5, 6, 7))))
    torch.testing.assert_close(_logits(tiny, task, [one_by_one])[0], got, atol=0, rtol=0)
    iv = Intervention("z", 2, head=[3, 0, 3])
    assert iv.head == (0, 3) and Intervention.from_dict(json.loads(json.dumps(iv.to_dict()))) == iv


def test_vectorised_writes_are_bit_identical(tiny, task):
    """Many variants at one hook (merged masks), overlapping interventions in one variant (order
    kept), mixed sources, neurons and patterns: vectorised == one-by-one, to the bit."""
    vs = []
    for src in ("clean", "zero", "mean", "resample", "corrupt"):
        for h in range(4):
            vs.append(Variant((Intervention("z", 1, head=(h, (h + 1) % 4), source=src),
                               Intervention("z", 1, head=h, positions=(6,), source="zero"),
                               Intervention("mlp_post", 2, neurons=(1, 5), positions=(3, 7), source=src),
                               Intervention("pattern", 3, head=h, positions=(7,), source=src),
                               Intervention("resid_mid", 3, source=src, positions=(4,)))))
    vs.append(Variant((Intervention("v", 1, head=1, source="noise", scale=0.3),
                       Intervention("z", 2, head=(0, 1, 2), source="clean"))))
    for base in ("corrupt", "clean"):
        a, _ = run_variants(tiny, task.clean, task.corrupt, vs, base=base)
        b, _ = run_variants(tiny, task.clean, task.corrupt, vs, base=base, vectorise=False)
        assert torch.equal(a, b)


def test_recording_returns_the_patched_activation(tiny, task):
    _, cc = tiny.run_with_cache(task.clean)
    seen = {}

    def patch(a, hook):
        a = a.clone()
        a[:, :, 1] = cc[hook.name][:, :, 1]
        return a

    def grab(a, hook):
        seen[hook.name] = a.clone()
        return a
    _hooked(tiny, task.corrupt, [("blocks.1.attn.hook_z", patch), ("blocks.1.attn.hook_z", grab),
                                 ("blocks.3.attn.hook_q", grab), ("blocks.0.hook_mlp_out", grab)])
    rec: dict = {}
    v = Variant((Intervention("z", 1, head=1),), record=("blocks.1.attn.hook_z", "blocks.3.attn.hook_q",
                                                         "blocks.0.hook_mlp_out"))
    run_variants(tiny, task.clean, task.corrupt, [v], recorded=rec)      # prefix shortcut: positions < p filled
    for name, want in seen.items():
        torch.testing.assert_close(rec[0][name], want, atol=1e-5, rtol=1e-5)
    assert float((rec[0]["blocks.3.attn.hook_q"] - cc["blocks.3.attn.hook_q"]).abs().max()) > 1e-3


def test_custom_sources_by_hook_and_values_of_another_metric(tiny, task):
    from replab.patching.plan import run_plan

    _, cc = tiny.run_with_cache(task.clean)
    hooks = ["blocks.1.hook_mlp_out", "blocks.2.attn.hook_z"]
    plain = [Variant((Intervention("mlp_out", 1), Intervention("z", 2, head=(0, 2))), name="a")]
    custom = [Variant((Intervention("mlp_out", 1, source="custom:x"), Intervention("z", 2, head=(0, 2),
                                                                                  source="custom:x")), name="a")]
    a = run_plan(tiny, task, plain, "logit_diff", n_boot=10)
    b = run_plan(tiny, task, custom, "logit_diff", n_boot=10, sources={"x": {h: cc[h] for h in hooks}})
    # the clean-sourced run uses the cached-prefix shortcut, the custom one every position
    np.testing.assert_allclose(a.patched, b.patched, atol=1e-6)
    kl = run_plan(tiny, task, plain, "kl", n_boot=10)
    np.testing.assert_allclose(a.values("kl")[2], kl.patched, rtol=1e-5, atol=1e-7)   # no new forward
    assert kl.patched.min() > 1e-4


def test_mean_over_another_prompt_set_matches_a_manual_hook(tiny, task):
    from replab.circuits.ablation import Ablation, other_tokens
    from replab.patching.plan import run_plan

    other = other_tokens(tiny, "next_day#corrupt", task.n_tokens)
    assert other.shape[1] == task.n_tokens
    _, oc = tiny.run_with_cache(other)
    hook = "blocks.2.attn.hook_z"
    mean = oc[hook].mean(0)

    def patch(a, hook):
        a = a.clone()
        a[:, :, 1] = mean[None, :, 1]
        return a
    want = _hooked(tiny, task.clean, [(hook, patch)])
    abl = Ablation("mean-other", mean_over="next_day#corrupt")
    v = Variant((Intervention("z", 2, head=1, source=abl.source),))
    res = run_plan(tiny, task, [v], "logit_diff", base="clean", sources=abl.sources(tiny, task, [hook]), n_boot=10)
    i = torch.arange(task.n_prompts)
    ld = want[i, task.answer] - want[i, task.foil]
    torch.testing.assert_close(torch.tensor(res.patched[0], dtype=torch.float32), ld, atol=1e-4, rtol=0)

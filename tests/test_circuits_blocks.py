"""Block sweeps, backup heads (hydra), the generalisation grid and the sequence task, on the
tiny model against hand-written hooks and replab's DLA."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from replab.circuits.ablation import Ablation
from replab.circuits.blocks import block_sweeps
from replab.circuits.components import parse_components
from replab.circuits.hydra import find_backups
from replab.patching import load_task


@pytest.fixture(scope="module")
def task(tiny):
    return load_task("next_day", tiny.tokenizer, limit=3)


def _ld(logits, task):
    i = torch.arange(task.n_prompts)
    return float((logits[i, task.answer] - logits[i, task.foil]).mean())


def test_block_sweeps_match_manual_hooks(tiny, task):
    res = block_sweeps(tiny, task, [2], Ablation("zero"), positions=(7,), n_boot=20)
    t = res.table.set_index(["block", "test"])
    assert len(res.table) == 2 * (1 + 4 + 1) and set(t.index.get_level_values(0)) == {"RESID", "H0", "H1", "H2",
                                                                                       "H3", "MLP"}
    _, cc = tiny.run_with_cache(task.clean)

    def zero_h1(a, hook):
        a = a.clone()
        a[:, 7, 1] = 0
        return a

    def clean_mlp(a, hook):
        a = a.clone()
        a[:, 7] = cc[hook.name][:, 7]
        return a
    with torch.inference_mode():
        nec = _ld(tiny.run_with_hooks(task.clean, fwd_hooks=[("blocks.2.attn.hook_z", zero_h1)])[:, -1], task)
        suf = _ld(tiny.run_with_hooks(task.corrupt, fwd_hooks=[("blocks.2.hook_mlp_out", clean_mlp)])[:, -1], task)
    assert t.loc[("H1", "necessity"), "metric_after"] == pytest.approx(nec, abs=1e-4)
    assert t.loc[("MLP", "sufficiency"), "metric_after"] == pytest.approx(suf, abs=1e-4)
    assert {"answer_logit", "foil_logit", "candidate_logits", "kl"} <= set(res.table.columns)


def test_hydra_direct_effects_agree_with_dla(tiny, task):
    from replab.patching.logit_attribution import dla

    res = find_backups(tiny, task, parse_components("L2H1", tiny), Ablation("zero"), n_boot=20)
    heads = dla(tiny, task)["heads"]
    want = heads.groupby(["layer", "head"])["logit_diff"].mean()
    got = res.table.set_index(["layer", "head_index"])["dla_clean"]
    np.testing.assert_allclose(got.loc[want.index].to_numpy(), want.to_numpy(), atol=1e-5)
    # the scale of the "little lost" verdict: the clean logit difference (minus the unembedding bias term)
    with torch.inference_mode():
        last = tiny(task.clean)[:, -1]
    ld = last.gather(1, task.answer[:, None]) - last.gather(1, task.foil[:, None])
    bias = (tiny.b_U[task.answer] - tiny.b_U[task.foil]).detach() if tiny.b_U is not None else 0.0
    assert res.summary["clean_logit_diff"] == pytest.approx(float((ld[:, 0] - bias).mean()), abs=1e-4)
    # ablated run by hand: z at the last position of the zero-ablated run, its own final-norm scale
    def zero(a, hook):
        a = a.clone()
        a[:, :, 1] = 0
        return a
    with torch.inference_mode():
        store = {}
        def keep(a, hook):
            store[hook.name] = a[:, -1].clone()
        hooks = [("blocks.2.attn.hook_z", zero)] + [(f"blocks.{k}.attn.hook_z", keep) for k in range(4)]
        hooks.append(("ln_final.hook_scale", keep))
        tiny.run_with_hooks(task.clean, fwd_hooks=hooks)
    with torch.inference_mode():
        u = (tiny.W_U[:, task.answer] - tiny.W_U[:, task.foil]).T
        out = torch.einsum("nhe,hed->nhd", store["blocks.3.attn.hook_z"], tiny.W_O[3])
        by_hand = (out / store["ln_final.hook_scale"][:, :, None] * tiny.ln_final.w * u[:, None]).sum(-1).mean(0)
    got = res.table[res.table.layer == 3].sort_values("head_index")["dla_ablated"].to_numpy()
    np.testing.assert_allclose(got, by_hand.numpy(), atol=1e-5)
    assert res.verdict.startswith(("widen the set", "no backup", "no direct effect lost"))
    assert bool(res.table.set_index("head").loc["L2H1", "in_set"])


def test_hydra_verdicts():
    from replab.circuits.hydra import backup_verdict

    def others(lost):
        comp = np.array([0.3, 0.05, 0.01])
        return pd.DataFrame({"head": ["L3H1", "L3H2", "L2H0"], "compensation": comp, "ci_low": [0.1, 0.01, -0.1],
                             "fraction_of_lost": comp / lost if lost > 0 else np.nan})
    v, b = backup_verdict(others(1.0), 1.0, 0.1, "logit_diff", 2.0, 1.0)
    assert v.startswith("widen the set: L3H1 compensates +0.300 (30% of the lost direct effect +1.00)")
    assert list(b["head"]) == ["L3H1"]
    v, b = backup_verdict(others(10.0), 10.0, 0.1, "logit_diff", 2.0, 1.0)
    assert v.startswith("no backup: no head compensates more than +0.300 (3% of") and b.empty
    # little lost (under 2% of the clean logit difference): no fraction, no backup named
    v, b = backup_verdict(others(0.01), 0.01, 0.1, "logit_diff", 2.0, 1.9, scale=2.0)
    assert v.startswith("little direct effect lost: the set's own direct effect falls by only +0.010 (0% of the "
                        "clean logit difference 2.000)") and "L3H1 +0.300" in v and b.empty
    v, _ = backup_verdict(others(1.0), 1.0, 0.1, "logit_diff", 2.0, 1.0, scale=2.0)     # 50%: not little
    assert v.startswith("widen the set: L3H1")
    from replab.circuits.hydra import _pct
    assert _pct(-0.001) == "0%" and _pct(0.38) == "38%"
    # the set's own direct effect rose (it acts through later heads): no fraction of a negative loss
    v, b = backup_verdict(others(-0.02), -0.02, 0.1, "logit_diff", 4.5, 2.7)
    assert v.startswith("no direct effect lost: the set's own direct effect changes by +0.020 while logit_diff "
                        "goes 4.500 -> 2.700") and "L3H1 +0.300" in v and b.empty


def test_grid_splits_by_class_with_controls(tiny):
    from replab.circuits.grid import control_task, grid_sweep, superclass_tasks

    tasks = superclass_tasks(tiny.tokenizer, ["artist", "scientist"], pairs=3)
    assert set(tasks) == {("artist", "scientist"), ("scientist", "artist")}
    first = ("artist", "scientist")
    ctrl = {first: control_task(tiny.tokenizer, tasks[first])}
    assert ctrl[first].n_prompts >= 1 and ctrl[first].meta["controls"]
    res = grid_sweep(tiny, tasks, "blocks", layers=[1], metric="class_mass", controls=ctrl, n_boot=20)
    assert set(res.by_class["class"]) == {"artist", "scientist"}
    assert len(res.by_class) == 2 * 2 * 6 and set(res.controls["silent"]) <= {"yes", "no", "n/a"}
    assert set(res.controls["class"]) == {"artist"} and len(res.controls) == 2 * 6
    seq = load_task("sequences:months,weekdays", tiny.tokenizer, limit=6)
    assert seq.meta["corruption"] == "shift" and bool((seq.clean != seq.corrupt).any())
    res = grid_sweep(tiny, {"seq": seq}, "necessity", components=parse_components("L1H1,L2MLP", tiny),
                     label="seq_type", n_boot=20)
    assert set(res.by_class["class"]) <= {"months", "weekdays"} and len(res.by_class) >= 1

"""Patching on SmolLM2 (integration): TransformerLens agreement on sampled cells, W2 facts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def task(smol):
    from replab.patching import load_task

    return load_task("next_day", smol.tokenizer)


def test_sampled_cells_agree_with_transformer_lens(smol, task):
    from transformer_lens import patching

    from replab.patching import sweep

    def metric(logits):
        last = logits[:, -1]
        return (last.gather(1, task.answer[:, None])[:, 0] - last.gather(1, task.foil[:, None])[:, 0]).mean()

    _, clean_cache = smol.run_with_cache(task.clean)
    cells = pd.DataFrame({"layer": [0, 12, 21, 23, 29], "pos": [3, 3, 7, 3, 7]})
    ref = patching.generic_activation_patch(smol, task.corrupt, clean_cache, metric,
                                            patching.layer_pos_patch_setter, "resid_pre", index_df=cells)
    res = sweep(smol, task, site="resid_pre", by="layer,position", layers="0,12,21,23,29", positions=[3, 7],
                n_boot=50)
    mine = res.table.set_index(["layer", "position"])["metric_after"]
    np.testing.assert_allclose([mine[(r.layer, r.pos)] for r in cells.itertuples()], ref.numpy(), atol=1e-4)
    heads = pd.DataFrame({"layer": [23, 23, 29], "head": [0, 5, 1]})
    ref_h = patching.generic_activation_patch(smol, task.corrupt, clean_cache, metric,
                                              patching.layer_head_vector_patch_setter, "z", index_df=heads)
    res_h = sweep(smol, task, site="z", by="layer,head", layers="23,29", heads=[0, 1, 5], n_boot=50)
    mine_h = res_h.table.set_index(["layer", "head"])["metric_after"]
    np.testing.assert_allclose([mine_h[(r.layer, r.head)] for r in heads.itertuples()], ref_h.numpy(), atol=1e-4)
    assert all(c["ok"] for c in res.summary["checks"].values())
    # W2: the day's information sits at the day token early and at the last token late
    eff = res.table.set_index(["layer", "position"])["normalized_effect"]
    assert eff[(0, 3)] > 0.95 and eff[(29, 7)] > 0.95 and eff[(29, 3)] < 0.05


def test_atp_ranks_heads_like_exact_patching(smol, task):
    """Issue acceptance: AtP against exact head patching on next_day, Spearman >= 0.8."""
    from replab.patching.attribution import atp_with_exact

    table, summary = atp_with_exact(smol, task, top=5)
    assert summary["heads_compared"] == smol.cfg.n_layers * smol.cfg.n_heads
    assert summary["heads_spearman"] >= 0.8, summary

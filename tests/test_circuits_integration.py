"""Circuits on SmolLM2 (integration): path patching against the hand-written TransformerLens
implementation (logits, frozen MLPs, a head's v input under GQA), and the sequence task."""

from __future__ import annotations

import numpy as np
import pytest
from test_circuits_path import tl_path_patch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def task(smol):
    from replab.patching import load_task

    return load_task("next_day", smol.tokenizer, limit=4)


@pytest.mark.parametrize("receiver, freeze", [("logits", False), ("logits", True), ("L23H3.v", False)])
def test_path_patching_matches_transformer_lens_on_smollm2(smol, task, receiver, freeze):
    from replab.circuits.components import parse_components
    from replab.circuits.path import parse_receiver, path_patch

    names = "L20H8,L21H4,L22H1" if receiver != "logits" else "L23H3,L29H1,L23H5"
    sets = [[c] for c in parse_components(names, smol)]
    res = path_patch(smol, task, sets, parse_receiver(receiver, smol), freeze_mlps=freeze, n_boot=50)
    ref = np.stack([tl_path_patch(smol, task, [(c.layer, c.head) for c in s], receiver, freeze) for s in sets])
    np.testing.assert_allclose(res.plan.patched[:len(sets)], ref, atol=1e-4)
    assert all(c["ok"] for c in res.summary["checks"].values())
    if receiver == "L23H3.v":
        assert res.records[0]["kv_group"] == "L23H3,L23H4,L23H5"


def test_sequence_task_separates_clean_and_corrupt(smol):
    from replab.patching import load_task
    from replab.patching.superclass import separation_table

    t = load_task("sequences", smol.tokenizer)
    assert t.n_prompts >= 20 and set(t.meta["types_kept"]) == {"months", "number_words", "weekdays"}
    sep = separation_table(smol, t, "logit_diff")
    assert (sep["clean_logit_diff"] > 0).all() and (sep["corrupt_logit_diff"] < 0).mean() > 0.9

"""Edge-level circuits on SmolLM2 (integration): the graph, EAP against exact edge patching on a
sample, and one exactly re-measured edge circuit."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def task(smol):
    from replab.patching import load_task

    return load_task("next_day", smol.tokenizer, limit=4)


@pytest.fixture(scope="module")
def eap(smol, task):
    from replab.circuits.eap import attribute_edges

    return attribute_edges(smol, task, "eap")


def test_smol_eap_agrees_with_exact_edge_patching(smol, task, eap):
    from replab.circuits.edges import score_edges

    assert eap.graph.n_edges == 70651
    assert eap.graph.counts()["edges_into_logits"] == 301
    res = score_edges(smol, task, "eap", n_top=10, n_random=20, seed=0, attribution=eap)
    v = res.verification
    assert v["status"] == "ran" and v["score"]["n"] == 30
    assert v["score"]["spearman"] >= 0.8, v
    assert all(c["ok"] for c in res.plan["checks"].values())
    top = res.sample.iloc[0]
    assert top["exact"] < -0.1                    # the strongest edge matters, and is measured exactly


def test_smol_edge_circuit_is_remeasured_exactly(smol, task, eap):
    from replab.circuits.discover import discover_circuits

    d = discover_circuits(smol, task, ["eap"], [100, 20000], attributions={"eap": eap})
    small, big = d.table.sort_values("n_edges")["faithfulness"].to_numpy()
    assert big > small and big > 0.5, d.table
    assert abs(d.plan["checks"]["edges_all_corrupt"]["value"]) < 1e-4
    c = d.circuits[("eap", 100)]
    assert len(c["edges"]) == 100 and c["heads"] and np.isfinite(c["faithfulness"])

"""``replab run lenses --quick`` on SmolLM2: the run, researcher sanity checks, the report in
a browser (the tiny-model mechanics are in tests/test_experiments.py)."""

from __future__ import annotations

import pytest
from report_browser import check_report

from replab.experiments import run_experiment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lenses_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("lenses") / "run"
    return out, run_experiment("lenses", quick=True, out=out, progress=False)


def test_lenses_quick_on_smollm2(lenses_quick):
    out, s = lenses_quick
    h = s["headline"]
    assert s["model"]["n_layers"] == 30 and s["model"]["config_sha256"]
    lo, tu = s["stages"]["logit_lens"], s["stages"]["tuned_lens"]
    assert lo["n_prompts"] == tu["n_prompts"] == 8
    assert 0 <= h["frac_final_top1"] <= 1
    for r in (lo, tu):
        if r["median_first_top1_layer"] is not None:
            assert 0 <= r["median_first_top1_layer"] <= 30
    kl = s["stages"]["heldout_kl"]
    assert len(kl["kl_by_layer"]) == 31 and all(r["kl_logit"] >= 0 and r["kl_tuned"] >= 0 for r in kl["kl_by_layer"])
    final = kl["kl_by_layer"][-1]
    assert final["kl_logit"] < 1e-4                      # the last point is the model's own output
    assert 0 <= h["n_layers_tuned_better"] <= kl["n_layers_compared"] == 30


def test_lenses_report_in_a_browser(lenses_quick, tmp_path):
    out, _ = lenses_quick
    assert check_report(out, tmp_path)["images"] >= 4

"""``replab run fact-recall`` (W1) and ``replab run next-day`` (W2).

Unit tests on the tiny models: fact-recall's stages give the same report as ``replab circuit
report`` in one call (tiny Hugging Face model); next-day runs end to end on the random tiny model.
Integration tests (SmolLM2, ``-m integration``): each ``--quick`` profile runs once in a
module-scoped fixture; the run directory, the researcher's sanity checks (DLA sums to the logit
difference, full patch = 1 and empty patch = 0 in every sweep, a drop re-measured with a plain
TransformerLens hook, the gradient check), the report in a browser, a second run that reuses
every stage, and (next-day) a replay from config.yaml that reproduces every number.
"""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
import torch
from experiment_testutil import assert_complete, numbers
from report_browser import check_report

from replab.experiments import run_experiment


def _close(a, b, tol=1e-6):
    """Equal structures, floats within ``tol`` (the report's batched runs differ only by rounding)."""
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _close(a[k], b[k], tol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _close(x, y, tol)
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=tol, abs_tol=tol), (a, b)
    else:
        assert a == b


# -- unit tests: tiny models -------------------------------------------------------------------


def test_fact_recall_stages_equal_the_one_call_report(tmp_path):
    """The experiment's stages stitched on the tiny HF model give the report that `replab circuit
    report` computes in one batched call (refinement drops equal up to float rounding)."""
    from replab.circuits.report_files import run_component_report
    from replab.models.tiny_hf import tiny_hf_dir

    model = str(tiny_hf_dir())
    s = run_experiment("fact-recall", model=model, quick=True, out=tmp_path / "run", progress=False,
                       options={"layers": "all", "top": 4})
    mine = json.loads((tmp_path / "run" / "ranked_report" / "report.json").read_text())
    ref = run_component_report(dataset="fact_recall", prompt_index=0, top=4, out=tmp_path / "ref", model=model)
    for key in ("target", "corruption", "candidates", "grad_norms", "prompt", "lora", "checks", "layers"):
        _close(mine[key], ref[key], 1e-6)
    assert s["headline"]["top_candidate"] == ref["candidates"][0]["component"]
    assert s["stages"]["ranked_report"]["lora_target_modules"] == ref["lora"]["target_modules"]
    assert s["stages"]["broad_patching"]["n_components"] == 2 * 4 + 2          # 2 layers x (4 heads + MLP)
    assert (tmp_path / "run" / "ranked_report" / "summary.json").is_file()       # a `circuit report` run dir
    # `replab circuit report` writes config.yaml; `replab circuit replay` repeats it exactly
    from replab.circuits.replay import replay_run

    first = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert first["config"]["kind"] == "report" and first["config"]["options"]["model"] == model
    again = replay_run(tmp_path / "ref" / "config.yaml", out=tmp_path / "again", progress=False)
    for key in ("target", "corruption", "candidates", "grad_norms", "lora"):
        _close(again[key], ref[key], 0.0)


def test_next_day_runs_on_the_tiny_model(tmp_path):
    """The random tiny model has no next-day behaviour; the run still completes, its checks hold,
    and the narrative says the model does not give the answer."""
    out = tmp_path / "nd"
    s = run_experiment("next-day", model="tiny", quick=True, out=out, progress=False,
                       options={"grid_layers": "all", "limit": 2, "pattern_top": 4})
    assert_complete(out, "next-day", s)
    st = s["stages"]
    assert st["patching_grid"]["all_checks_ok"] and st["dla"]["max_abs_sum_error"] < 1e-3
    assert abs(st["dla"]["logit_diff_mean"] - st["logit_diff"]["logit_diff_clean"]) < 1e-3
    assert sum(st["patterns"]["counts"].values()) == st["patterns"]["n_heads"] == 4
    html = (out / "report.html").read_text()
    assert st["test_prompt"]["answer_rank"] > 1 and "does not give the answer first" in html


# -- integration: SmolLM2, the quick profiles --------------------------------------------------


@pytest.fixture(scope="module")
def fact_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("w1") / "fact-recall"
    return out, run_experiment("fact-recall", quick=True, out=out, progress=False)


@pytest.fixture(scope="module")
def day_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("w2") / "next-day"
    return out, run_experiment("next-day", quick=True, out=out, progress=False)


@pytest.mark.integration
def test_fact_recall_quick_on_smollm2(fact_run, smol):
    out, s = fact_run
    assert_complete(out, "fact-recall", s)
    st = s["stages"]
    a, b, f, e, r = (st[k] for k in ("answer_check", "broad_patching", "refinement", "evidence", "ranked_report"))
    # the model knows the fact, and the corruption removes it
    assert a["rank"] == 1 and a["answer"] == " Paris" and b["full_drop"] > 1
    # the three patching sanity checks, in both patched stages, and the HF loss check
    assert b["all_checks_ok"] and f["all_checks_ok"] and e["hf_check_ok"] and r["all_checks_ok"]
    assert b["checks"]["empty_patch_equals_clean"]["abs_error"] < 1e-4
    assert b["checks"]["full_corruption_equals_reference"]["abs_error"] < 1e-4
    assert e["n_matrices"] == 30 * 7
    # the top drop re-measured with a plain TransformerLens hook (the corrupt prompt's activation)
    top = pd.read_parquet(out / "broad_patching" / "drops.parquet").sort_values("drop").iloc[-1]
    head = None if top["kind"] == "mlp" else int(top["head"])
    hook = f"blocks.{top['layer']}.attn.hook_z" if head is not None else f"blocks.{top['layer']}.mlp.hook_post"
    from replab.prompts import answer_ids, token_ids

    bos = bool(smol.cfg.default_prepend_bos)
    ids, cids = (torch.tensor([token_ids(smol.tokenizer, p, bos)]) for p in (a["prompt"], a["corrupt_prompt"]))
    target = answer_ids(smol.tokenizer, a["answer"])[0]
    with torch.no_grad():
        _, cache = smol.run_with_cache(cids, names_filter=hook)

        def patch(act, hook=None):
            act = act.clone()
            if head is not None:
                act[0, :, head] = cache[hook.name][0, :, head]
            else:
                act[0] = cache[hook.name][0]
            return act

        patched = float(smol.run_with_hooks(ids, fwd_hooks=[(hook, patch)])[0, -1, target])
    assert abs((b["clean"] - patched) - float(top["drop"])) < 1e-3
    # candidates: exactly the top `top` by drop, ordered by the combined score, Hugging Face names
    drops = pd.read_parquet(out / "broad_patching" / "drops.parquet").nlargest(5, "drop")
    assert set(r["candidate_order"]) == set(drops["component"])
    scores = [c["combined_score"] for c in r["candidates"]]
    assert scores == sorted(scores, reverse=True)
    rep = json.loads((out / "ranked_report" / "report.json").read_text())
    names = {n for c in rep["candidates"] for n in c["parameters"]}
    assert all(re.fullmatch(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+\.weight", n) for n in names)
    assert sorted(r["lora_target_modules"]) == sorted({n.rsplit(".", 1)[0] for n in names})
    assert {c["component"] for c in rep["candidates"]} == set(r["candidate_order"])


@pytest.mark.integration
def test_next_day_quick_on_smollm2(day_run):
    out, s = day_run
    assert_complete(out, "next-day", s)
    st = s["stages"]
    tp, ld, d, g, pt = (st[k] for k in ("test_prompt", "logit_diff", "dla", "patching_grid", "patterns"))
    # the behaviour exists: the answer beats the foil on clean prompts, the corruption flips it
    assert ld["logit_diff_clean"] > 0 > ld["logit_diff_corrupt"] and ld["frac_clean_positive"] == 1.0
    assert 0 < tp["answer_prob"] < 1 and tp["answer_rank"] >= 1
    # DLA sums to the logit difference, which equals the baseline's own forward pass
    assert d["max_abs_sum_error"] < 1e-3
    assert abs(d["sum_of_layer_components"] - d["logit_diff_mean"]) < 1e-3
    assert abs(d["logit_diff_mean"] - ld["logit_diff_clean"]) < 1e-3
    heads = pd.read_parquet(out / "dla" / "dla_heads.parquet").groupby(["layer", "prompt_id"])["logit_diff"].sum()
    layers = pd.read_parquet(out / "dla" / "dla_layers.parquet")
    attn = layers[layers["component"] == "attn"].set_index(["layer", "prompt_id"])["logit_diff"]
    assert (heads - attn.loc[heads.index]).abs().max() < 1e-4      # a layer's heads make up its attention output
    # every sweep of the grid: the full patch gives 1, the empty patch 0 (denoising)
    assert g["all_checks_ok"] and abs(g["full_patch_min"] - 1) < 1e-4 and abs(g["full_patch_max"] - 1) < 1e-4
    assert g["empty_patch_max_error"] < 1e-4
    resid = pd.read_parquet(out / "patching_grid" / "resid_pre" / "sweep.parquet")
    assert resid["layer"].min() == 22
    assert -0.5 < resid["normalized_effect"].min() <= resid["normalized_effect"].max() < 1.5
    # early / middle / late: thirds of the 30 layers, every head in its third
    assert pt["groups"] == {"early": [0, 9], "middle": [10, 19], "late": [20, 29]}
    assert all(pt["groups"][h["group"]][0] <= int(h["head"][1:].split("H")[0]) <= pt["groups"][h["group"]][1]
               for h in pt["heads"])
    assert -1 <= st["atp"]["all_spearman"] <= 1


@pytest.mark.integration
@pytest.mark.parametrize("which", ["fact_run", "day_run"])
def test_reports_in_a_browser(which, request, tmp_path):
    out, s = request.getfixturevalue(which)
    checked = check_report(out, tmp_path / "screenshots")
    assert checked["images"] >= 3 and checked["numbers"] >= 20


@pytest.mark.integration
@pytest.mark.parametrize("which", ["fact_run", "day_run"])
def test_second_run_reuses_every_stage(which, request):
    out, first = request.getfixturevalue(which)
    again = run_experiment(first["experiment"], quick=True, out=out, progress=False)
    assert all(t["reused"] for t in again["provenance"]["stages"])
    assert numbers(again) == numbers(first)


@pytest.mark.integration
def test_next_day_replay_reproduces_the_summary(day_run, tmp_path):
    out, first = day_run
    replay = run_experiment(config=out / "config.yaml", out=tmp_path / "replay", progress=False)
    assert not any(t["reused"] for t in replay["provenance"]["stages"])
    assert numbers(replay) == numbers(first)

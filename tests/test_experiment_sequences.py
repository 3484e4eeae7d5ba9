"""``replab run sequences`` (W4): the quick profile once on the tiny random model (unit) and once
on SmolLM2 (integration), with the checks a researcher would make of the results:

* every pruning level's re-measured performance is at least its threshold, and equals the value
  the search saw; along one order the levels are nested;
* the circuit kept alone under the pruning's own (mean) ablation, measured by the sufficiency
  run, scores what the pruning re-measured for it (two library paths, one definition);
* each type's circuit kept alone on its own task, measured by ``circuit compare``, scores what
  that type's prune run re-measured;
* KL >= 0; class-mean cosines in [-1, 1] with 1 on the diagonal;
* the report in a browser and a second run reusing every stage (SmolLM2), a replay from
  ``config.yaml`` reproducing every number (tiny model: the same code path, a fraction of the time).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from experiment_testutil import assert_complete, numbers
from report_browser import check_report

from replab.errors import ReplabError
from replab.experiments import get_experiment, run_experiment

STAGES = ("prune", "ablations", "sites", "heads", "geometry", "compare")
# the tiny random model: its logit difference is positive on these small sequence tasks
TINY = {"compare_types": "months,number_words", "compare_limit": 4, "geometry_layers": "all"}


def _sanity(out, s: dict) -> None:
    st = s["stages"]
    opts = s["config"]["options"]
    lib = json.loads((out / "prune" / "summary.json").read_text())
    levels = lib["levels"]
    assert {lv["threshold"] for lv in levels} == {float(x) for x in opts["thresholds"].split(",")}
    for lv in levels:
        assert lv["performance"] >= lv["threshold"] - 1e-4, lv
        assert abs(lv["performance"] - lv["search_performance"]) < 1e-4
        assert lv["kl"] >= 0 and lv["n_heads"] == len(lv["heads"])
    for order in {lv["order"] for lv in levels}:
        mine = sorted((lv for lv in levels if lv["order"] == order), key=lambda lv: -lv["threshold"])
        for hi, lo in zip(mine, mine[1:], strict=False):
            assert set(lo["heads"]) <= set(hi["heads"]), order          # nested
    circ = st["prune"]["circuit"]
    at = [lv for lv in levels if lv["threshold"] == opts["circuit_threshold"] and lv["n_heads"]]
    assert circ["n_heads"] == min(lv["n_heads"] for lv in at) and circ["performance"] >= circ["threshold"] - 1e-4
    # ablations: every row has KL >= 0; the pruning's own ablation gives the pruning's number
    rows = st["ablations"]["rows"]
    assert len(rows) == len(opts["ablations"].split(",")) * len(opts["ablation_tests"].split(","))
    assert all(r["kl"] >= 0 for r in rows)
    same = [r for r in rows if r["test"] == "sufficiency" and r["ablation"] == opts["ablation"]]
    assert same and abs(same[0]["performance"] - circ["performance"]) < 1e-4
    # sites: one necessity run per site, on exactly the circuit's heads at that site
    from replab.circuits.components import names, parse_components
    from replab.experiments.sequences_sites import site_components

    sites = st["sites"]
    assert [r["site"] for r in sites["rows"]] == opts["sites"].split(",")
    for r in sites["rows"]:
        lib_site = json.loads((out / "sites" / r["site"] / "summary.json").read_text())
        rec = lib_site["records"][0]
        want = site_components(circ["heads"], r["site"], st["prune"]["n_tokens"])
        n_tokens = st["prune"]["n_tokens"]
        assert lib_site["config"]["options"]["components"] == names(parse_components(want, None, n_tokens))
        assert rec["ablation"] == opts["ablation"] and r["kl"] >= 0
        assert r["performance"] == pytest.approx(rec["metric"] / rec["clean_metric"])
    # heads: the circuit's rows come from the detector table
    det = pd.read_parquet(out / "heads" / "detect" / "detectors.parquet")
    assert len(det) == s["model"]["n_layers"] * s["model"]["n_heads"] * len(opts["detectors"].split(","))
    for r in st["heads"]["circuit_heads"]:
        layer, head = (int(x) for x in r["head"][1:].split("H"))
        for d in opts["detectors"].split(","):
            hit = det[(det["layer"] == layer) & (det["head"] == head) & (det["detector"] == d)]["score"]
            assert r[d] == pytest.approx(float(hit.iloc[0]))
    # QK: the circuit's rows come from each token set's qk_scores table
    for name in opts["ov_tokens"].split(","):
        qk = pd.read_parquet(out / "heads" / f"qk_{name}" / "qk_scores.parquet")
        assert len(qk) == s["model"]["n_layers"] * s["model"]["n_heads"]
        for r in st["heads"]["circuit_heads"]:
            layer, head = (int(x) for x in r["head"][1:].split("H"))
            hit = qk[(qk["layer"] == layer) & (qk["head"] == head)].iloc[0]
            assert r[f"qk_previous_{name}"] == pytest.approx(float(hit["previous_item_top"]), nan_ok=True)
            assert 0 <= r[f"qk_self_{name}"] <= 1
    # geometry: cosines are cosines
    cos = pd.read_parquet(out / "geometry" / "cosine_seq_type.parquet")
    assert cos["cosine"].between(-1 - 1e-6, 1 + 1e-6).all()
    diag = cos[cos["class_a"] == cos["class_b"]]["cosine"]
    assert ((diag - 1).abs() < 1e-6).all()
    g = st["geometry"]
    assert g["n_types"] == 8 and -1 - 1e-9 <= g["cosine_min"] <= g["cosine_max"] <= 1 + 1e-9
    # compare: each circuit on its own task = its prune run's re-measurement
    c = st["compare"]
    for side, t in (("a_on_a", c["a"]), ("b_on_b", c["b"])):
        own = json.loads((out / "compare" / t / "summary.json").read_text())["levels"]
        lv = next(x for x in own if x["order"] == c["order"] and x["threshold"] == c["threshold"])
        assert c[side] == pytest.approx(lv["performance"], abs=1e-4)
    assert 0 <= c["jaccard"] <= 1 and c["n_shared"] <= min(c["n_a"], c["n_b"])
    h = s["headline"]
    assert h["circuit_heads"] == circ["n_heads"] and h["circuit_kl"] == circ["kl"] >= 0


def _complete(out, s: dict, model) -> None:
    assert list(STAGES) == [st.name for st in get_experiment("sequences").stages]
    config = assert_complete(out, "sequences", s)
    assert config["profile"] == "quick" and config["model"] == model
    for sub in ("prune", "compare/compare", "heads/detect"):
        assert (out / sub / "summary.json").is_file(), sub
    # the circuit runs got the loaded model; their config.yaml names it so that a replay loads it again
    for sub in ("prune", "compare/months"):
        assert yaml.safe_load((out / sub / "config.yaml").read_text())["options"]["model"] == model
    for test in config["options"]["ablation_tests"].split(","):
        for a in config["options"]["ablations"].split(","):
            assert (out / "ablations" / f"{test}_{a.replace('/', '-')}" / "summary.json").is_file()
    assert (out / "geometry" / "store").is_dir() and (out / "prune" / "levels.parquet").is_file()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq") / "tiny"
    return out, run_experiment("sequences", model="tiny", quick=True, out=out, options=TINY, progress=False)


def test_quick_profile_on_the_tiny_model(tiny_run):
    out, s = tiny_run
    _complete(out, s, "tiny")
    _sanity(out, s)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6 and "https://" not in html


def test_replay_from_config_reproduces_the_summary(tiny_run, tmp_path):
    out, first = tiny_run
    replay = run_experiment(config=out / "config.yaml", out=tmp_path / "replay", progress=False)
    assert replay["config"]["options"] == first["config"]["options"] and replay["model"]["name"] == "tiny"
    assert not any(t["reused"] for t in replay["provenance"]["stages"])
    assert numbers(replay) == numbers(first)


@pytest.mark.parametrize("options, message", [
    ({"circuit_threshold": 0.5}, "not one of the thresholds"),
    ({"compare_types": "months"}, "two sequence types"),
    ({"ablation_tests": "sufficiency,bogus"}, "unknown ablation test"),
    ({"ablations": "mean,median"}, "unknown ablation"),
    ({"sites": "q,x"}, "unknown site"),
    ({"orders": "sideways"}, "order"),
    ({"geometry_pairs": "digits"}, "TYPE:TYPE"),
])
def test_bad_options_fail_before_any_work(options, message, tmp_path):
    with pytest.raises(ReplabError, match=message):
        run_experiment("sequences", model="tiny", quick=True, out=tmp_path / "x", options=options, progress=False)
    assert not (tmp_path / "x" / "prune" / "stage.json").exists()


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq") / "smol"
    return out, run_experiment("sequences", quick=True, out=out, progress=False)


@pytest.mark.integration
def test_quick_profile_on_smollm2(smol_run, tmp_path):
    out, s = smol_run
    _complete(out, s, None)
    _sanity(out, s)
    assert s["stages"]["prune"]["clean_metric"] > 0 > s["stages"]["prune"]["corrupt_metric"]
    assert s["stages"]["geometry"]["n_rows"] == 308
    checked = check_report(out, tmp_path / "screenshots")
    assert checked["images"] >= 6 and checked["numbers"] >= 25


@pytest.mark.integration
def test_second_run_reuses_every_stage(smol_run):
    out, first = smol_run
    again = run_experiment("sequences", quick=True, out=out, progress=False)
    assert all(t["reused"] for t in again["provenance"]["stages"])
    assert numbers(again) == numbers(first)
    assert json.loads((out / "summary.json").read_text())["headline"] == first["headline"]

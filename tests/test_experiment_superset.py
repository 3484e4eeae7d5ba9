"""``replab run superset --quick`` (W3) on SmolLM2, once per module: the run directory, sanity
checks a researcher would make, the report in a browser, reuse on a second run, and replay from
``config.yaml``. Plus (tiny model) the circuit runs the experiment calls with a loaded model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from experiment_testutil import assert_complete, numbers
from report_browser import check_report

from replab.circuits.blocks_run import run_blocks
from replab.circuits.replay import replay_run
from replab.experiments import run_experiment
from replab.experiments.superset import QUICK
from replab.experiments.superset_report import VERDICTS

#: what legitimately differs between two runs of one config: paths, times, whether a cache was hit
VOLATILE = {"command", "sae_path", "train_seconds", "train_cpu_seconds", "dataset", "store",
            "direction_file"}


def test_circuit_runs_take_a_loaded_model_and_record_its_name(tiny, tmp_path):
    first = run_blocks(1, task="next_day", model=tiny, out=tmp_path / "a", n_boot=50, progress=False)
    config = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert config["options"]["model"] == "tiny" and "--model tiny" in config["command"]
    again = replay_run(tmp_path / "a", out=tmp_path / "b", progress=False)       # loads "tiny" by name
    assert again["records"] == first["records"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("superset") / "superset-quick"
    return out, run_experiment("superset", quick=True, out=out, progress=False)


@pytest.mark.integration
def test_run_directory_is_complete(quick_run):
    out, s = quick_run
    config = assert_complete(out, "superset", s)
    assert config["profile"] == "quick"
    assert all(config["options"][k] == v for k, v in QUICK.items())
    for stage, stem in (("scan", "scan"), ("blocks", "blocks_heatmap"), ("direction", "dose_response")):
        assert (out / stage / f"{stem}.png").is_file() and (out / stage / f"{stem}.svg").is_file()
    for table in ("blocks/blocks.parquet", "blocks/blocks.csv", "grid/by_class.parquet", "scan/scan.csv",
                  "probe/records.parquet", "direction/random.parquet", "latents/latent_patch.csv"):
        assert (out / table).is_file(), table
    assert s["provenance"]["model"]["weights_sha256"] and s["provenance"]["seeds"] == {"seed": 0}


def _ordered(r: dict, lo: str, mid: str, hi: str) -> bool:
    return r[lo] <= r[mid] + 1e-9 and r[mid] <= r[hi] + 1e-9


@pytest.mark.integration
def test_results_are_sane(quick_run):
    _, s = quick_run
    st, h = s["stages"], s["headline"]
    k = st["known_items"]
    assert 0 < k["n_known"] <= k["n_with_answer"] <= k["n_prompts"]
    assert st["harvest"]["n_rows"] > 0 and st["probe"]["n_classes"] == 5
    assert st["probe"]["chance"] < st["probe"]["best_accuracy"] <= 1
    sc = st["scan"]
    assert 15 <= sc["layer"] <= 18                              # a layer of the quick profile's probe run
    assert sc["full_effect"] >= sc["min_full"]                  # the scan's own eligibility rule
    b = st["blocks"]
    assert b["clean_metric"] > b["corrupt_metric"]              # the task separates the classes
    assert math.isclose(b["resid_sufficiency"], 1, abs_tol=1e-4)   # the whole residual at every position = clean
    for r in b["records"]:
        assert r["ci_low"] <= r["ci_high"]
    assert b["top_head"].startswith(f"L{sc['layer']}H")
    assert st["hydra"]["ablate"] == b["top_head"]
    p = st["path"]
    assert p["receiver"] == f"{b['top_head']}.v" and p["n_senders"] == 9        # one layer of 9 heads
    assert p["top_ci"][0] <= p["top_effect"] <= p["top_ci"][1]
    g = st["grid"]
    for r in g["by_class"]:
        if r["block"] == "RESID" and r["test"] == "sufficiency":
            assert math.isclose(r["normalized_effect"], 1, abs_tol=1e-4)
    for key in ("direction", "latents"):
        r = st[key]
        assert r["verdict"] in VERDICTS and r["verdict_text"].startswith(r["verdict"])
        assert _ordered(r, "ci_low", "effect", "ci_high") and _ordered(r, "of_full_low", "of_full", "of_full_high")
        assert r["n_random"] == QUICK["n_random" if key == "direction" else "latent_random"]
        assert 0 <= r["n_random_below"] <= r["n_random"]
    assert math.isclose(st["direction"]["full_residual_effect"], sc["full_effect"], abs_tol=1e-6)
    ev = st["sae_eval"]
    assert 0 < ev["l0"] <= QUICK["sae_k"] + 1e-6 and ev["explained_variance"] <= 1
    assert ev["ce_clean"] <= ev["ce_zero"]
    assert st["sae_decompose"]["latents"][:len(st["latents"]["latents"])] == st["latents"]["latents"]
    assert h["layer"] == sc["layer"] and h["direction_of_full"] == st["direction"]["of_full"]
    assert h["latents_verdict"] == st["latents"]["verdict"]


@pytest.mark.integration
def test_report_in_a_browser(quick_run, tmp_path):
    out, _ = quick_run
    checked = check_report(out, tmp_path / "screenshots")
    assert checked["images"] >= 10 and checked["numbers"] >= 60


@pytest.mark.integration
def test_second_run_reuses_every_stage(quick_run):
    out, first = quick_run
    again = run_experiment("superset", quick=True, out=out, progress=False)
    assert all(t["reused"] for t in again["provenance"]["stages"])
    assert numbers(again, VOLATILE, with_model=False) == numbers(first, VOLATILE, with_model=False)


@pytest.mark.integration
def test_replay_from_config_reproduces_the_summary(quick_run, tmp_path):
    out, first = quick_run
    sae = Path(first["stages"]["sae_train"]["sae_path"])
    before = {f.name: f.stat().st_mtime_ns for f in sae.iterdir()}
    replay = run_experiment(config=out / "config.yaml", out=tmp_path / "replay", progress=False)
    assert not any(t["reused"] for t in replay["provenance"]["stages"])
    # the SAE is trained once per config: the replay reads the cached one and rewrites nothing
    assert {f.name: f.stat().st_mtime_ns for f in sae.iterdir()} == before
    assert numbers(replay, VOLATILE, with_model=False) == numbers(first, VOLATILE, with_model=False)

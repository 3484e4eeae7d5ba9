"""The layer scan and the probe-run chain (scan → features patch with the probe's own
Direction artifact at the chosen layer) on the tiny model, and one SmolLM2 integration
test with a real probe's Direction artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from replab.errors import ReplabError


@pytest.fixture(scope="module")
def probe_run(tiny, tmp_path_factory):
    """A superclass probe run on the tiny model's 4 layers (logistic + meandiff, shuffled labels)."""
    from replab.harvest import harvest
    from replab.probes import train_probes

    d = tmp_path_factory.mktemp("probe")
    store = harvest(tiny, "superset", hooks="resid_post", layers="all", positions="entity_last",
                    out=d / "store", progress=False)
    train_probes(store, "superclass", out=d / "run", progress=False, n_boot=50, folds=3, erase=False)
    return d / "run", store


@pytest.fixture(scope="module")
def task(tiny):
    from replab.features.superclass import build_superclass_task

    return build_superclass_task(tiny.tokenizer, "artist", "scientist", max_pairs=12)


def test_probe_run_direction_is_the_runs_own_artifact(tiny, probe_run):
    from replab.features.direction_inputs import load_direction, probe_shuffled
    from replab.probes.directions import Direction, direction_path, load_probe

    run, _ = probe_run
    d = load_direction(run, layer=2, cls="artist")
    art = direction_path(run / "directions", "logistic", 2, "artist")
    assert d.kind == "direction:logistic" and d.source == str(art) and d.layer == 2
    np.testing.assert_allclose(d.vector, Direction.load(art).vector, atol=1e-6)
    assert d.position == "entity_last" and d.run == str(run)
    # the same vector as the saved probe weights give (class row minus the mean row)
    probe, _ = load_probe(run / "probes" / "logistic.json", 2)
    classes = [str(c) for c in probe.classes_]
    w = probe.coef_ - probe.coef_.mean(0)
    v = w[classes.index("artist")]
    np.testing.assert_allclose(d.vector, v / np.linalg.norm(v), atol=1e-5)
    # the shuffled-label probe of the same run, kind, layer and class
    shuf, how = probe_shuffled(d)
    ref = Direction.load(direction_path(run / "directions", "logistic", 2, "artist", shuffled=True))
    np.testing.assert_allclose(shuf, ref.vector, atol=1e-6)
    assert "shuffled-label logistic probe" in how
    m = load_direction(run, layer=1, cls="artist", kind="meandiff")
    assert m.kind == "direction:meandiff" and m.layer == 1
    with pytest.raises(ReplabError, match="no lowrank probe"):
        load_direction(run, layer=1, cls="artist", kind="lowrank")


def test_scan_table_rule_and_consistency(tiny, task, probe_run):
    from replab.features.direction_inputs import load_direction
    from replab.features.direction_patch import direction_patch
    from replab.features.scan import choose_layer, scan_layers

    run, _ = probe_run
    table, s = scan_layers(tiny, task, run, metric="logit_diff", n_random=3, n_boot=100)
    assert list(table["layer"]) == [0, 1, 2, 3] and s["position_rule"] == "entity_last"
    assert s["checks"]["engine_full"]["ok"] and s["checks"]["engine_empty"]["ok"]
    assert s["directions"] == "Direction artifacts" and s["shuffled"]
    # the rule, by hand: most accurate probe among layers whose full patch restores >= 0.5
    for min_full in (0.5, 0.05):
        ok = table[table["full_effect"] >= min_full]
        want = None if ok.empty else int(ok.sort_values(["probe_accuracy", "layer"],
                                                         ascending=[False, True]).iloc[0]["layer"])
        assert choose_layer(table, min_full)[0] == want
    acc = __import__("pandas").read_parquet(run / "records.parquet")
    acc = acc[acc["kind"] == "logistic"].groupby("layer")["heldout_balanced_accuracy"].max()
    np.testing.assert_allclose(table["probe_accuracy"], acc.loc[table["layer"]].to_numpy())
    # each layer's numbers = a direction patch with the same direction, layer and position
    row = table[table["layer"] == 1].iloc[0]
    d = load_direction(run, layer=1, cls="artist")
    p = direction_patch(tiny, task, d, metric="logit_diff", n_random=3, n_random_ablate=1, n_random_steer=0,
                        alphas=(0.0,), n_boot=100, random_tol=10.0).summary
    assert row["full_effect"] == pytest.approx(p["full_residual_effect"], abs=1e-5)
    assert row["direction_effect"] == pytest.approx(p["effect"], abs=1e-5)
    assert row["shuffled_effect"] == pytest.approx(p["shuffled_effect"] if p["shuffled_effect"] is not None
                                                   else row["shuffled_effect"])
    # a layer with a full patch of ~0 (tiny model, last layer at the name) is never chosen
    last = table[table["layer"] == 3].iloc[0]
    assert abs(last["full_effect"]) < 1e-6 and not last["eligible"]


def test_scan_then_patch_at_the_chosen_layer(tiny, probe_run, tmp_path, capsys):
    from replab_testutil import run_cli

    run, _ = probe_run
    scan = tmp_path / "scan"
    common = ["--model", "tiny", "--task", "superclass", "--classes", "artist,scientist", "--pairs", "8",
              "--metric", "logit_diff"]
    code, out, err = run_cli(["features", "scan", "--probe", run, *common, "--min-full", "0.05",
                              "--out", scan, "--json"], capsys)
    assert code == 0, err
    s = json.loads(out)
    layer = s["chosen_layer"]
    assert layer is not None and s["table"][layer]["chosen"] and (scan / "scan.png").is_file()
    assert json.loads((scan / "summary.json").read_text())["kind"] == "features_scan"
    code, out, err = run_cli(["features", "patch", "--direction", run, "--class", "artist", "--layer", scan,
                              *common, "--random", "20", "--alphas=-1,0,1", "--out", tmp_path / "patch",
                              "--json"], capsys)
    assert code == 0, err
    p = json.loads(out)
    assert p["layer"] == layer
    summ = json.loads((tmp_path / "patch" / "summary.json").read_text())
    assert summ["direction"]["source"].endswith(f"logistic_L{layer}_artist.json")
    assert "shuffled-label logistic probe" in p["shuffled_source"]
    assert p["effect"] == pytest.approx(s["table"][layer]["direction_effect"], abs=1e-5)
    code, _, err = run_cli(["features", "patch", "--direction", run, "--class", "artist", "--layer",
                            tmp_path / "nothing", *common, "--out", tmp_path / "bad"], capsys)
    assert code == 2 and "bad --layer" in err


@pytest.mark.integration
def test_smollm2_probe_direction_artifact(smol, tmp_path):
    """SmolLM2: a logistic probe trained on a small store of artists and scientists writes a
    Direction artifact at layer 14; patching it at the name token (16 pairs, 30 random
    directions) beats every random direction, with the sanity checks passing."""
    from replab.features.direction_inputs import load_direction
    from replab.features.direction_patch import direction_patch
    from replab.features.superclass import build_superclass_task
    from replab.harvest import harvest
    from replab.probes import train_probes
    from replab.prompts import load_prompts

    torch.set_num_threads(1)
    rows = load_prompts("superset", smol.tokenizer).rows
    rows = rows[rows["superclass"].isin(["artist", "scientist", "athlete"]) & (rows["template"] != "odd_one_out")
                & rows["control"].fillna("").astype(str).eq("")]
    path = tmp_path / "people.jsonl"
    keep = ["prompt", "answer", "entity", "superclass", "template", "group"]
    rows[[c for c in keep if c in rows]].to_json(path, orient="records", lines=True)
    store = harvest(smol, str(path), hooks="resid_post", layers="14", positions="entity_last",
                    out=tmp_path / "store", progress=False)
    train_probes(store, "superclass", out=tmp_path / "run", progress=False, kinds=("logistic",),
                 n_boot=50, folds=3, erase=False)
    d = load_direction(tmp_path / "run", layer=14, cls="artist")
    assert d.kind == "direction:logistic" and d.position == "entity_last"
    t = build_superclass_task(smol.tokenizer, "artist", "scientist", max_pairs=16)
    s = direction_patch(smol, t, d, n_random=30, n_random_ablate=3, n_random_steer=0, alphas=(0.0, 1.0),
                        n_boot=200).summary
    assert s["full_residual_effect"] > 0.5
    assert s["percentile"] == 100 and s["ci_low"] > s["random_p95"]
    assert all(c["ok"] for c in s["checks"].values()) and abs(s["random_mean"]) < 0.05
    assert s["steering"][1]["normalized_effect"] > 0.05

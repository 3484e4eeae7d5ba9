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
    from replab.harvesting import harvest
    from replab.probes import train_probes

    d = tmp_path_factory.mktemp("probe")
    store = harvest(tiny, "superset", hooks="resid_post", layers="all", positions="entity_last",
                    out=d / "store", progress=False)
    train_probes(store, "superclass", out=d / "run", progress=False, n_boot=50, folds=3, erase=False)
    return d / "run", store


@pytest.fixture(scope="module")
def task(tiny):
    from replab.patching.superclass import build_superclass_task

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
    from replab.features.scan import probe_accuracy

    with pytest.raises(ReplabError, match=r"no lowrank records \(kinds: logistic, meandiff\)"):
        probe_accuracy(run, "lowrank")


def test_scan_table_rule_and_consistency(tiny, task, probe_run):
    from replab.features.direction_inputs import load_direction, probe_shuffled
    from replab.features.direction_patch import patch_direction
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
    shuf, _ = probe_shuffled(d)
    p = patch_direction(tiny, task, d, metric="logit_diff", n_random=3, n_random_ablate=1, n_random_steer=0,
                        alphas=(0.0,), n_boot=100, random_tol=10.0, shuffled=shuf).summary
    assert row["full_effect"] == pytest.approx(p.full_residual_effect, abs=1e-5)
    assert row["direction_effect"] == pytest.approx(p.effect, abs=1e-5)
    # the scan's shuffled row is the shuffled-label probe's patch at that layer, not the direction's
    assert p.shuffled_effect is not None
    assert row["shuffled_effect"] == pytest.approx(p.shuffled_effect, abs=1e-5)
    assert abs(row["shuffled_effect"] - row["direction_effect"]) > 1e-4
    # a layer with a full patch of ~0 (tiny model, last layer at the name) is never chosen
    last = table[table["layer"] == 3].iloc[0]
    assert abs(last["full_effect"]) < 1e-6 and not last["eligible"]


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def two_class_run(probe_run, tmp_path_factory):
    """A logistic probe run trained on the artist and scientist rows only (two classes)."""
    from replab.probes import train_probes

    _, store = probe_run
    out = tmp_path_factory.mktemp("probe2") / "run"
    train_probes(store, "superclass", out=out, progress=False, kinds=("logistic",), n_boot=50, folds=3,
                 erase=False, where="superclass in ['artist', 'scientist']")
    return out


@pytest.mark.slow
def test_two_class_probe_run_gives_every_class_direction(tiny, task, two_class_run, tmp_path, capsys):
    """A two-class run has a direction for each class (opposite signs) and for A-B; the scan and
    `features patch` accept all three (component patching does not depend on the sign)."""
    from replab_testutil import run_cli

    from replab.features.direction_inputs import load_direction, probe_shuffled
    from replab.features.scan import scan_layers
    from replab.probes.directions import load_directions, load_probe

    run = two_class_run
    _, meta = load_probe(run / "probes" / "logistic.json")
    assert meta["classes"] == ["artist", "scientist"]
    assert set(load_directions(run, layer=2)) == {"artist", "scientist"}
    a, b, ab = (load_direction(run, layer=2, cls=c) for c in ("artist", "scientist", "artist-scientist"))
    assert a.kind == b.kind == "direction:logistic" and ab.kind == "probe:logistic"
    assert float(a.vector @ b.vector) == pytest.approx(-1, abs=1e-5)
    assert float(a.vector @ ab.vector) == pytest.approx(1, abs=1e-5)
    assert probe_shuffled(a) is not None and probe_shuffled(b) is not None
    effects = {}
    for cls in ("artist", "scientist", "artist-scientist"):
        table, s = scan_layers(tiny, task, run, cls=cls, metric="logit_diff", n_boot=50)
        assert s["class"] == cls and list(table["layer"]) == [0, 1, 2, 3] and table["probe_accuracy"].notna().all()
        assert s["shuffled"] == (cls != "artist-scientist")
        effects[cls] = table["direction_effect"].to_numpy()
    np.testing.assert_allclose(effects["scientist"], effects["artist"], atol=1e-5)
    np.testing.assert_allclose(effects["artist-scientist"], effects["artist"], atol=1e-5)
    common = ["--model", "tiny", "--task", "superclass", "--classes", "artist,scientist", "--pairs", "8",
              "--metric", "logit_diff", "--random", "5", "--alphas=0,1", "--json"]
    patched = {}
    for cls in ("scientist", "artist-scientist"):
        code, out, err = run_cli(["features", "patch", "--direction", run, "--class", cls, "--layer", "1",
                                  *common, "--out", tmp_path / cls], capsys)
        assert code == 0, err
        p = json.loads(out)
        assert p["layer"] == 1 and p["positions"] == [task.meta["positions"]["entity_last"]], p
        patched[cls] = p["effect"]
    assert patched["scientist"] == pytest.approx(patched["artist-scientist"], abs=1e-5)
    assert abs(patched["scientist"]) > 1e-4


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_probe_direction_artifact(smol, tmp_path):
    """SmolLM2: a logistic probe trained on a small store of artists and scientists writes a
    Direction artifact at layer 14; patching it at the name token (16 pairs, 30 random
    directions) beats every random direction, with the sanity checks passing."""
    from replab.features.direction_inputs import load_direction
    from replab.features.direction_patch import patch_direction
    from replab.harvesting import harvest
    from replab.patching.superclass import build_superclass_task
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
    s = patch_direction(smol, t, d, n_random=30, n_random_ablate=3, n_random_steer=0, alphas=(0.0, 1.0),
                        n_boot=200).summary
    assert s.full_residual_effect > 0.5
    assert s.percentile == 100 and s.ci_low > s.random_p95
    assert all(c["ok"] for c in s.checks.values()) and abs(s.random_mean) < 0.05
    assert s.steering[1]["normalized_effect"] > 0.05

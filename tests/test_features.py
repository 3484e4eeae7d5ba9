"""Direction patching and the super-class task on the tiny model (fast), plus one lean
SmolLM2 integration test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from replab.errors import ReplabError
from replab.features.direction_inputs import DirectionInput, load_direction, shuffled_direction
from replab.features.direction_patch import complement_basis, patch_direction, random_bases
from replab.patching.metrics import Readout, class_mass, metric_values
from replab.patching.superclass import build_superclass_task, check_separation, separation_table

FAST = dict(n_random=20, n_random_ablate=3, n_random_steer=2, alphas=(-2.0, 0.0, 2.0), n_boot=100)


@pytest.fixture(scope="module")
def task(tiny):
    return build_superclass_task(tiny.tokenizer, "artist", "scientist", max_pairs=12)


def _site_acts(model, task, hook):
    with torch.inference_mode():
        return {k: model.run_with_cache(t, names_filter=hook, return_type=None)[1][hook]
                for k, t in (("clean", task.clean), ("corrupt", task.corrupt))}


def test_superclass_pairs_differ_only_in_the_name(tiny, task):
    from replab.prompts import span_token_positions

    assert task.clean.shape == task.corrupt.shape and task.n_prompts == 12
    pos = task.meta["positions"]
    name = set(range(pos["name_first"], pos["entity_last"] + 1))
    outside = [p for p in range(task.n_tokens) if p not in name]
    assert torch.equal(task.clean[:, outside], task.corrupt[:, outside])
    assert bool((task.clean[:, sorted(name)] != task.corrupt[:, sorted(name)]).any(1).all())
    text = task.meta["template_text"]
    for c, x in zip(task.prompts, task.corrupt_prompts, strict=True):
        for prompt in (c, x):
            who = prompt[text.index("{name}"):len(prompt) - (len(text) - text.index("{name}") - 6)]
            assert span_token_positions(tiny.tokenizer, prompt, who)[-1] == pos["entity_last"]
    # columns: answer, foil, other class-A words, other class-B words
    assert task.class_a[:2] == (True, False) and sum(task.class_a) == len(task.meta["class_words"]["artist"])
    assert torch.equal(task.candidates[:, 0], task.answer) and torch.equal(task.candidates[:, 1], task.foil)
    a_ids = set(task.candidates[0, np.array(task.class_a)].tolist())
    assert set(task.answer.tolist()) <= a_ids and not set(task.foil.tolist()) & a_ids
    sub = task.subset([0, 1])
    assert sub.class_a == task.class_a and sub.meta["positions"] == pos


def test_superclass_builtin_task_and_errors(tiny):
    from replab.patching import load_task

    t = load_task("superclass:artist,writer", tiny.tokenizer, limit=5)
    assert t.n_prompts == 5 and t.meta["classes"] == ["artist", "writer"] and t.class_a is not None
    with pytest.raises(ReplabError, match="unknown super-class"):
        build_superclass_task(tiny.tokenizer, "artist", "wizard")
    with pytest.raises(ReplabError, match="two different"):
        load_task("superclass:artist,artist", tiny.tokenizer)


def test_class_mass_matches_hand_computation(tiny, task):
    g = torch.Generator().manual_seed(0)
    cand = torch.randn(4, 5, generator=g)
    mask = (True, False, True, False, False)
    p = cand.numpy().astype(np.float64)
    hand = np.log(np.exp(p[:, [0, 2]]).sum(1)) - np.log(np.exp(p[:, [1, 3, 4]]).sum(1))
    np.testing.assert_allclose(class_mass(cand, mask).numpy(), hand, rtol=1e-5)
    np.testing.assert_allclose(metric_values("class_mass", Readout(cand), class_a=mask).numpy(), hand, rtol=1e-5)
    with pytest.raises(ReplabError, match="class columns"):
        metric_values("class_mass", Readout(cand))
    # through the model: log Σ_A p(w) − log Σ_B p(w) with full-vocabulary probabilities
    with torch.inference_mode():
        logp = tiny(task.clean)[:, -1].log_softmax(-1).double()
    lp = logp.gather(1, task.candidates)
    m = torch.tensor(task.class_a)
    hand = (lp[:, m].exp().sum(1).log() - lp[:, ~m].exp().sum(1).log()).numpy()
    table = separation_table(tiny, task)
    np.testing.assert_allclose(table["clean_class_mass"].to_numpy(), hand, atol=1e-4)
    sep = check_separation(tiny, task)
    assert sep["clean_positive"] == pytest.approx(float((hand > 0).mean()))
    assert sep["gap"] == pytest.approx(float(table["gap"].mean())) and "separation" in sep["text"]


def test_planted_direction_gives_the_full_patch(tiny, task):
    """A subspace spanned by exactly the clean − corrupt differences at the patched position
    makes the direction patch equal to the full-residual patch (also one pair, one vector)."""
    layer, pos = 1, task.meta["positions"]["entity_last"]
    acts = _site_acts(tiny, task, f"blocks.{layer}.hook_resid_post")
    diff = (acts["clean"][:, pos] - acts["corrupt"][:, pos]).numpy()
    d = DirectionInput(diff, site="resid_post", layer=layer, position="entity_last")
    assert d.k == task.n_prompts
    s = patch_direction(tiny, task, d, metric="logit_diff", **FAST).summary
    assert s.positions == [pos]
    assert s.of_full == pytest.approx(1.0, abs=1e-3)
    assert s.effect == pytest.approx(s.full_residual_effect, abs=1e-4)
    one = task.subset([0])
    d1 = DirectionInput(diff[0], site="resid_post", layer=layer, position="entity_last")
    s1 = patch_direction(tiny, one, d1, metric="logit_diff", **FAST).summary
    assert s1.effect == pytest.approx(s1.full_residual_effect, abs=1e-4)


def test_identity_subspace_and_checks(tiny, task):
    d = DirectionInput(np.eye(tiny.cfg.d_model), site="resid_post", layer=2)
    res = patch_direction(tiny, task, d, positions="entity_last", metric="logit_diff", **FAST)
    s = res.summary
    assert s.of_full == pytest.approx(1.0, abs=1e-4)
    assert all(c["ok"] for c in s.checks.values())
    assert {"identity_subspace", "direction_plus_complement", "clean_run", "engine_full",
            "engine_empty", "steer_zero"} <= set(s.checks)
    assert set(res.effects["name"]) >= {"direction", "full", "complement", "direction_noise",
                                        "ablate_direction", "steer_2"}


def test_random_directions_average_about_zero(tiny, task):
    """Last layer, last position: the full patch restores everything; random 1-d patches ~0."""
    v = np.random.default_rng(3).normal(size=tiny.cfg.d_model)
    d = DirectionInput(v, site="resid_post", layer=tiny.cfg.n_layers - 1)
    res = patch_direction(tiny, task, d, positions="last", metric="logit_diff", **{**FAST, "n_random": 100})
    s = res.summary
    assert s.full_residual_effect == pytest.approx(1.0, abs=1e-4)
    assert abs(s.random_mean) < 0.1 and s.n_random == 100
    assert s.checks["random_mean"]["ok"] and s.random_mean_ok
    rnd = res.random["normalized_effect"].to_numpy()
    hand = 100 * ((rnd < s.effect).sum() + 0.5 * (rnd == s.effect).sum()) / len(rnd)
    assert s.percentile == pytest.approx(hand)
    assert s.random_p95 == pytest.approx(np.quantile(rnd, 0.95))
    # a random direction is no better than the other random directions
    assert s.verdict.startswith("not sufficient") == (s.ci_low <= s.random_p95)


def test_geometry_helpers_and_steering_sign(tiny):
    from replab.patching.interventions import Intervention, apply

    b = random_bases(5, 2, 16, seed=0)
    for q in b:
        np.testing.assert_allclose(q @ q.T, np.eye(2), atol=1e-10)
    u = b[0]
    c = complement_basis(u)
    assert c.shape == (14, 16)
    np.testing.assert_allclose(c @ u.T, 0, atol=1e-10)
    v = np.random.default_rng(0).normal(size=tiny.cfg.d_model)
    v /= np.linalg.norm(v)
    iv = Intervention("resid_post", 0, positions=(1,), source="steer", scale=3.0, direction=-v)
    act = torch.zeros(1, 3, tiny.cfg.d_model)
    apply(act, None, iv, 0)
    np.testing.assert_allclose(act[0, 1].numpy(), -3.0 * v, atol=1e-5)   # the given sign, not QR's


def test_direction_sources_shuffled_and_leace(tiny, task, tmp_path):
    from replab.probes.directions import Direction
    from replab.store.synthetic import write_synthetic_store

    store = write_synthetic_store(tmp_path / "s", n_rows=200, d=tiny.cfg.d_model, n_layers=4, seed=1)
    d = load_direction(store.path, layer=2, cls="class0", label="label")
    assert d.kind == "store:class_mean_diff" and d.layer == 2 and d.k == 1
    with pytest.raises(ReplabError, match="--layer"):
        load_direction(store.path, cls="class0", label="label")
    with pytest.raises(ReplabError, match="unknown class"):
        load_direction(store.path, layer=2, cls="class9", label="label")
    shuf, how = shuffled_direction(None, d, seed=0)
    assert "shuffled" in how
    # hand: the class0-vs-rest mean difference after permuting the labels with the same seed
    from replab.probes.splits import select_rows

    rows, _ = select_rows(store.index, "label")
    y = np.random.default_rng(0).permutation(store.index["label"].astype(str).to_numpy()[rows])
    x = np.asarray(store.acts("blocks.2.hook_resid_post"), dtype=np.float64)[rows]
    np.testing.assert_allclose(shuf, x[y == "class0"].mean(0) - x[y != "class0"].mean(0), atol=1e-9)
    from replab.features.direction_inputs import fit_leace

    eraser, info = fit_leace(store.path, 2, "label")
    # LEACE leaves no linear class information: erased class means coincide
    yt = store.index["label"].astype(str).to_numpy()[rows]
    xe = eraser(torch.tensor(x)).numpy()
    gaps = [np.abs(xe[yt == c].mean(0) - xe.mean(0)).max() for c in info["classes"]]
    assert max(gaps) < 1e-6 * np.abs(x).max()
    # the synthetic store's position rule means nothing to the task: an error, not a fallback
    with pytest.raises(ReplabError, match="position rule 'synthetic'"):
        patch_direction(tiny, task, d, metric="logit_diff", **FAST)
    res = patch_direction(tiny, task, d, positions="last", metric="logit_diff", shuffled=shuf, leace=eraser,
                          **FAST)
    s = res.summary
    eff = res.effects.set_index("name")
    assert s.shuffled_effect == pytest.approx(eff.loc["shuffled", "normalized_effect"])
    assert s.leace["drop"] == pytest.approx(1 - eff.loc["leace", "normalized_effect"])
    assert s.direction["kind"] == "store:class_mean_diff" and s.positions == [task.n_tokens - 1]
    # a Direction artifact, a raw .npy and a safetensors vector
    art = Direction(vector=d.vector, hook="blocks.2.hook_resid_post", layer=2, position="entity_last",
                    label="label", positive_class="class0", classes=["class0", "class1"], kind="meandiff",
                    model={}).save(tmp_path / "dirs" / "meandiff_L2_class0")
    a = load_direction(art)
    assert (a.site, a.layer, a.position) == ("resid_post", 2, "entity_last")
    np.testing.assert_allclose(a.vector, d.vector, atol=1e-6)
    with pytest.raises(ReplabError, match="layer-2 direction"):
        load_direction(art, layer=3)
    np.save(tmp_path / "b.npy", np.stack([d.vector, shuf]).astype(np.float32))
    assert load_direction(tmp_path / "b.npy").k == 2
    with pytest.raises(ReplabError, match="does not exist"):
        load_direction(tmp_path / "nope.npy")
    with pytest.raises(ReplabError, match="dims"):
        patch_direction(tiny, task, DirectionInput(np.ones(7), site="resid_post", layer=1), **FAST)
    with pytest.raises(ReplabError, match="d_model sites"):
        patch_direction(tiny, task, DirectionInput(np.ones(64), site="z", layer=1), **FAST)
    # a direction.json whose position is a label text (older runs) fails loudly
    bad = Direction(vector=d.vector, hook="blocks.2.hook_resid_post", layer=2, position="5:' Picasso'",
                    label="label", positive_class="class0", classes=[], kind="meandiff",
                    model={}).save(tmp_path / "dirs" / "old")
    with pytest.raises(ReplabError, match="position rule"):
        patch_direction(tiny, task, load_direction(bad), metric="logit_diff", **FAST)


def _cli():
    from replab.cli import app, features

    if not any(g.name == "features" for g in app.registered_groups):
        parent = typer.Typer(pretty_exceptions_enable=False)
        parent.add_typer(features.app, name="features")
        return parent
    return app


def test_cli_json_keys_and_errors(tiny, tmp_path):
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=tiny.cfg.d_model).astype(np.float32))
    args = ["features", "patch", "--direction", str(tmp_path / "v.npy"), "--site", "resid_post",
            "--layer", "1", "--positions", "entity_last", "--model", "tiny", "--pairs", "6",
            "--random", "10", "--alphas=-1,0,1", "--metric", "logit_diff", "--out", str(tmp_path / "run"), "--json"]
    r = CliRunner().invoke(_cli(), args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])
    for key in ("effect", "ci_low", "ci_high", "full_residual_effect", "random_mean", "random_p95",
                "percentile", "verdict"):
        assert key in out and out[key] is not None
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["kind"] == "features_direction_patch" and summary["n_random"] == 10
    for stem in ("effects", "random", "steering", "per_prompt", "separation"):
        assert (tmp_path / "run" / f"{stem}.parquet").is_file()
    assert (tmp_path / "run" / "dose_response.png").is_file()
    saved = json.loads((tmp_path / "run" / "direction.json").read_text())
    assert saved["position"] == "entity_last" and summary["position_rule"] == "entity_last"
    again = load_direction(tmp_path / "run" / "direction.json")
    assert again.position == "entity_last" and again.layer == 1
    bad = CliRunner().invoke(_cli(), [*args, "--alphas=1,x"])
    assert bad.exit_code != 0 and isinstance(bad.exception, (ReplabError, SystemExit))
    assert "bad --alphas" in str(bad.exception) or "bad --alphas" in bad.output
    help_text = CliRunner().invoke(_cli(), ["features", "patch", "--help"]).output
    assert "Examples" in help_text


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_mean_difference_direction_is_causal(smol):
    """SmolLM2: the model separates artist/scientist prompts, and the mean clean − corrupt
    difference at the name's last token (layer 12) restores much of the full patch,
    far above random directions."""
    torch.set_num_threads(1)
    t = build_superclass_task(smol.tokenizer, "artist", "scientist", max_pairs=16)
    sep = check_separation(smol, t)
    assert sep["clean_positive"] >= 0.8 and sep["corrupt_negative"] >= 0.8 and sep["gap"] > 2
    layer, pos = 12, t.meta["positions"]["entity_last"]
    acts = _site_acts(smol, t, f"blocks.{layer}.hook_resid_post")
    v = (acts["clean"][:, pos] - acts["corrupt"][:, pos]).mean(0).numpy()
    d = DirectionInput(v, site="resid_post", layer=layer, position="entity_last")
    s = patch_direction(smol, t, d, n_random=30, n_random_ablate=3, n_random_steer=0, alphas=(0.0,),
                        n_boot=200).summary
    assert s.full_residual_effect > 0.3
    assert s.percentile == 100 and s.ci_low > s.random_p95
    assert s.of_full > 0.3 and s.verdict.split(":")[0] in ("sufficient", "partly sufficient")


def test_lazy_exports_are_the_functions_even_after_submodule_imports():
    import replab.features.direction_patch  # noqa: F401  (the submodule shadows a same-named attribute)
    from replab.features import DirectionPatchResult, patch_direction, scan_layers

    assert callable(patch_direction) and patch_direction.__name__ == "patch_direction"
    assert callable(scan_layers) and isinstance(DirectionPatchResult, type)

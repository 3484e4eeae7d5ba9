"""Direction patching by hand (noising, projection ablation, steering, shuffled, LEACE) on the
tiny model, the verdict rule, the random-mean stop, and the people-level bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replab.errors import ReplabError
from replab.features.direction_inputs import DirectionInput
from replab.features.direction_patch import patch_direction
from replab.patching.superclass import build_superclass_task

LAYER = 1
FAST = dict(n_random=20, n_random_ablate=3, n_random_steer=2, n_boot=100)


@pytest.fixture(scope="module")
def task(tiny):
    return build_superclass_task(tiny.tokenizer, "artist", "scientist", max_pairs=12)


def _ld(logits, task):
    """Per-prompt logit difference ``[N]`` from final-position logits."""
    return (logits.gather(1, task.answer[:, None]) - logits.gather(1, task.foil[:, None]))[:, 0]


def _run(model, task, tokens, hook, fn):
    with torch.inference_mode():
        return _ld(model.run_with_hooks(tokens, fwd_hooks=[(hook, fn)])[:, -1], task).double().mean().item()


@pytest.fixture(scope="module")
def setup(tiny, task):
    hook = f"blocks.{LAYER}.hook_resid_post"
    with torch.inference_mode():
        acts = {k: tiny.run_with_cache(t, names_filter=hook)[1][hook]
                for k, t in (("clean", task.clean), ("corrupt", task.corrupt))}
    pos = task.meta["positions"]["entity_last"]
    v = np.random.default_rng(5).normal(size=tiny.cfg.d_model)
    d = DirectionInput(v, site="resid_post", layer=LAYER, position="entity_last")
    shuf = np.random.default_rng(6).normal(size=tiny.cfg.d_model)
    from replab.store.synthetic import write_synthetic_store
    return hook, acts, pos, d, shuf, write_synthetic_store


def test_noising_ablation_steering_shuffled_match_hand_computation(tiny, task, setup, tmp_path):
    from replab.features.direction_inputs import fit_leace

    hook, acts, pos, d, shuf, write_store = setup
    store = write_store(tmp_path / "s", n_rows=200, d=tiny.cfg.d_model, n_layers=3, seed=1)
    eraser, _ = fit_leace(store.path, LAYER, "label")
    res = patch_direction(tiny, task, d, metric="logit_diff", alphas=(-1.5, 0.0, 2.0), alpha_unit="gap",
                          shuffled=shuf, leace=eraser, **FAST)
    eff = res.effects.set_index("name")
    u = torch.tensor(d.basis[0], dtype=acts["clean"].dtype)
    s_unit = torch.tensor(shuf / np.linalg.norm(shuf), dtype=u.dtype)
    c, x = acts["clean"][:, pos], acts["corrupt"][:, pos]

    def at_pos(f):
        def fn(act, hook):
            act = act.clone()
            act[:, pos] = f(act[:, pos])
            return act
        return fn
    # noising: the clean run with the corrupt run's component along u
    noise = _run(tiny, task, task.clean, hook, at_pos(lambda a: a + ((x - a) @ u)[:, None] * u))
    assert eff.loc["direction_noise", "metric_after"] == pytest.approx(noise, abs=1e-4)
    # projection ablation: a − (a·u)u on the clean run
    ablate = _run(tiny, task, task.clean, hook, at_pos(lambda a: a - (a @ u)[:, None] * u))
    assert eff.loc["ablate_direction", "metric_after"] == pytest.approx(ablate, abs=1e-4)
    # steering in gap units: corrupt + α · mean((clean − corrupt)·u) · u
    gap = float(((c - x) @ u).mean())
    assert res.summary.projection["gap"] == pytest.approx(gap, rel=1e-5)
    for alpha in (-1.5, 2.0):
        steer = _run(tiny, task, task.corrupt, hook, at_pos(lambda a, al=alpha: a + al * gap * u))
        assert eff.loc[f"steer_{alpha:g}", "metric_after"] == pytest.approx(steer, abs=1e-4), alpha
    # denoising along u and along the shuffled-label direction: corrupt + ((clean − corrupt)·u)u
    for name, w in (("direction", u), ("shuffled", s_unit)):
        den = _run(tiny, task, task.corrupt, hook, at_pos(lambda a, w=w: a + ((c - a) @ w)[:, None] * w))
        assert eff.loc[name, "metric_after"] == pytest.approx(den, abs=1e-4), name
    # LEACE on the clean run at the position
    leace = _run(tiny, task, task.clean, hook,
                 at_pos(lambda a: eraser(a.double()).to(a.dtype)))
    assert eff.loc["leace", "metric_after"] == pytest.approx(leace, abs=1e-4)
    # normalised effects are (patched − corrupt) / (clean − corrupt) on prompt means
    with torch.inference_mode():
        cm = _ld(tiny(task.clean)[:, -1], task).double().mean().item()
        xm = _ld(tiny(task.corrupt)[:, -1], task).double().mean().item()
    assert eff.loc["direction_noise", "normalized_effect"] == pytest.approx((noise - xm) / (cm - xm), abs=1e-4)
    assert res.summary.shuffled_effect == pytest.approx((eff.loc["shuffled", "metric_after"] - xm) / (cm - xm),
                                                          abs=1e-6)


@pytest.fixture(scope="module")
def mean_diff_last(tiny, task):
    """The mean clean − corrupt difference at the last layer's last position (a direction that
    carries the behaviour)."""
    layer = tiny.cfg.n_layers - 1
    hook = f"blocks.{layer}.hook_resid_post"
    with torch.inference_mode():
        a = {k: tiny.run_with_cache(t, names_filter=hook)[1][hook][:, -1] for k, t in
             (("c", task.clean), ("x", task.corrupt))}
    return DirectionInput((a["c"] - a["x"]).mean(0).numpy(), site="resid_post", layer=layer, position="last")


def test_steering_curve_rises_with_alpha(tiny, task, mean_diff_last):
    """Last layer, last position, the mean clean − corrupt direction: the default gap-unit
    dose–response is monotone and has α's sign (a flipped steering sign would reverse it)."""
    from replab.features.config import DEFAULT_ALPHA_UNIT, DEFAULT_ALPHAS

    assert DEFAULT_ALPHA_UNIT == "gap" and DEFAULT_ALPHAS == (-2.0, -1.0, 0.0, 1.0, 2.0)
    d = mean_diff_last
    s = patch_direction(tiny, task, d, metric="logit_diff", **FAST).summary
    curve = [r["normalized_effect"] for r in s.steering]
    assert [r["alpha"] for r in s.steering] == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert np.all(np.diff(curve) > 0), curve
    assert curve[0] < 0 < curve[-1] and curve[2] == pytest.approx(0, abs=1e-6)
    assert s.projection["alpha_unit"] == "gap" and s.projection["unit"] == pytest.approx(s.projection["gap"])


# ------------------------------------------------------------------ the verdict rule
def _summary(**kw):
    s = dict(full_residual_effect=0.8, full_ci_low=0.7, full_ci_high=0.9, n_random=100, site="resid_post",
             layer=20, position_label="5:' Picasso'", effect=0.5, ci_low=0.45, ci_high=0.55, of_full=0.625,
             of_full_low=0.55, of_full_high=0.7, random_p95=0.01, random_mean=0.0, percentile=100.0)
    s.update(kw)
    return s


@pytest.mark.parametrize("kw, word", [
    (dict(full_residual_effect=0.05), "uninformative"),
    (dict(), "sufficient"),
    (dict(of_full_low=0.45), "partly sufficient"),
    (dict(of_full=0.1, of_full_low=0.05), "weak"),
    (dict(ci_low=0.005, percentile=90.0), "not sufficient"),
])
def test_sufficiency_rule(kw, word):
    from replab.features.verdict import sufficiency

    v = sufficiency(_summary(**kw), "the direction", "random directions")
    assert v.split(":")[0] == word, v
    if word == "sufficient":
        assert "62% [55, 70] of the full-residual effect" in v and "above all 100 random directions" in v
    if word == "not sufficient":
        assert "above 90 of 100 random directions" in v


def test_random_mean_check_stops_a_biased_baseline():
    from replab.features.verdict import random_mean_check

    ok = random_mean_check(0.03, full=0.8, n=100)
    assert ok["ok"] and ok["tolerance"] == pytest.approx(0.08)
    with pytest.raises(ReplabError, match="random_mean"):
        random_mean_check(0.09, full=0.8, n=100)
    with pytest.raises(ReplabError, match="random_mean"):
        random_mean_check(-0.06, full=0.1, n=100)
    # a rank-k random subspace of d dims restores ~k/d of the full effect
    assert random_mean_check(0.5, full=1.0, n=10, expected_fraction=0.5)["ok"]


def test_a_biased_random_baseline_stops_the_run(tiny, task, mean_diff_last, monkeypatch):
    """If the "random" directions were not random (here: all equal to the direction itself),
    the random-mean check stops the run instead of reporting a meaningless percentile."""
    import replab.features.direction_patch as DP

    d = mean_diff_last
    ok = patch_direction(tiny, task, d, metric="logit_diff", alphas=(0.0,), **FAST).summary
    assert ok.checks["random_mean"]["ok"] and ok.effect > 0.3
    monkeypatch.setattr(DP, "random_bases", lambda n, k, dim, seed=0: np.repeat(d.basis[None], n, 0))
    with pytest.raises(ReplabError, match="sanity check 'random_mean' failed"):
        patch_direction(tiny, task, d, metric="logit_diff", alphas=(0.0,), **FAST)


# ------------------------------------------------------------------ people-level bootstrap
def test_people_bootstrap_weights_and_width():
    from replab.patching.bootstrap import ratio_ci, resample_weights

    a = np.repeat(np.arange(6), 3)                    # 6 clean people, 3 pairs each
    b = np.tile(np.arange(3), 6)                      # 3 corrupt people
    w = resample_weights(18, (a, b), n_boot=400, seed=0)
    assert w.shape == (400, 18) and np.allclose(np.nansum(w, 1), 1)
    row = w[0] * 1e6
    # pair weight = count(clean person) × count(corrupt person): a rank-one table per resample
    grid = np.zeros((6, 3))
    grid[a, b] = row
    assert np.linalg.matrix_rank(grid, tol=1e-6) <= 1
    # effects driven by the clean person: resampling people gives a wider CI than pairs
    rng = np.random.default_rng(1)
    person = rng.normal(0, 1, 6)
    patched = (0.5 + 0.4 * person[a])[None] + rng.normal(0, 0.01, 18)
    clean, corrupt = np.ones(18), np.zeros(18)
    lo_p, hi_p = ratio_ci(resample_weights(18, (a, b), 1000, 0), patched, clean, corrupt)
    lo_q, hi_q = ratio_ci(resample_weights(18, None, 1000, 0), patched, clean, corrupt)
    assert (hi_p - lo_p)[0] > 1.2 * (hi_q - lo_q)[0]
    # hand check of one resample's ratio of weighted means
    w1 = resample_weights(18, (a, b), 1, 3)
    lo, hi = ratio_ci(w1, patched, clean + 1, corrupt)
    hand = (w1[0] @ patched[0] - w1[0] @ corrupt) / (w1[0] @ (clean + 1) - w1[0] @ corrupt)
    assert lo[0] == pytest.approx(hand) and hi[0] == pytest.approx(hand)


def test_task_groups_follow_subset_and_swap(tiny, task):
    from replab.patching.bootstrap import task_groups

    g = task_groups(task)
    assert g is not None and len(g[0]) == task.n_prompts
    for name, prompt in zip(g[0], task.prompts, strict=True):
        assert name in prompt
    sub = task.subset([3, 1])
    gs = task_groups(sub)
    assert list(gs[0]) == [g[0][3], g[0][1]] and list(gs[1]) == [g[1][3], g[1][1]]
    sw = task_groups(task.swapped())
    assert list(sw[0]) == list(g[1])
    s = patch_direction(tiny, task, DirectionInput(np.ones(tiny.cfg.d_model), site="resid_post", layer=1),
                        positions="entity_last", metric="logit_diff", alphas=(0.0,), **FAST).summary
    n_a, n_b = len(set(g[0])), len(set(g[1]))
    assert s.bootstrap.startswith(f"people (two-way cluster bootstrap: {n_a} clean × {n_b} corrupt")

"""SAE latent patching (replab sae patch) on the tiny model: exactness against the SAE's own
patch hook, in-run sanity checks, the shared verdict rule, every metric, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

LAYER = 2
FAST = dict(layer=LAYER, d_sae=128, k=8, batch_size=128, tokens=128 * 100, corpus_tokens=2048,
            seq_len=64, threads=1, lr_warm_up_steps=10, dead_feature_window=50)


@pytest.fixture(scope="module")
def sae_and_task(tiny, tmp_path_factory):
    from replab.features.sae import train_sae
    from replab.features.sae.artifact import load_sae
    from replab.patching import load_task

    path, _ = train_sae(tiny, out=tmp_path_factory.mktemp("sae") / "topk", progress=False, **FAST)
    sae, meta = load_sae(path)
    return sae, meta, load_task("next_day", tiny.tokenizer, limit=4), path


def test_latent_patch_matches_the_sae_patch_hook(tiny, sae_and_task):
    from replab.features.latent_patch import patch_latents
    from replab.features.sae.splice import patch_latents_hook, sae_encode

    sae, meta, task, _ = sae_and_task
    table, s = patch_latents(tiny, sae, meta, task, top=3, positions=[3, 5], n_random=20, n_boot=50)
    t = table.set_index("name")
    # the engine's batched latent patches = plain forwards with the SAE's own patch hook
    # (chosen latents; every latent, which keeps the corrupt run's error term)
    hook = meta["hook_name"]
    _, cc = tiny.run_with_cache(task.clean, names_filter=hook)
    src = sae_encode(sae, cc[hook][:, [3, 5]])
    ld = lambda lg: (lg.gather(1, task.answer[:, None]) - lg.gather(1, task.foil[:, None])).mean().item()  # noqa: E731
    with torch.inference_mode():
        clean, corrupt = ld(tiny(task.clean)[:, -1]), ld(tiny(task.corrupt)[:, -1])
        for name, ids in (("chosen", s["latents"]), ("all_latents", list(range(meta["d_sae"])))):
            logits = tiny.run_with_hooks(task.corrupt, fwd_hooks=[(hook, patch_latents_hook(
                sae, src, ids, positions=[3, 5]))])[:, -1]
            want = (ld(logits) - corrupt) / (clean - corrupt)
            assert t.loc[name, "normalized_effect"] == pytest.approx(want, abs=1e-4), name
        # full patch at the site = the clean activation at those positions
        def full(act, hook):
            act = act.clone()
            act[:, [3, 5]] = cc[hook.name][:, [3, 5]]
            return act
        want = (ld(tiny.run_with_hooks(task.corrupt, fwd_hooks=[(hook, full)])[:, -1]) - corrupt) / (clean - corrupt)
    assert s["full_residual_effect"] == pytest.approx(want, abs=1e-4)
    # in-run sanity checks: no latent = 0; every latent + the error term = the full patch
    c = s["checks"]
    assert c["decoder_rows"]["ok"] and c["decoder_rows"]["value"] < 1e-5
    assert c["empty_latent_set"]["value"] == pytest.approx(0, abs=1e-6)
    assert c["all_latents_plus_error"]["value"] == pytest.approx(s["full_residual_effect"], abs=1e-4)
    assert c["engine_full"]["ok"] and c["engine_empty"]["ok"]
    # percentile and of_full by hand
    rnd = table[table["kind"] == "random"]["normalized_effect"].to_numpy()
    assert len(rnd) == 20 and s["percentile"] == pytest.approx(
        100 * ((rnd < s["effect"]).sum() + 0.5 * (rnd == s["effect"]).sum()) / 20)
    assert s["of_full"] == pytest.approx(s["effect"] / s["full_residual_effect"])
    assert len(s["latents"]) == 3 and s["latents"] == [int(i) for i in t.loc["top_3", "latents"]]


@pytest.mark.parametrize("wrong", ["scaled", "ignores_rescale"])
def test_a_wrong_decoder_rows_fails_the_decoder_check(tiny, sae_and_task, monkeypatch, wrong):
    """decoder_rows disagreeing with sae.decode (a scale, or the raw W_dec of a TopK SAE whose
    decode divides by the row norms, rescale_acts_by_decoder_norm) stops the run before any
    patched forward."""
    import copy

    import replab.features.sae.splice as splice
    from replab.errors import ReplabError
    from replab.features.latent_patch import patch_latents

    sae, meta, task, _ = sae_and_task
    assert sae.cfg.rescale_acts_by_decoder_norm
    if wrong == "ignores_rescale":     # trained rows are unit-norm: give them norms 0.5-2
        sae = copy.deepcopy(sae)
        with torch.no_grad():
            sae.W_dec.mul_(torch.linspace(0.5, 2.0, sae.W_dec.shape[0])[:, None])
    _, s = patch_latents(tiny, sae, meta, task, top=2, positions=[3, 5], n_random=5, n_boot=20)
    assert s["checks"]["decoder_rows"]["value"] < 1e-5
    bad = splice.decoder_rows(sae) * 1.01 if wrong == "scaled" else sae.W_dec.detach().float()
    import replab.features.latent_patch as latent_patch

    for module in (splice, latent_patch):   # wherever the name is bound
        monkeypatch.setattr(module, "decoder_rows", lambda s: bad)
    with pytest.raises(ReplabError, match="sanity check 'decoder_rows' failed"):
        patch_latents(tiny, sae, meta, task, top=2, positions=[3, 5], n_random=5, n_boot=20)


def test_position_view_sources_equal_full_copies(tiny, sae_and_task):
    """The engine gives the same result with the position-only source views as with full
    ``[N, T, d]`` copies (corrupt activation with the patched positions replaced)."""
    from replab.features.latent_patch import LatentSources
    from replab.patching.engine import Variant, run_variants
    from replab.patching.interventions import Intervention
    from replab.patching.plan import plan_forwards

    sae, meta, task, _ = sae_and_task
    hook, pos = meta["hook_name"], [1, 3, 5]
    forwards = plan_forwards(tiny, task, [], hooks=(hook,))
    src = LatentSources(sae, forwards["clean"][hook], forwards["corrupt"][hook], pos)
    sets = {"a": ([1, 2, 3], False), "b": ([], True), "c": (list(range(20)), True)}
    views = {k: src.make(ids, err) for k, (ids, err) in sets.items()}
    full = {}
    for k, v in views.items():
        f = forwards["corrupt"][hook].clone()
        f[:, pos] = v[:, pos]
        full[k] = f
        n, t, d = f.shape                 # stored: (N - 1) * span + T rows, span = 5 - 1 + 1
        assert v.untyped_storage().nbytes() == ((n - 1) * 5 + t) * d * 4 < f.untyped_storage().nbytes()
    variants = [Variant((Intervention("resid_post", 2, positions=tuple(pos), source=f"custom:{k}"),)) for k in sets]
    a, _ = run_variants(tiny, task.clean, task.corrupt, variants, sources=views)
    b, _ = run_variants(tiny, task.clean, task.corrupt, variants, sources=full)
    assert torch.equal(a, b)


def test_latent_verdict_is_the_direction_rule(tiny, sae_and_task):
    """Same rule and keys as direction patching; a site that carries nothing is uninformative."""
    from replab.features.latent_patch import patch_latents
    from replab.features.verdict import sufficiency

    sae, meta, task, _ = sae_and_task
    _, s = patch_latents(tiny, sae, meta, task, top=2, positions=[3, 5], n_random=10, n_boot=50)
    n = len(s["latents"])
    assert s["verdict"] == sufficiency(s, f"{n} latents {s['latents']}", f"random sets of {n} active latents",
                                       plural=True)
    fake = {**s, "full_residual_effect": 0.8, "of_full": 0.6, "of_full_low": 0.55, "of_full_high": 0.7,
            "ci_low": 0.4, "random_p95": 0.02, "percentile": 100.0}
    assert sufficiency(fake, "5 latents", "random sets", plural=True).startswith("sufficient: 5 latents restore ")
    for key in ("effect", "ci_low", "ci_high", "of_full", "of_full_low", "of_full_high", "full_residual_effect",
                "random_mean", "random_p95", "percentile", "verdict", "verdict_detail"):
        assert key in s, key
    # position 0 is the same token in clean and corrupt prompts: nothing to patch there
    assert torch.equal(task.clean[:, 0], task.corrupt[:, 0])
    _, s0 = patch_latents(tiny, sae, meta, task, top=2, positions=[0], n_random=5, n_boot=50)
    assert s0["full_residual_effect"] == pytest.approx(0, abs=1e-6)
    assert s0["verdict"].startswith("uninformative")


@pytest.mark.parametrize("metric", ["logprob", "prob", "kl", "margin"])
def test_every_metric_runs(tiny, sae_and_task, metric):
    from replab.features.latent_patch import attribution, patch_latents

    sae, meta, task, _ = sae_and_task
    _, s = patch_latents(tiny, sae, meta, task, top=2, positions=[3, 5], metric=metric, n_random=5, n_boot=50)
    assert s["metric"] == metric and np.isfinite(s["effect"])
    assert s["checks"]["all_latents_plus_error"]["ok"]
    # attribution = the first-order effect: it matches a central finite difference
    hook = meta["hook_name"]
    attr = attribution(tiny, sae, task, hook, [3, 5], metric)
    assert attr.shape == (meta["d_sae"],) and np.isfinite(attr).all()
    i = int(np.argmax(np.abs(attr)))
    fd = _finite_difference(tiny, sae, task, hook, [3, 5], metric, i)
    assert attr[i] == pytest.approx(fd, rel=0.05, abs=1e-6)


def _finite_difference(model, sae, task, hook, pos, metric, i, eps=1e-2):
    """(M(x + ε Δ_i) − M(x − ε Δ_i)) / 2ε on the corrupt run, Δ_i = latent i's clean − corrupt move."""
    from replab.features.sae.splice import decoder_rows, sae_encode
    from replab.patching.metrics import Readout, metric_values

    with torch.inference_mode():
        acts = {k: model.run_with_cache(t, names_filter=hook)[1][hook] for k, t in
                (("c", task.clean), ("x", task.corrupt))}
        dz = (sae_encode(sae, acts["c"][:, pos]) - sae_encode(sae, acts["x"][:, pos]))[..., i]
        delta = dz[..., None] * decoder_rows(sae)[i]
        clean_logp = model(task.clean)[:, -1].double().log_softmax(-1)
        vals = []
        for sign in (1, -1):
            def nudge(act, hook, sign=sign):
                act = act.clone()
                act[:, pos] += sign * eps * delta
                return act
            logits = model.run_with_hooks(task.corrupt, fwd_hooks=[(hook, nudge)])[:, -1].double()
            lse = torch.logsumexp(logits, -1)
            r = Readout(logits.gather(1, task.candidates), lse, logits - lse[:, None])
            vals.append(metric_values(metric, r, clean_logp, task.class_a).mean().item())
    return (vals[0] - vals[1]) / (2 * eps)


def test_sae_patch_cli(tiny, sae_and_task, tmp_path, capsys):
    from replab_testutil import run_cli

    _, _, _, path = sae_and_task
    code, out, err = run_cli(["sae", "patch", str(path), "--model", "tiny", "--task", "next_day", "--pairs", "4",
                              "--latents", "1,2", "--random", "10", "--out", tmp_path / "lp", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert {"effect", "ci_low", "ci_high", "of_full", "full_residual_effect", "random_mean", "random_p95",
            "percentile", "verdict", "verdict_detail", "latents", "checks", "bootstrap"} <= set(res)
    assert res["latents"] == [1, 2] and (tmp_path / "lp" / "summary.json").exists()
    for metric in ("logprob", "kl"):
        code, out, err = run_cli(["sae", "patch", str(path), "--model", "tiny", "--task", "next_day", "--pairs",
                                  "4", "--top", "2", "--random", "5", "--metric", metric,
                                  "--out", tmp_path / metric, "--json"], capsys)
        assert code == 0, err
        assert json.loads(out)["metric"] == metric
    code, _, err = run_cli(["sae", "patch", str(path), "--model", "tiny", "--task", "next_day",
                            "--latents", "9999", "--out", tmp_path / "bad"], capsys)
    assert code == 2 and "out of range" in err


def test_sae_patch_superclass_dataset_and_people_bootstrap(tiny, sae_and_task, tmp_path, capsys):
    """--dataset feeds the super-class task; CIs resample the people the pairs name."""
    from replab_testutil import run_cli

    from replab.prompts import load_prompts

    _, _, _, path = sae_and_task
    rows = load_prompts("superset", tiny.tokenizer).rows
    rows = rows[rows["superclass"].isin(["artist", "scientist"])]
    data = tmp_path / "people.jsonl"
    rows[["prompt", "answer", "entity", "superclass", "template"]].to_json(data, orient="records", lines=True)
    code, out, err = run_cli(["sae", "patch", str(path), "--model", "tiny", "--task", "superclass", "--classes",
                              "artist,scientist", "--dataset", data, "--pairs", "9", "--top", "2", "--random", "5",
                              "--metric", "logit_diff", "--out", tmp_path / "sc", "--json"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert s["task"]["dataset"] == "people" and s["position_rule"] == "entity_last"
    assert s["bootstrap"].startswith("people (two-way cluster bootstrap")

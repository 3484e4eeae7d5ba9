"""SAE latent patching: do a few SAE latents carry a patching effect? (``replab sae patch``)

At the SAE's hook and the chosen positions, the corrupt activation ``x`` is split into
``decode(encode(x)) + error``; only the chosen latents are replaced by the clean run's values
and the corrupt run's own error term is kept, so nothing else changes:

    x' = x + Σ_{i ∈ S} (z_clean,i − z_corrupt,i) · d_i          (d_i = decoder row i)

All variants run in one batched engine call (``custom:`` sources of
:mod:`replab.patching.engine`), with the baselines a verdict needs: the full patch of the
activation at the same site and positions (the ceiling), the patch of *every* latent (the
SAE's share of the ceiling: the rest is in the error term), nested top-k sets (a
dose–response over k) and random latent sets of the same size drawn from the latents active
on these prompts. Effects are normalised ((patched − corrupt) / (clean − corrupt), prompt
means) with bootstrap CIs over prompts.

Latents are chosen by the caller (``latents=``, e.g. the top latents of ``replab sae
decompose`` for a class) or ranked by attribution: the first-order effect of patching latent
``i``, ``mean_n Σ_pos (z_clean − z_corrupt)_i · (d_i · ∂M/∂x)``, from one backward pass.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from replab.errors import ReplabError
from replab.patching.engine import Variant, run_variants
from replab.patching.interventions import Intervention, canonical_site
from replab.patching.metrics import bootstrap_ci, metric_values, normalized, readout


def _acts(model, hook: str, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=hook)
    return cache[hook]


def _metric(model, task, metric, final):
    r = readout(model, final, task.candidates, False)
    return metric_values(metric, r, None, task.class_a)


def attribution(model, sae, task, hook: str, positions: list[int], metric: str) -> np.ndarray:
    """First-order effect ``[d_sae]`` of patching each latent clean → corrupt (see module doc)."""
    from replab.features.sae.splice import decoder_rows, sae_encode

    clean, corrupt = _acts(model, hook, task.clean), _acts(model, hook, task.corrupt)
    store = {}

    def leaf(act, hook):
        act = act.detach().requires_grad_(True)
        store["x"] = act
        return act
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            logits = model.run_with_hooks(task.corrupt, fwd_hooks=[(hook, leaf)])[:, -1]
            cand = logits.gather(1, task.candidates)
            from replab.patching.metrics import Readout

            metric_values(metric, Readout(cand), None, task.class_a).mean().backward()
    finally:
        for p in params:
            p.requires_grad_(True)
    grad = store["x"].grad[:, positions]                                     # [N, P, d]
    dz = sae_encode(sae, clean[:, positions]) - sae_encode(sae, corrupt[:, positions])   # [N, P, S]
    rows = decoder_rows(sae)                                                 # [S, d]
    return (dz * (grad @ rows.T)).sum(1).mean(0).numpy()


def _custom(sae, clean, corrupt, positions, latents) -> torch.Tensor:
    from replab.features.sae.splice import decoder_rows, sae_encode

    ids = torch.as_tensor(list(latents), dtype=torch.long)
    dz = (sae_encode(sae, clean[:, positions]) - sae_encode(sae, corrupt[:, positions]))[..., ids]
    new = corrupt.clone()
    new[:, positions] = corrupt[:, positions] + dz @ decoder_rows(sae)[ids]
    return new


def latent_patch(model, sae, meta: dict, task, latents: list[int] | None = None, top: int = 5,
                 positions: list[int] | None = None, metric: str = "logit_diff", n_random: int = 100,
                 seed: int = 0, n_boot: int = 1000) -> tuple[pd.DataFrame, dict]:
    """Patch ``latents`` (default: the ``top`` by attribution) clean → corrupt; see module doc.

    Returns ``(table, summary)``: one row per variant (``name``, ``kind``, ``k``,
    ``normalized_effect``, ``ci_low``, ``ci_high``, ``frac_of_full``), and the summary with the
    chosen latents, baselines, percentile among random sets and a verdict.
    """
    hook = meta["hook_name"]
    site, layer = canonical_site(hook)
    if layer is None:
        raise ReplabError(f"SAE hook {hook} is not a per-layer site the patching engine can use")
    positions = list(range(task.n_tokens)) if positions is None else list(positions)
    clean, corrupt = _acts(model, hook, task.clean), _acts(model, hook, task.corrupt)
    from replab.features.sae.splice import sae_encode

    attr = attribution(model, sae, task, hook, positions, metric)
    d_sae = attr.shape[0]
    chosen = [int(i) for i in latents] if latents else [int(i) for i in np.argsort(-np.abs(attr))[:top]]
    bad = [i for i in chosen if not 0 <= i < d_sae]
    if bad:
        raise ReplabError(f"latent {bad[0]} is out of range: this SAE has {d_sae} latents")
    active = ((sae_encode(sae, clean[:, positions]) != 0) | (sae_encode(sae, corrupt[:, positions]) != 0))
    active = torch.nonzero(active.reshape(-1, d_sae).any(0)).flatten().numpy()
    rng = np.random.default_rng(seed)
    pool = np.setdiff1d(active, chosen)
    plan: list[tuple[str, str, int, list[int] | None]] = [("chosen", "chosen", len(chosen), chosen)]
    order = [int(i) for i in np.argsort(-np.abs(attr))]
    for k in sorted({1, 2, 5, 10, 20, 50} | {len(chosen)}):
        if k <= len(active):
            plan.append((f"top_{k}", "top_k", k, order[:k]))
    plan.append(("all_latents", "all_latents", d_sae, list(range(d_sae))))
    size = min(len(chosen), len(pool))
    for i in range(n_random if size else 0):
        plan.append((f"random_{i}", "random", size, rng.choice(pool, size=size, replace=False).tolist()))
    sources, variants = {}, []
    for name, _, _, ids in plan:
        sources[name] = _custom(sae, clean, corrupt, positions, ids)
        variants.append(Variant((Intervention(site, layer, positions=tuple(positions), source=f"custom:{name}"),)))
    variants.append(Variant((Intervention(site, layer, positions=tuple(positions), source="clean"),)))
    finals, runs = run_variants(model, task.clean, task.corrupt, variants, sources=sources)
    with torch.inference_mode():
        c = _metric(model, task, metric, runs["clean"].final).numpy().astype(np.float64)
        x = _metric(model, task, metric, runs["corrupt"].final).numpy().astype(np.float64)
        v, n, d = finals.shape
        pr = metric_values(metric, readout(model, finals.reshape(v * n, d), task.candidates.repeat(v, 1), False),
                           None, task.class_a).numpy().astype(np.float64).reshape(v, n)
    eff = normalized(pr.mean(1), c.mean(), x.mean())
    lo, hi = bootstrap_ci(pr, c, x, n_boot=n_boot, seed=seed)
    full = float(eff[-1])
    rows = [{"name": name, "kind": kind, "k": k, "latents": ids if kind != "all_latents" and kind != "random" else None,
             "normalized_effect": float(eff[i]), "ci_low": float(lo[i]), "ci_high": float(hi[i]),
             "frac_of_full": float(eff[i] / full) if abs(full) > 1e-9 else np.nan}
            for i, (name, kind, k, ids) in enumerate(plan)]
    rows.append({"name": "full_activation", "kind": "ceiling", "k": None, "latents": None,
                 "normalized_effect": full, "ci_low": float(lo[-1]), "ci_high": float(hi[-1]), "frac_of_full": 1.0})
    table = pd.DataFrame(rows)
    summary = _summary(table, chosen, attr, hook, positions, metric, c, x, task)
    return table, summary


def _summary(table, chosen, attr, hook, positions, metric, c, x, task) -> dict:
    get = lambda name: table.set_index("name").loc[name]  # noqa: E731
    ch, full, every = get("chosen"), get("full_activation"), get("all_latents")
    rand = table[table["kind"] == "random"]["normalized_effect"].to_numpy()
    pct = float((rand < ch["normalized_effect"]).mean() * 100) if len(rand) else None
    s = {"hook_name": hook, "positions": positions, "metric": metric, "task": task.describe(),
         "clean_metric": float(c.mean()), "corrupt_metric": float(x.mean()),
         "latents": chosen, "latent_attribution": [float(attr[i]) for i in chosen],
         "effect": float(ch["normalized_effect"]), "ci_low": float(ch["ci_low"]), "ci_high": float(ch["ci_high"]),
         "full_activation_effect": float(full["normalized_effect"]),
         "all_latents_effect": float(every["normalized_effect"]),
         "frac_of_full": float(ch["frac_of_full"]), "n_random": int(len(rand)),
         "random_mean": float(rand.mean()) if len(rand) else None,
         "random_p95": float(np.quantile(rand, 0.95)) if len(rand) else None, "percentile": pct}
    s["verdict"] = latent_verdict(s)
    return s


def latent_verdict(s: dict) -> str:
    """A verdict in words, with the numbers that drive it."""
    frac, n = s["frac_of_full"], len(s["latents"])
    ci = f"[{s['ci_low']:.2f}, {s['ci_high']:.2f}]"
    rand = (f"; above {s['percentile']:.0f}% of {s['n_random']} random same-size sets of active latents "
            f"(mean {s['random_mean']:.2f}, p95 {s['random_p95']:.2f})") if s["n_random"] else ""
    base = (f"{n} latent{'s' if n != 1 else ''} restore {s['effect']:.2f} {ci} (normalised), "
            f"{frac:.0%} of the full-activation patch ({s['full_activation_effect']:.2f}); "
            f"all latents together: {s['all_latents_effect']:.2f}{rand}")
    beats = s["n_random"] == 0 or s["effect"] > s["random_p95"]
    if frac >= 0.5 and s["ci_low"] > 0 and beats:
        return "carried: " + base
    if frac >= 0.2 and beats:
        return "partly carried: " + base
    return "not carried: " + base

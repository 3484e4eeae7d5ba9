"""SAE latent patching: do a few SAE latents carry a patching effect? (``replab sae patch``)

At the SAE's hook and the chosen positions, the corrupt activation ``x`` is split into
``decode(encode(x)) + error``; only the chosen latents ``S`` are replaced by the clean run's
values and the corrupt run's own error term is kept, so nothing else changes:

    x' = x + Σ_{i ∈ S} (z_clean,i − z_corrupt,i) · d_i          (d_i = decoder row i)

Every variant runs in **one** batched engine call (``custom:`` sources of
:mod:`replab.patching.engine`), with the baselines the verdict needs:

=====================  ===================================================================
variant                what it is
=====================  ===================================================================
chosen                 the chosen latents ``S``
full                   the whole activation patched at the positions (the ceiling)
random_i               ``n_random`` random sets of ``|S|`` latents drawn from the latents
                       active on these prompts at these positions (seeded)
top_k                  nested top-k sets by attribution (a dose–response over k)
all_latents            every latent (the SAE's reconstruction; the error term stays corrupt)
error_term             only the error term ``x − x̂`` patched
complement             everything but ``S``: the other latents and the error term
=====================  ===================================================================

**Sanity checks** (ReplabError on failure):

* ``decoder_rows`` (before any patched run; relative error ≤ 1e-4): on the corrupt and clean
  codes ``z``, the SAE's own ``decode(z)`` equals ``z @ decoder_rows(sae) + b_dec``, so the
  per-latent moves above are the SAE's (a wrong row scale, a missing
  ``rescale_acts_by_decoder_norm`` or a decoder with an output normalisation fails it);
* ``empty_latent_set`` (1e-3 in normalised units): patching no latent, error term kept = the
  corrupt run;
* ``all_latents_plus_error`` (1e-3): every latent plus the error term moved is, by the
  definition of the error term, the clean activation at the positions, so it must equal the
  engine's own full patch at that site: this checks that ``custom:`` sources reach the
  engine at the right rows and positions (not the SAE, which the first check covers);
* the engine's own full (= 1) and empty (= 0) patches.

The **verdict** is :func:`replab.features.verdict.sufficiency`, the same rule and JSON keys as
direction patching (``effect``, ``ci_low``, ``ci_high``, ``of_full`` with CI,
``full_residual_effect``, ``random_mean``, ``random_p95``, ``percentile``, ``verdict``;
"uninformative" when the full patch restores < 10%). CIs resample people (two-way cluster
bootstrap, :mod:`replab.patching.bootstrap`) when the task says who each pair names, else pairs.
Random *active* latents are not an isotropic baseline (they can carry class information), so
their mean is reported, not required to be 0.

Latents are chosen by the caller (``latents=``, e.g. the top latents of ``replab sae
decompose`` for a class) or ranked by attribution: the first-order effect of patching latent
``i``, ``mean_n Σ_pos (z_clean − z_corrupt)_i · (d_i · ∂M/∂x)``, from one backward pass.

Cost: one cached forward of the clean and of the corrupt prompts (the engine's
:class:`~replab.patching.engine.ForwardCache`, shared by the attribution, the sources and every
patched variant), one gradient-enabled forward + backward of the corrupt prompts for the
attribution, and the batched patched runs. Each variant's source stores only the patched
positions (:func:`_position_view`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from replab.errors import ReplabError
from replab.features.config import LatentPatchConfig, with_overrides
from replab.features.sae.splice import decoder_rows, sae_decode, sae_encode
from replab.features.verdict import ci_text, pct_text, sufficiency
from replab.hooks import canonical_site
from replab.patching.checks import Check, enforce
from replab.patching.engine import Variant
from replab.patching.interventions import Intervention
from replab.patching.metrics import FULL_VOCAB, Readout, check_metric, final_logits, metric_values
from replab.patching.plan import plan_forwards, run_plan
from replab.patching.task import task_positions

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from replab.patching.task import PatchTask

TOL = 1e-3
DECODER_TOL = 1e-4
DOSE_K = (1, 2, 5, 10, 20, 50)


def attribution(model: HookedTransformer, sae, task: PatchTask, hook: str, positions: list[int], metric: str,
                forwards: dict | None = None) -> np.ndarray:
    """First-order effect ``[d_sae]`` of patching each latent clean → corrupt (module docstring).

    Works for every metric: full-vocabulary ones (``logprob``, ``prob``, ``kl``) read the whole
    log-softmax. ``forwards``: cached clean/corrupt forwards holding ``hook``
    (:func:`~replab.patching.plan.plan_forwards`;
    made when None). The gradient needs one more forward of the corrupt prompts.
    """

    forwards = forwards if forwards is not None else plan_forwards(model, task, [], hooks=(hook,))
    clean, corrupt = forwards["clean"][hook], forwards["corrupt"][hook]
    store = {}

    def leaf(act, hook):
        act = act.detach().requires_grad_(True)
        store["x"] = act
        return act
    clean_logp = None
    if metric == "kl":
        with torch.inference_mode():
            clean_logp = final_logits(model, forwards["clean"].final).float().log_softmax(-1)
        clean_logp = clean_logp.clone()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            logits = model.run_with_hooks(task.corrupt, fwd_hooks=[(hook, leaf)])[:, -1]
            r = Readout(logits.gather(1, task.candidates))
            if metric in FULL_VOCAB:
                lse = torch.logsumexp(logits, dim=-1)
                r = Readout(r.cand, lse, logits - lse[:, None] if metric == "kl" else None)
            metric_values(metric, r, clean_logp, task.class_a).mean().backward()
    finally:
        for p in params:
            p.requires_grad_(True)
    grad = store["x"].grad[:, positions]                                     # [N, P, d]
    dz = sae_encode(sae, clean[:, positions]) - sae_encode(sae, corrupt[:, positions])   # [N, P, S]
    rows = decoder_rows(sae)                                                 # [S, d]
    # the gradient of the prompt *mean* already carries 1/N: summing over prompts gives the
    # first-order change of the mean metric
    return (dz * (grad @ rows.T)).sum(1).sum(0).cpu().numpy()


def _position_view(values: torch.Tensor, positions: list[int], n_tokens: int) -> torch.Tensor:
    """A read-only ``[N, T, d]`` view whose rows at ``positions`` are ``values [N, P, d]``.

    A ``custom:`` source is read only at its intervention's positions, so the view stores
    ``N × span`` rows (``span = max(positions) − min(positions) + 1``; one row per prompt for
    a single position) instead of a full ``[N, T, d]`` copy: position ``t`` of prompt ``n``
    is row ``n · span + t`` of a flat buffer (other positions alias unrelated rows and must
    not be read).
    """
    n, _, d = values.shape
    span = max(positions) - min(positions) + 1
    buf = values.new_zeros((n - 1) * span + n_tokens, d)
    rows = (torch.arange(n)[:, None] * span + torch.as_tensor(positions)[None]).reshape(-1)
    buf[rows] = values.reshape(-1, d)
    return buf.as_strided((n, n_tokens, d), (span * d, d, 1))


class LatentSources:
    """``custom:`` source tensors: the corrupt activation with chosen parts moved to the clean run's
    (:meth:`make`), built from the clean and corrupt activations ``[N, T, d]`` at ``positions``."""

    def __init__(self, sae, clean: torch.Tensor, corrupt: torch.Tensor, positions: list[int]):

        self.positions, self.n_tokens = positions, corrupt.shape[1]
        self.base = corrupt[:, positions]                          # [N, P, d]
        self.zc, self.zx = sae_encode(sae, clean[:, positions]), sae_encode(sae, self.base)
        self.dz = self.zc - self.zx                                # [N, P, S]
        self.rows = decoder_rows(sae)                              # [S, d]
        recon = lambda z: z @ self.rows  # noqa: E731  (b_dec cancels in differences)
        self.d_err = (clean[:, positions] - self.base) - (recon(self.zc) - recon(self.zx))   # [N, P, d]

    def make(self, ids, error: bool = False) -> torch.Tensor:
        """``[N, T, d]`` source (valid at the positions only; :func:`_position_view`)."""
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        delta = self.dz[..., ids] @ self.rows[ids] if len(ids) else torch.zeros_like(self.d_err)
        return _position_view(self.base + delta + (self.d_err if error else 0), self.positions, self.n_tokens)

    def decoder_error(self, sae) -> float:
        """Relative error of ``z @ rows + b_dec`` against the SAE's own ``decode(z)`` on the
        corrupt and clean codes: ``max ||decode(z) − z·rows − b_dec|| / ||z·rows||``."""

        b_dec = getattr(sae, "b_dec", None)
        b_dec = 0.0 if b_dec is None else b_dec.detach().float()
        worst = 0.0
        for z in (self.zx, self.zc):
            lin = z @ self.rows
            diff = (sae_decode(sae, z).float() - lin - b_dec).norm().item()
            worst = max(worst, diff / max(lin.norm().item(), 1e-12))
        return worst


def patch_latents(model: HookedTransformer, sae, meta: dict, task: PatchTask, config: LatentPatchConfig | None = None,
                  *, position_rule: str | None = None, progress: bool = False,
                  **overrides) -> tuple[pd.DataFrame, dict]:
    """Patch the chosen latents clean → corrupt (default: the ``top`` by attribution); see the
    module docstring.

    Args:
        sae, meta: from :func:`replab.features.sae.load_sae`.
        task: a :class:`~replab.patching.task.PatchTask`.
        config: a :class:`~replab.features.config.LatentPatchConfig`: ``latents`` (or ``top``),
            ``positions`` (a list or a rule of the task; default every position), ``metric``
            (any patching metric; default the task's), ``n_random``, ``seed``, ``n_boot``;
            ``**overrides`` set its fields (``patch_latents(model, sae, meta, task, top=3)``).
        position_rule: the rule the positions came from, recorded in the summary (default: the
            config's rule when it gives one).
    Returns:
        ``(table, summary)``: one row per variant (``name, kind, k, latents,
        normalized_effect, ci_low, ci_high, of_full, of_full_low, of_full_high``) and the
        summary (module docstring keys, plus ``latents``, ``latent_attribution``,
        ``all_latents_effect``, ``error_term_effect``, ``complement_effect``, ``checks``).
    """

    cfg = with_overrides(LatentPatchConfig, config, overrides)
    metric = check_metric(cfg.metric or ("class_mass" if task.class_a is not None else "logit_diff"))
    hook = meta["hook_name"]
    site, layer = canonical_site(hook)
    if layer is None:
        raise ReplabError(f"SAE hook {hook} is not a per-layer site the patching engine can use")
    positions = cfg.positions
    if isinstance(positions, str):
        position_rule = position_rule or positions
        positions = task_positions(task, positions)
    positions = list(range(task.n_tokens)) if positions is None else [int(p) for p in positions]
    iv = lambda source: Intervention(site, layer, positions=tuple(positions), source=source)  # noqa: E731
    ceiling = Variant((iv("clean"),), name="full", group="ceiling", info={"k": None, "latents": None})
    forwards = plan_forwards(model, task, [Variant((iv("custom:latents"),)), ceiling], hooks=(hook,))
    src = LatentSources(sae, forwards["clean"][hook], forwards["corrupt"][hook], positions)
    decoder = enforce([_decoder_check(src.decoder_error(sae))])
    attr = attribution(model, sae, task, hook, positions, metric, forwards=forwards)
    top, latents = cfg.top, cfg.latents
    d_sae = attr.shape[0]
    chosen = [int(i) for i in latents] if latents is not None else [int(i) for i in np.argsort(-np.abs(attr))[:top]]
    bad = [i for i in chosen if not 0 <= i < d_sae]
    if bad:
        raise ReplabError(f"latent {bad[0]} is out of range: this SAE has {d_sae} latents")
    if not chosen:
        raise ReplabError("no latents to patch")
    active = (src.zc != 0) | (src.zx != 0)
    active = torch.nonzero(active.reshape(-1, d_sae).any(0)).flatten().cpu().numpy()
    pool = np.setdiff1d(active, chosen)
    order = [int(i) for i in np.argsort(-np.abs(attr))]
    every = list(range(d_sae))
    rest = sorted(set(every) - set(chosen))
    plan = [("chosen", "chosen", len(chosen), chosen, False),
            ("empty", "sanity", 0, [], False),
            ("all_plus_error", "sanity", d_sae, every, True),
            ("all_latents", "all_latents", d_sae, every, False),
            ("error_term", "error_term", 0, [], True),
            ("complement", "complement", len(rest), rest, True)]
    for k in sorted({*DOSE_K, len(chosen)}):
        if k <= len(active):
            plan.append((f"top_{k}", "top_k", k, order[:k], False))
    size = len(chosen) if len(pool) >= len(chosen) else 0
    rng = np.random.default_rng(cfg.seed)
    for i in range(cfg.n_random if size else 0):
        plan.append((f"random_{i}", "random", size, sorted(rng.choice(pool, size=size, replace=False).tolist()),
                     False))
    sources = {name: src.make(ids, err) for name, _, _, ids, err in plan}
    variants = [Variant((iv(f"custom:{name}"),), name=name, group=kind,
                        info={"k": k, "latents": ids if kind in ("chosen", "top_k", "random") else None})
                for name, kind, k, ids, _ in plan] + [ceiling]
    res = run_plan(model, task, variants, metric, forwards=forwards, sources=sources, n_boot=cfg.n_boot, seed=cfg.seed,
                   progress=progress, label="latent patch", unit="run", extra_checks=_latent_checks)
    full_i = res.index("full")
    of_lo, of_hi = res.ratio_ci(range(len(variants)), full_i)
    rows = [{"name": v.name, "kind": v.group, "k": v.info["k"], "latents": v.info["latents"],
             "normalized_effect": float(res.effect[i]), "ci_low": float(res.ci_low[i]),
             "ci_high": float(res.ci_high[i]), "of_full": res.of(i, full_i),
             "of_full_low": float(of_lo[i]), "of_full_high": float(of_hi[i])} for i, v in enumerate(variants)]
    rows[full_i].update(of_full=1.0, of_full_low=1.0, of_full_high=1.0)
    table = pd.DataFrame(rows)
    pos_label = ",".join(f"{p}:{task.str_tokens[p]!r}" if task.str_tokens else str(p) for p in positions)
    where = {"hook_name": hook, "hook": hook, "site": site, "layer": int(layer), "positions": positions,
             "position_rule": position_rule, "position_label": pos_label, "metric": metric, "task": task.describe()}
    s = {**where, **_summary(table, chosen, attr, res)}
    s["checks"] = {**decoder, **s["checks"]}
    s["verdict"], s["verdict_detail"] = latent_verdict(s)
    return table, s


def _decoder_check(err: float, tol: float = DECODER_TOL) -> Check:
    """The ``decoder_rows`` check (module docstring): relative error at most ``tol``."""
    return Check("decoder_rows", float(err), 0.0, tol,
                 "decode(z) = z @ decoder_rows + b_dec on the corrupt and clean codes (relative error); "
                 "otherwise the latent moves would not be the SAE's")


def _latent_checks(res) -> list[Check]:
    """Latent patching's own checks on the run's result (module docstring)."""
    full = float(res.effect[res.index("full")])
    return [Check("empty_latent_set", float(res.effect[res.index("empty")]), 0.0, TOL,
                  "patching no latent (error term kept) = the corrupt run"),
            Check("all_latents_plus_error", float(res.effect[res.index("all_plus_error")]), full, TOL,
                  "every latent plus the error term (= the clean activation, by the error term's definition) "
                  "= the engine's full patch at that site")]


def _summary(table: pd.DataFrame, chosen: list[int], attr: np.ndarray, res) -> dict:
    """The numbers of a latent-patching run (the chosen set against the full patch and random
    sets) from its table and :class:`~replab.patching.plan.PlanResult` ``res``."""
    t = table.set_index("name")
    ch, full = t.loc["chosen"], t.loc["full"]
    rand = table[table["kind"] == "random"]["normalized_effect"].to_numpy()
    e = float(ch["normalized_effect"])
    pct = float(100 * ((rand < e).sum() + 0.5 * (rand == e).sum()) / len(rand)) if len(rand) else None
    dose = table[table["kind"] == "top_k"][["k", "normalized_effect", "ci_low", "ci_high", "of_full"]]
    return {"clean_metric": res.clean_metric, "corrupt_metric": res.corrupt_metric, "latents": chosen,
            "latent_attribution": [float(attr[i]) for i in chosen],
            "effect": e, "ci_low": float(ch["ci_low"]), "ci_high": float(ch["ci_high"]),
            "of_full": float(ch["of_full"]), "of_full_low": float(ch["of_full_low"]),
            "of_full_high": float(ch["of_full_high"]),
            "full_residual_effect": float(full["normalized_effect"]), "full_ci_low": float(full["ci_low"]),
            "full_ci_high": float(full["ci_high"]),
            "all_latents_effect": float(t.loc["all_latents", "normalized_effect"]),
            "all_latents_of_full": float(t.loc["all_latents", "of_full"]),
            "error_term_effect": float(t.loc["error_term", "normalized_effect"]),
            "complement_effect": float(t.loc["complement", "normalized_effect"]),
            "complement_of_full": float(t.loc["complement", "of_full"]),
            "n_random": int(len(rand)), "random_mean": float(rand.mean()) if len(rand) else None,
            "random_sd": float(rand.std()) if len(rand) else None,
            "random_p95": float(np.quantile(rand, 0.95)) if len(rand) else None,
            "random_max": float(rand.max()) if len(rand) else None, "percentile": pct,
            "top_k": dose.to_dict("records"), "checks": res.checks_dict(), "bootstrap": res.bootstrap,
            "n_variants": res.describe()["n_variants"], "seconds": round(res.seconds, 3)}


def latent_verdict(s: dict) -> tuple[str, list[str]]:
    """``(verdict, detail sentences)``: :func:`replab.features.verdict.sufficiency` (the rule of
    direction patching) with latent-specific details."""

    n = len(s["latents"])
    subject = f"{n} latent{'s' if n != 1 else ''} {s['latents'] if n <= 10 else ''}".strip()
    v = sufficiency(s, subject, f"random sets of {n} active latents", plural=n != 1)
    if v.startswith("uninformative"):
        return v, [v]
    detail = [v, f"full patch at {s['hook']} ({s['position_label']}): {pct_text(s['full_residual_effect'])} "
                 f"{ci_text(s['full_ci_low'], s['full_ci_high'])} of the clean-vs-corrupt gap"]
    if s["n_random"]:
        detail.append(f"random sets of {n} active latents: mean {pct_text(s['random_mean'])}, p95 "
                      f"{pct_text(s['random_p95'])}; the chosen set is above {s['percentile']:.0f}% of them")
    detail.append(f"every latent (the SAE reconstruction, error term kept corrupt) restores "
                  f"{pct_text(s['all_latents_effect'])}, {pct_text(s['all_latents_of_full'])} of the full patch; the "
                  f"error term alone {pct_text(s['error_term_effect'])}; everything but the chosen latents "
                  f"{pct_text(s['complement_effect'])}")
    return v, detail

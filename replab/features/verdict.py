"""Direction- and latent-patching read-out: sanity checks, baseline tables, the verdict in words.

One rule (:func:`sufficiency`) serves ``replab features patch`` (a direction against random
directions) and ``replab sae patch`` (a set of SAE latents against random same-size latent
sets). The verdict (sufficiency, from denoising) is decided by three numbers, all in the
summary:

* ``full_residual_effect``: the whole site patched at the same positions. Below
  ``MIN_FULL`` (10% of the clean-vs-corrupt gap) the site cannot carry the effect, so no
  direction there can: **uninformative**.
* ``percentile`` / ``random_p95``: the direction against random subspaces of the same rank.
  Distinguishable from random means CI low above the random p95.
* ``of_full``: the direction's effect as a fraction of the full-residual effect, with CI.
  ≥ ``SUFFICIENT`` (50%) at the CI's low end → **sufficient**; a point estimate ≥
  ``PARTIAL`` (20%) → **partly sufficient**; otherwise **weak**. Not above random →
  **not sufficient**.

Necessity clauses follow (projection ablation, noising, LEACE), with the same numbers.

Random directions must average about 0 (:func:`random_mean_check`: ``|mean| <= max(0.05,
10% of the full effect)`` in normalised units); otherwise the run stops, like a failed
engine check.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from replab.patching.bootstrap import mean_ci
from replab.patching.checks import Check, enforce

if TYPE_CHECKING:
    from replab.features.config import DirectionSetup
    from replab.patching.plan import PlanResult

MIN_FULL = 0.10
SUFFICIENT = 0.50
PARTIAL = 0.20
RANDOM_MEAN_TOL = 0.05   # |random mean| may not exceed max(this, RANDOM_MEAN_REL · |full|) ...
RANDOM_MEAN_REL = 0.10   # ... in normalised units, or the run stops (random_mean_check)


def _row(table: pd.DataFrame, name: str) -> pd.Series | None:
    hit = table[table["name"] == name]
    return None if hit.empty else hit.iloc[0]


def direction_checks(res, tol: float) -> list:
    """Direction patching's own sanity checks on a :class:`~replab.patching.plan.PlanResult`
    (the engine's full/empty checks run with them in :func:`~replab.patching.plan.run_plan`)."""

    eff = lambda name: float(res.effect[res.index(name)])  # noqa: E731
    full = eff("full")
    checks = [Check("identity_subspace", eff("identity"), full, tol,
                    "the identity basis through the direction tool = the full-residual patch"),
              Check("direction_plus_complement", eff("split"), full, tol,
                    "the direction then its complement = the full-residual patch"),
              Check("clean_run", eff("clean_run"), 1.0, tol,
                    "the clean residual at resid_pre reproduces the clean run")]
    zero = [i for i, v in enumerate(res.variants) if v.group == "direction" and v.info.get("mode") == "steer"
            and v.info.get("alpha") == 0]
    if zero:
        checks.append(Check("steer_zero", float(res.effect[zero[0]]), 0.0, tol, "steering with α = 0 = corrupt"))
    return checks


def random_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per random direction: its denoising effect (and ablation effect where run)."""
    den = table[(table["group"] == "random") & (table["mode"] == "denoise")]
    abl = table[(table["group"] == "random") & (table["mode"] == "ablate")]
    out = pd.DataFrame({"random": den["name"].str.removeprefix("random_").astype(int).to_numpy(),
                        "normalized_effect": den["normalized_effect"].to_numpy(),
                        "of_full": den["of_full"].to_numpy()})
    ab = dict(zip(abl["name"].str.removeprefix("ablate_random_").astype(int), abl["normalized_effect"], strict=True))
    out["ablate_effect"] = out["random"].map(ab)
    return out


def steering_table(table: pd.DataFrame, patched: np.ndarray, clean: float, corrupt: float,
                   weights: np.ndarray) -> pd.DataFrame:
    """Dose–response: per α, the direction's metric (bootstrap CI of the mean over prompts,
    resampled with ``weights`` from :func:`replab.patching.bootstrap.resample_weights`) and
    normalised effect, and the random vectors' mean and 5–95% band."""

    rows = []
    steer = table[table["mode"] == "steer"]
    for a, sub in steer.groupby("alpha", sort=True):
        d = sub[sub["group"] == "direction"].iloc[0]
        vals = patched[d.name]
        lo, hi = mean_ci(weights, vals)
        rnd = sub[sub["group"] == "random"]["normalized_effect"].to_numpy()
        rows.append({"alpha": float(a), "metric_after": float(vals.mean()),
                     "metric_low": lo, "metric_high": hi,
                     "normalized_effect": float(d["normalized_effect"]), "ci_low": float(d["ci_low"]),
                     "ci_high": float(d["ci_high"]),
                     "random_mean": float(rnd.mean()) if len(rnd) else None,
                     "random_p05": float(np.quantile(rnd, 0.05)) if len(rnd) else None,
                     "random_p95": float(np.quantile(rnd, 0.95)) if len(rnd) else None})
    return pd.DataFrame(rows)


def projection_stats(acts: dict, vector: np.ndarray, pos) -> dict:
    """Projections of the clean / corrupt activations at ``pos`` onto ``vector`` (the scale in
    which steering's α is meaningful), and the activation norm there."""
    import torch

    v = torch.as_tensor(np.asarray(vector), dtype=acts["clean"].dtype)
    sel = slice(None) if pos is None else list(pos)
    proj = {k: (a[:, sel] @ v).mean(1).cpu().numpy() for k, a in acts.items()}
    norm = float(acts["clean"][:, sel].norm(dim=-1).mean())
    return {"clean_mean": float(proj["clean"].mean()), "corrupt_mean": float(proj["corrupt"].mean()),
            "gap": float((proj["clean"] - proj["corrupt"]).mean()),
            "sd": float(np.concatenate([proj["clean"], proj["corrupt"]]).std()), "act_norm": norm}


def _whole_pct(x) -> str:
    v = round(100 * float(x))
    return str(v if v != 0 else 0)   # no "-0"


def pct_text(x) -> str:
    """A fraction as a whole percentage (``0.714`` -> ``"71%"``; ``"n/a"`` when missing)."""
    return "n/a" if x is None or not np.isfinite(x) else f"{_whole_pct(x)}%"


def ci_text(lo, hi) -> str:
    """A CI of fractions in whole percentages (``"[64, 78]"``; ``"[n/a]"`` when not finite)."""
    return f"[{_whole_pct(lo)}, {_whole_pct(hi)}]" if np.isfinite(lo) and np.isfinite(hi) else "[n/a]"


def random_mean_check(random_mean: float, full: float, n: int, what: str = "random directions",
                      tol_abs: float = RANDOM_MEAN_TOL, tol_rel: float = RANDOM_MEAN_REL,
                      expected_fraction: float = 0.0) -> dict:
    """The "random directions average about 0" sanity check; ReplabError when it fails.

    A uniformly random rank-``k`` projection in ``d`` dimensions has mean ``(k/d) · I``, so if
    the effect were linear in the patched difference, random subspaces would restore
    ``k/d`` of the full effect on average (``expected_fraction``; ≈ 0.002 for one direction
    in SmolLM2's 576 dimensions). Passes when ``|random_mean − expected_fraction · full| <=
    max(tol_abs, tol_rel · |full|)`` in normalised units (0.05 of the clean-vs-corrupt gap, or
    10% of the full-residual effect, whichever is larger). A larger deviation means the
    baseline (or the engine) is broken, and every percentile against it would mislead.
    """

    expected = expected_fraction * full if np.isfinite(full) else 0.0
    tol = max(tol_abs, tol_rel * abs(full)) if np.isfinite(full) else tol_abs
    check = Check("random_mean", float(random_mean), float(expected), float(tol),
                  f"the mean effect of {n} {what} is about {expected_fraction:.3g} x the full effect "
                  f"(|mean - expected| <= max({tol_abs}, {tol_rel} x |full effect|)); a larger --random-tol "
                  "only if you know why")
    return enforce([check])["random_mean"]


def sufficiency(s: dict, subject: str = "the direction", random_what: str = "random directions",
                plural: bool = False) -> str:
    """The verdict sentence (module docstring rule) from a summary's numbers.

    Needs ``full_residual_effect``, ``effect``, ``ci_low``, ``of_full`` (+ ``_low``/``_high``),
    ``random_p95``, ``percentile``, ``n_random``, ``site``, ``layer``, ``position_label``.
    Shared by direction patching and SAE latent patching.
    """
    full, n = s["full_residual_effect"], s["n_random"]
    if not np.isfinite(full) or abs(full) < MIN_FULL:
        return (f"uninformative: the full-residual patch at {s['site']} L{s['layer']} (positions "
                f"{s['position_label']}) restores only {pct_text(full)} of the clean-vs-corrupt gap, so nothing "
                f"there can carry the effect ({subject}: {pct_text(s['effect'])}); try an earlier "
                "layer, or a position the output still reads")
    if n:
        above = s["ci_low"] > s["random_p95"]
        n_below = int(round(s["percentile"] / 100 * n))
        rank = (f"above all {n} {random_what}" if n_below >= n
                else f"above {n_below} of {n} {random_what}")
    else:
        above, rank = s["ci_low"] > 0, "no random baseline"
    ratio = f"{pct_text(s['of_full'])} {ci_text(s['of_full_low'], s['of_full_high'])} of the full-residual effect"
    verb = "restore" if plural else "restores"
    if above and s["of_full_low"] >= SUFFICIENT:
        return f"sufficient: {subject} {verb} {ratio}; {rank}"
    if above and s["of_full"] >= PARTIAL:
        return f"partly sufficient: {subject} {verb} {ratio}; {rank}"
    if above:
        return f"weak: {subject} {verb} only {ratio}, though {rank}"
    p95 = s["random_p95"] / full if n and full else np.nan
    pct = s["percentile"] if s["percentile"] is not None else float("nan")
    return (f"not sufficient: {subject} {verb} {ratio}; {rank} (percentile {pct:.0f}, random p95 "
            f"{pct_text(p95)} of the full effect)")


def direction_verdict(s: dict) -> tuple[str, list[str]]:
    """``(verdict, detail sentences)`` from a summary's numbers (see the module docstring)."""
    v = sufficiency(s)
    if v.startswith("uninformative"):
        return v, [v]
    sh = s.get("shuffled_of_full")
    if sh is not None and np.isfinite(sh) and s["of_full"] <= sh and not v.startswith("not"):
        v += f"; but not above the shuffled-label direction ({pct_text(sh)})"
    full = s["full_residual_effect"]
    detail = [v, f"full-residual patch: {pct_text(full)} {ci_text(s['full_ci_low'], s['full_ci_high'])} of the "
                 f"clean-vs-corrupt gap; random directions: mean {pct_text(s['random_mean'])}, p95 "
                 f"{pct_text(s['random_p95'])}"]
    detail.append(f"complement (everything but the direction) restores {pct_text(s['complement_of_full'])} of "
                  "the full-residual effect")
    if s.get("shuffled_of_full") is not None:
        detail.append(f"shuffled-label direction ({s.get('shuffled_source') or 'shuffled labels'}) restores "
                      f"{pct_text(s['shuffled_of_full'])} of the full-residual effect (above "
                      f"{s['shuffled_percentile']:.0f}% of the random directions)")
    a = s["ablation"]
    detail.append(f"necessity: projection ablation on the clean run removes {pct_text(a['drop'])} "
                  f"{ci_text(a['drop_low'], a['drop_high'])} of the clean-vs-corrupt gap (random: "
                  f"{pct_text(a['random_mean_drop'])}); noising the direction removes {pct_text(s['noising']['drop'])} "
                  f"(the full noising patch: {pct_text(s['noising']['full_drop'])})")
    if s.get("leace"):
        detail.append(f"LEACE erasure on the clean run removes {pct_text(s['leace']['drop'])} "
                      f"{ci_text(s['leace']['drop_low'], s['leace']['drop_high'])}")
    return v, detail


@dataclass(frozen=True)
class DirectionTables:
    """The tables a direction-patching run's summary is read from: ``effects`` (one row per
    variant), ``random`` (:func:`random_table`) and ``steering`` (:func:`steering_table`)."""

    effects: pd.DataFrame
    random: pd.DataFrame
    steering: pd.DataFrame


@dataclass(frozen=True)
class DirectionSummary:
    """What a direction-patching run found (``summary.json``; docs/features.md lists the keys).

    Effects are normalised (0 = corrupt, 1 = clean); ``of_full*``: fractions of the
    full-residual patch's effect; ``random_*``: the random directions' effects;
    ``ablation`` / ``noising`` / ``leace``: the necessity numbers (``drop`` with CI);
    ``checks``: every sanity check (all passed); ``verdict`` and ``verdict_detail``: the rule of
    the module docstring in words.
    """

    effect: float
    ci_low: float
    ci_high: float
    of_full: float
    of_full_low: float
    of_full_high: float
    full_residual_effect: float
    full_ci_low: float
    full_ci_high: float
    random_mean: float
    random_sd: float
    random_p95: float
    random_max: float
    n_random: int
    percentile: float
    complement_effect: float
    complement_of_full: float
    shuffled_effect: float | None
    shuffled_of_full: float | None
    shuffled_percentile: float | None
    ablation: dict
    noising: dict
    leace: dict | None
    site: str
    layer: int
    hook: str
    positions: list[int] | None
    position_rule: str | None
    position_label: str
    metric: str
    clean_metric: float
    corrupt_metric: float
    steering: list[dict]
    projection: dict
    checks: dict[str, dict]
    task: dict
    direction: dict
    n_variants: int
    seconds: float
    bootstrap: str
    shuffled_source: str | None
    random_mean_ok: bool
    verdict: str
    verdict_detail: list[str]

    def to_dict(self) -> dict:
        """The JSON-safe summary (a deep copy)."""
        return dataclasses.asdict(self)


def _drop(row: pd.Series) -> dict:
    """A necessity row (noising, ablation, LEACE on the clean run) as a drop with its CI."""
    e = float(row["normalized_effect"])
    return {"effect": e, "drop": 1 - e, "drop_low": 1 - float(row["ci_high"]), "drop_high": 1 - float(row["ci_low"])}


def summarize(setup: DirectionSetup, res: PlanResult, tables: DirectionTables, projection: dict) -> DirectionSummary:
    """The :class:`DirectionSummary`, verdict included, of a direction-patching run: ``setup``
    (what was patched where, with its config), the run's
    :class:`~replab.patching.plan.PlanResult` ``res``, its ``tables`` and the ``projection``
    stats (:func:`projection_stats` plus the steering unit). ReplabError if the
    random-direction mean is not about 0 (:func:`random_mean_check`, reported with the other
    checks). Nothing passed in is modified."""
    table, direction, cfg = tables.effects, setup.direction, setup.config
    d, f = _row(table, "direction"), _row(table, "full")
    rnd = tables.random["normalized_effect"].to_numpy()
    e = float(d["normalized_effect"])
    s = {"effect": e, "ci_low": float(d["ci_low"]), "ci_high": float(d["ci_high"]),
         "of_full": float(d["of_full"]), "of_full_low": float(d["of_full_low"]),
         "of_full_high": float(d["of_full_high"]), "full_residual_effect": float(f["normalized_effect"]),
         "full_ci_low": float(f["ci_low"]), "full_ci_high": float(f["ci_high"]),
         "random_mean": float(rnd.mean()), "random_sd": float(rnd.std()), "random_p95": float(np.quantile(rnd, 0.95)),
         "random_max": float(rnd.max()), "n_random": int(len(rnd)),
         "percentile": float(100 * ((rnd < e).sum() + 0.5 * (rnd == e).sum()) / len(rnd)),
         "complement_effect": float(_row(table, "complement")["normalized_effect"]),
         "complement_of_full": float(_row(table, "complement")["of_full"])}
    sh = _row(table, "shuffled")
    s["shuffled_effect"] = None if sh is None else float(sh["normalized_effect"])
    s["shuffled_of_full"] = None if sh is None else float(sh["of_full"])
    s["shuffled_percentile"] = (None if sh is None else float(100 * (rnd < sh["normalized_effect"]).mean()))
    ab, dn, fn = _row(table, "ablate_direction"), _row(table, "direction_noise"), _row(table, "full_noise")
    ab_rnd = tables.random["ablate_effect"].dropna().to_numpy()
    s["ablation"] = {**_drop(ab), "random_mean_drop": float(1 - ab_rnd.mean()) if len(ab_rnd) else None,
                     "random_p95_drop": float(np.quantile(1 - ab_rnd, 0.95)) if len(ab_rnd) else None}
    s["noising"] = {**_drop(dn), "of_full": float(dn["of_full"]), "full_drop": 1 - float(fn["normalized_effect"])}
    le = _row(table, "leace")
    s["leace"] = None if le is None else _drop(le)
    run = res.describe()
    s.update({"site": setup.site, "layer": setup.layer, "hook": setup.hook,
              "positions": None if setup.positions is None else list(setup.positions),
              "position_rule": setup.position_rule, "position_label": setup.position_label, "metric": setup.metric,
              "clean_metric": run["clean_metric"], "corrupt_metric": run["corrupt_metric"],
              "steering": tables.steering.to_dict("records"), "projection": dict(projection),
              "task": setup.task.describe(), "direction": direction.describe(), "n_variants": run["n_variants"],
              "seconds": run["seconds"], "bootstrap": run["bootstrap"],
              "shuffled_source": setup.shuffled_source if s["shuffled_effect"] is not None else None})
    random_tol = RANDOM_MEAN_TOL if cfg.random_tol is None else cfg.random_tol
    random_mean = random_mean_check(s["random_mean"], s["full_residual_effect"], s["n_random"],
                                    tol_abs=random_tol, expected_fraction=direction.k / direction.d)
    s["checks"] = {**run["checks"], "random_mean": random_mean}
    s["random_mean_ok"] = random_mean["ok"]
    verdict, detail = direction_verdict(s)
    return DirectionSummary(**s, verdict=verdict, verdict_detail=detail)

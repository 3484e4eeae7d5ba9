"""Direction patching: does the model *use* a direction? (W3 step 6 of docs/workflows.md)

>>> d = load_direction("runs/probe/directions/meandiff_L15_artist.json")   # doctest: +SKIP
>>> res = patch_direction(model, task, d)                                  # doctest: +SKIP
>>> res.summary.verdict                                                    # doctest: +SKIP
'sufficient: restores 71% [64, 78] of the full-residual effect; above all 100 random directions'

Everything below runs in **one** batched call of the patching engine (base = the corrupt
run; ``P`` = the patched positions, ``u`` = the direction's basis):

=====================  =====================================================================
variant                what it is
=====================  =====================================================================
direction              the clean component along ``u`` patched into the corrupt run (denoise)
full                   the whole site patched at ``P`` (the ceiling)
random_i               ``n_random`` random subspaces of the same rank, same site/positions
complement             everything *except* ``u`` patched (the orthogonal complement)
shuffled               the shuffled-label direction (when one is given)
direction_noise        the corrupt component along ``u`` patched into the clean run
ablate_direction       projection ablation on the clean run: the ``u`` component removed
steer α                ``α · u`` added to the corrupt run, for every α (and random vectors)
identity / split       sanity: the identity basis, and ``u`` then its complement, = full
=====================  =====================================================================

Runs "on the clean run" stay in the one corrupt-based call: they first overwrite the whole
residual at ``blocks.L.hook_resid_pre`` with the clean run's (every position), which makes
the forward exactly the clean run from there on, then apply their intervention.

``normalized_effect`` is (patched − corrupt) / (clean − corrupt) on prompt means (0 =
corrupt, 1 = clean); ``of_full`` divides by the full-residual patch's effect (denoising), or
gives the fraction of the full noising drop (noising and ablation). CIs are bootstrap over
people (the two-way cluster bootstrap of :mod:`replab.patching.bootstrap`; pairs for tasks
without people), with the same resamples for every variant. LEACE erasure (an oblique projection,
``x − M(x − μ)``) is not an orthogonal subspace patch (``a + (s − a)PᵀP``), so it is applied
to the cached clean activations first (:func:`leace_source`) and patched in as a ``custom:``
source, in the same batch.

Options: :class:`~replab.features.config.DirectionPatchConfig`; the result's ``summary`` is a
:class:`~replab.features.verdict.DirectionSummary`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from replab.errors import ReplabError
from replab.features import verdict
from replab.features.config import DirectionPatchConfig, DirectionSetup, check_direction_site, with_overrides
from replab.features.direction_inputs import DirectionInput
from replab.patching.bootstrap import ratio_ci
from replab.patching.engine import Variant
from replab.patching.interventions import Intervention
from replab.patching.metrics import check_metric
from replab.patching.plan import plan_forwards, run_plan
from replab.patching.task import PatchTask, task_positions

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from replab.features.verdict import DirectionSummary

TOL = 1e-3           # sanity checks, in units of the normalised effect


@dataclass
class DirectionPatchResult:
    """``effects``: one row per named variant; ``random``: one row per random direction;
    ``steering``: dose–response rows; ``per_prompt``: named variants × prompts; ``summary``:
    the numbers, checks and verdict (:class:`~replab.features.verdict.DirectionSummary`;
    ``summary.to_dict()`` is what ``summary.json`` holds)."""

    effects: pd.DataFrame
    random: pd.DataFrame
    steering: pd.DataFrame
    per_prompt: pd.DataFrame
    summary: DirectionSummary


def random_bases(n: int, k: int, d: int, seed: int = 0) -> np.ndarray:
    """``[n, k, d]`` orthonormal bases of uniformly random k-dim subspaces (seeded)."""
    g = np.random.default_rng(seed)
    q, _ = np.linalg.qr(g.standard_normal((n, d, k)))
    return np.transpose(q, (0, 2, 1))


def complement_basis(b: np.ndarray) -> np.ndarray:
    """Orthonormal basis ``[d − k, d]`` of the orthogonal complement of the rows of ``b``."""
    d = b.shape[1]
    q, _ = np.linalg.qr(np.concatenate([b.T, np.eye(d)], axis=1))
    return q[:, b.shape[0]:d].T


def _plan(setup: DirectionSetup, unit: float, shuffled: np.ndarray | None, leace: bool) -> list[Variant]:
    """Every run of the experiment as a labelled variant (``group`` and ``info["mode"]``,
    ``info["alpha"]`` say what it is; see the module docstring). ``unit``: the steering unit."""
    site, layer, pos, d, cfg = setup.site, setup.layer, setup.positions, setup.direction, setup.config
    iv = lambda src, u=None, **kw: Intervention(site, layer, positions=pos, source=src,  # noqa: E731
                                                direction=None if u is None else u, **kw)
    to_clean = Intervention("resid_pre", layer, source="clean")

    def var(name, group, mode, ivs, alpha=None, on_clean=False, start=None):
        return Variant(((to_clean,) if on_clean else ()) + tuple(ivs), start=start, name=name, group=group,
                       info={"mode": mode, "alpha": alpha})
    comp = complement_basis(d.basis)
    # a full-rank "direction" has an empty complement: patching it is the unpatched run
    c_den = (iv("clean", comp),) if len(comp) else ()
    c_noise = (iv("corrupt", comp),) if len(comp) else ()
    plan = [var("direction", "direction", "denoise", [iv("clean", d.basis)]),
            var("full", "full", "denoise", [iv("clean")]),
            var("complement", "complement", "denoise", c_den, start=layer),
            var("identity", "sanity", "denoise", [iv("clean", np.eye(d.d))]),
            var("split", "sanity", "denoise", [iv("clean", d.basis), *c_den]),
            var("clean_run", "sanity", "noise", [], on_clean=True),
            var("direction_noise", "direction", "noise", [iv("corrupt", d.basis)], on_clean=True),
            var("full_noise", "full", "noise", [iv("corrupt")], on_clean=True),
            var("complement_noise", "complement", "noise", c_noise, on_clean=True),
            var("ablate_direction", "direction", "ablate", [iv("zero", d.basis)], on_clean=True)]
    if shuffled is not None:
        plan.append(var("shuffled", "shuffled", "denoise", [iv("clean", shuffled)]))
    n_random, n_ablate, n_steer = cfg.n_random, cfg.n_random_ablate, cfg.n_random_steer
    rand = random_bases(max(n_random, n_ablate, n_steer), d.k, d.d, cfg.seed)
    plan += [var(f"random_{i}", "random", "denoise", [iv("clean", rand[i])]) for i in range(n_random)]
    plan += [var(f"ablate_random_{i}", "random", "ablate", [iv("zero", rand[i])], on_clean=True)
             for i in range(n_ablate)]
    for a in cfg.alphas:
        plan.append(var(f"steer_{a:g}", "direction", "steer", [iv("steer", d.vector, scale=a * unit)], alpha=a))
        for i in range(n_steer):
            plan.append(var(f"steer_random_{i}_{a:g}", "random", "steer", [iv("steer", rand[i][0], scale=a * unit)],
                            alpha=a))
    if leace:   # LEACE's oblique projection, precomputed on the clean activations (a custom source)
        plan.append(var("leace", "leace", "ablate", [iv("custom:leace")], on_clean=True))
    return plan


def leace_source(eraser, clean_acts: torch.Tensor, pos) -> torch.Tensor:
    """The clean activations ``[N, T, d]`` with LEACE applied at ``pos`` (every position when
    None): the ``custom:leace`` source of the LEACE variant."""
    out = clean_acts.clone()
    idx = slice(None) if pos is None else list(pos)
    x = out[:, idx]
    out[:, idx] = eraser(x.reshape(-1, x.shape[-1]).double()).to(out.dtype).reshape(x.shape)
    return out


def resolve_setup(model: HookedTransformer, task: PatchTask, direction: DirectionInput,
                  config: DirectionPatchConfig, shuffled_source: str | None = None) -> DirectionSetup:
    """Where ``config`` patches ``direction`` on ``task`` (defaults filled in from the
    direction and the task), checked against ``model``; ReplabError when something does not fit."""
    site = config.site or direction.site
    layer = direction.layer if config.layer is None else config.layer
    if site is None or layer is None:
        raise ReplabError("this direction does not say where it lives: give --site and --layer")
    site = check_direction_site(site)
    if direction.d != model.cfg.d_model:
        raise ReplabError(f"the direction has {direction.d} dims; this model's residual has {model.cfg.d_model}")
    if not 0 <= layer < model.cfg.n_layers:
        raise ReplabError(f"layer {layer} is out of range: this model has layers 0-{model.cfg.n_layers - 1}")
    metric = check_metric(config.metric or task.meta.get("metric") or "logit_diff")
    rule, pos = resolve_positions(task, direction, config.positions)
    return DirectionSetup(direction, task, site, int(layer), pos, rule, metric, config, shuffled_source)


def patch_direction(model: HookedTransformer, task: PatchTask, direction: DirectionInput,
                    config: DirectionPatchConfig | None = None, *, shuffled: np.ndarray | None = None,
                    leace=None, shuffled_source: str | None = None, progress: bool = False,
                    **overrides) -> DirectionPatchResult:
    """Patch, noise, ablate and steer along ``direction``, with baselines; see the module docstring.

    Args:
        direction: a :class:`~replab.features.direction_inputs.DirectionInput` (basis ``[k, d]``).
        config: a :class:`~replab.features.config.DirectionPatchConfig` (site, layer, positions,
            metric, random baselines, steering α, bootstrap); ``**overrides`` set its fields
            (``patch_direction(model, task, d, n_random=20, metric="logit_diff")``).
        shuffled: a shuffled-label direction ``[d]`` (baseline), or None; ``shuffled_source``
            says where it came from (recorded in the summary).
        leace: a fitted LEACE eraser for this site/layer (``fit_leace``), or None.
    Returns:
        :class:`DirectionPatchResult`; ``summary.effect``, ``ci_low``, ``ci_high``,
        ``full_residual_effect``, ``random_mean``, ``random_p95``, ``percentile``, ``verdict``, ...
        CIs resample people when the task says who each pair names
        (:mod:`replab.patching.bootstrap`), else pairs.
    """

    cfg = with_overrides(DirectionPatchConfig, config, overrides)
    setup = resolve_setup(model, task, direction, cfg, shuffled_source)
    pos, hook = setup.positions, setup.hook
    plan = _plan(setup, 1.0, shuffled, leace is not None)
    forwards = plan_forwards(model, task, plan, hooks=(hook,))
    acts = {k: forwards[k][hook] for k in ("clean", "corrupt")}
    stats = verdict.projection_stats(acts, direction.vector, pos)
    unit = 1.0 if cfg.alpha_unit == "raw" else stats["gap"]
    if unit != 1.0:   # the steering coefficients depend on the measured gap
        plan = _plan(setup, unit, shuffled, leace is not None)
    sources = {"leace": leace_source(leace, acts["clean"], pos)} if leace is not None else None
    res = run_plan(model, task, plan, setup.metric, forwards=forwards, sources=sources, n_boot=cfg.n_boot,
                   seed=cfg.seed, max_tokens=cfg.max_tokens, progress=progress, label="direction patch",
                   unit="run", extra_checks=lambda r: verdict.direction_checks(r, TOL))
    table = _effects(res)
    random_tbl = verdict.random_table(table)
    steering = verdict.steering_table(table, res.patched, res.clean_metric, res.corrupt_metric, res.weights)
    steering["coef"] = steering["alpha"] * unit
    keep = [i for i, v in enumerate(plan) if not v.name.startswith(("random_", "steer_random_", "ablate_random_"))]
    per_prompt = pd.DataFrame([{"name": plan[i].name, "prompt_id": j,
                                "prompt": task.prompts[j] if task.prompts else None,
                                "metric_after": float(res.patched[i, j])}
                               for i in keep for j in range(task.n_prompts)])
    projection = {**stats, "alpha_unit": cfg.alpha_unit, "unit": float(unit)}
    summary = verdict.summarize(setup, res, verdict.DirectionTables(table, random_tbl, steering), projection)
    return DirectionPatchResult(table, random_tbl, steering, per_prompt, summary)


def resolve_positions(task: PatchTask, direction: DirectionInput, positions=None):
    """``(rule, positions)`` for a run: ``positions`` (a rule or a tuple) if given, else the
    direction's own rule, else ``last``. A rule the task does not know is an error (never a
    silent fallback): the direction was fitted at one position and means little elsewhere."""

    if positions is not None and not isinstance(positions, str):
        return None, tuple(int(p) for p in positions)
    if positions is not None:
        return positions, task_positions(task, positions)
    rule = direction.position or "last"
    try:
        return rule, task_positions(task, rule)
    except ReplabError as e:
        raise ReplabError(f"the direction's position rule {rule!r} ({direction.source or direction.kind}) is "
                          f"not defined for task {task.name} ({e}); pass --positions") from None


def _effects(res) -> pd.DataFrame:
    """One row per variant of a :class:`~replab.patching.plan.PlanResult`: normalised effect
    with CI, and ``of_full``: the fraction of the full denoising patch (denoise, steer) or of
    the full noising drop (noise, ablate), with CIs from the same bootstrap resamples."""

    names = [v.name for v in res.variants]
    modes = [v.info["mode"] for v in res.variants]
    up = np.array([m in ("denoise", "steer") for m in modes])
    c_mean, x_mean = res.clean_metric, res.corrupt_metric
    ref_up, ref_down = res.patched[names.index("full")], res.patched[names.index("full_noise")]
    of_lo, of_hi = np.full(len(names), np.nan), np.full(len(names), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        for sel, ref, base in ((up, ref_up, res.corrupt), (~up, ref_down, res.clean)):
            if sel.any():
                of_lo[sel], of_hi[sel] = ratio_ci(res.weights, res.patched[sel], ref, base)
    rows = []
    for i, v in enumerate(res.variants):
        base, ref = (x_mean, ref_up.mean()) if up[i] else (c_mean, ref_down.mean())
        rows.append({"name": v.name, "group": v.group, "mode": modes[i], "alpha": v.info["alpha"],
                     "metric": res.metric, "metric_after": float(res.patched[i].mean()),
                     "normalized_effect": float(res.effect[i]), "ci_low": float(res.ci_low[i]),
                     "ci_high": float(res.ci_high[i]), "of_full": _ratio(res.patched[i].mean() - base, ref - base),
                     "of_full_low": float(of_lo[i]), "of_full_high": float(of_hi[i])})
    return pd.DataFrame(rows)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if abs(den) > 1e-12 else float("nan")

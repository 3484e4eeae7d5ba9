"""Direction patching: does the model *use* a direction? (WORKFLOWS W3 step 6)

>>> d = load_direction("runs/probe/directions/meandiff_L15_artist.json")   # doctest: +SKIP
>>> res = direction_patch(model, task, d)                                  # doctest: +SKIP
>>> res.summary["verdict"]                                                 # doctest: +SKIP
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
``x − M(x − μ)``) is not expressible as an engine intervention (``a + (s − a)PᵀP`` is
orthogonal), so it runs as one extra hooked forward of the clean prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from replab.errors import ReplabError
from replab.features.direction_inputs import DirectionInput
from replab.hooks import canonical_site
from replab.patching.engine import Variant, run_variants
from replab.patching.interventions import Intervention
from replab.patching.metrics import check_metric, normalized, task_metrics
from replab.patching.task import PatchTask

TOL = 1e-3           # sanity checks, in units of the normalised effect
DEFAULT_ALPHAS = (-2.0, -1.0, 0.0, 1.0, 2.0)   # in gap units (DEFAULT_ALPHA_UNIT)
DEFAULT_ALPHA_UNIT = "gap"


@dataclass
class DirectionPatchResult:
    """``effects``: one row per named variant; ``random``: one row per random direction;
    ``steering``: dose–response rows; ``per_prompt``: named variants × prompts; ``summary``."""

    effects: pd.DataFrame
    random: pd.DataFrame
    steering: pd.DataFrame
    per_prompt: pd.DataFrame
    summary: dict = field(default_factory=dict)


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


def _plan(site, layer, pos, d: DirectionInput, n_random, n_ablate, n_steer, alphas, unit, shuffled, seed):
    """[(name, group, mode, alpha, Variant)] for every run of the experiment."""
    iv = lambda src, u=None, **kw: Intervention(site, layer, positions=pos, source=src,  # noqa: E731
                                                direction=None if u is None else u, **kw)
    to_clean = Intervention("resid_pre", layer, source="clean")
    on_clean = lambda *ivs: Variant((to_clean, *ivs))  # noqa: E731
    comp = complement_basis(d.basis)
    # a full-rank "direction" has an empty complement: patching it is the unpatched run
    c_den = (iv("clean", comp),) if len(comp) else ()
    c_noise = (iv("corrupt", comp),) if len(comp) else ()
    plan = [("direction", "direction", "denoise", None, Variant((iv("clean", d.basis),))),
            ("full", "full", "denoise", None, Variant((iv("clean"),))),
            ("complement", "complement", "denoise", None, Variant(c_den, start=layer)),
            ("identity", "sanity", "denoise", None, Variant((iv("clean", np.eye(d.d)),))),
            ("split", "sanity", "denoise", None, Variant((iv("clean", d.basis), *c_den))),
            ("clean_run", "sanity", "noise", None, on_clean()),
            ("direction_noise", "direction", "noise", None, on_clean(iv("corrupt", d.basis))),
            ("full_noise", "full", "noise", None, on_clean(iv("corrupt"))),
            ("complement_noise", "complement", "noise", None, on_clean(*c_noise)),
            ("ablate_direction", "direction", "ablate", None, on_clean(iv("zero", d.basis)))]
    if shuffled is not None:
        plan.append(("shuffled", "shuffled", "denoise", None, Variant((iv("clean", shuffled),))))
    rand = random_bases(max(n_random, n_ablate, n_steer), d.k, d.d, seed)
    plan += [(f"random_{i}", "random", "denoise", None, Variant((iv("clean", rand[i]),))) for i in range(n_random)]
    plan += [(f"ablate_random_{i}", "random", "ablate", None, on_clean(iv("zero", rand[i])))
             for i in range(n_ablate)]
    for a in alphas:
        plan.append((f"steer_{a:g}", "direction", "steer", a,
                     Variant((iv("steer", d.vector, scale=a * unit),))))
        for i in range(n_steer):
            v = rand[i][0]
            plan.append((f"steer_random_{i}_{a:g}", "random", "steer", a,
                         Variant((iv("steer", v, scale=a * unit),))))
    return plan


def _metrics(model, task: PatchTask, metric: str, finals: torch.Tensor, forwards: dict):
    """Per-prompt ``{clean, corrupt [N], patched [V, N]}``."""
    return task_metrics(model, task, metric, finals, forwards)[0]


def leace_final(model, task: PatchTask, eraser, site: str, layer: int, pos) -> torch.Tensor:
    """Final residuals ``[N, d]`` of the clean run with LEACE applied at ``site``/``layer``/``pos``."""
    from replab.hooks import SITES

    hook = SITES[site].hook(layer)
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    keep = {}

    def erase(act, hook):
        act = act.clone()
        idx = slice(None) if pos is None else list(pos)
        x = act[:, idx]
        act[:, idx] = eraser(x.reshape(-1, x.shape[-1]).double()).to(act.dtype).reshape(x.shape)
        return act

    def grab(act, hook):
        keep["final"] = act[:, -1].clone()

    with torch.inference_mode():
        model.run_with_hooks(task.clean, fwd_hooks=[(hook, erase), (last, grab)], return_type=None)
    return keep["final"]


def direction_patch(model, task: PatchTask, direction: DirectionInput, site: str | None = None,
                    layer: int | None = None, positions=None, metric: str | None = None,
                    n_random: int = 100, alphas=DEFAULT_ALPHAS, n_random_ablate: int = 10,
                    n_random_steer: int = 5, alpha_unit: str = DEFAULT_ALPHA_UNIT,
                    shuffled: np.ndarray | None = None, leace=None,
                    seed: int = 0, n_boot: int = 1000, max_tokens: int = 65536,
                    progress: bool = False, random_tol: float | None = None,
                    shuffled_source: str | None = None) -> DirectionPatchResult:
    """Patch, noise, ablate and steer along ``direction``, with baselines; see the module docstring.

    Args:
        site, layer: default the direction's own (a probe's hook), else ReplabError.
        positions: a tuple of positions, a rule (``entity_last``, ``last``, ``all``, ``3,4``);
            default the direction's own position rule (ReplabError when the task does not
            know it), or ``last`` for a direction without one (a raw vector).
        metric: default the task's (``class_mass`` for the superclass task), else logit_diff.
        n_random: random subspaces (same rank) for the denoising baseline (≥ 1);
            ``n_random_ablate`` / ``n_random_steer``: random baselines for ablation / steering.
        alphas, alpha_unit: steering adds ``α · unit · direction``; ``unit`` is the mean
            clean-minus-corrupt projection onto the direction at the positions (``gap``, the
            default: α = 1 moves a corrupt prompt by the average class gap along the direction)
            or 1 (``raw``: residual norms grow with depth, so a fixed raw α means little).
        random_tol: tolerance of the random-mean sanity check (default
            :data:`replab.features.verdict.RANDOM_MEAN_TOL`); CIs resample people when the task
            says who each pair names (:mod:`replab.patching.bootstrap`), else pairs.
        shuffled: a shuffled-label direction ``[d]`` (baseline), or None.
        leace: a fitted LEACE eraser for this site/layer (``fit_leace``), or None.
    Returns:
        :class:`DirectionPatchResult`; ``summary`` has ``effect``, ``ci_low``, ``ci_high``,
        ``full_residual_effect``, ``random_mean``, ``random_p95``, ``percentile``, ``verdict``.
    """
    from replab._progress import progress_bar
    from replab.features import verdict as V

    site = site or direction.site
    layer = direction.layer if layer is None else int(layer)
    if site is None or layer is None:
        raise ReplabError("this direction does not say where it lives: give --site and --layer")
    site, _ = canonical_site(site)
    if site not in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
        raise ReplabError(f"direction patching works on d_model sites (resid_*, attn_out, mlp_out), not {site}")
    if direction.d != model.cfg.d_model:
        raise ReplabError(f"the direction has {direction.d} dims; this model's residual has {model.cfg.d_model}")
    if not 0 <= layer < model.cfg.n_layers:
        raise ReplabError(f"layer {layer} is out of range: this model has layers 0-{model.cfg.n_layers - 1}")
    if n_random < 1:
        raise ReplabError("--random must be at least 1")
    metric = check_metric(metric or task.meta.get("metric") or "logit_diff")
    pos_rule, pos = resolve_positions(task, direction, positions)
    alphas = [float(a) for a in alphas]
    if alpha_unit not in ("raw", "gap"):
        raise ReplabError(f"unknown alpha unit {alpha_unit!r} (raw or gap)")
    hook = Intervention(site, layer).hook
    with torch.inference_mode():
        acts = {k: model.run_with_cache(tok, names_filter=hook, stop_at_layer=layer + 1,
                                        return_type=None)[1][hook] for k, tok in
                (("clean", task.clean), ("corrupt", task.corrupt))}
    scale = V.projection_stats(acts, direction.vector, pos)
    unit = 1.0 if alpha_unit == "raw" else scale["gap"]
    plan = _plan(site, layer, pos, direction, n_random, n_random_ablate, n_random_steer, alphas, unit,
                 shuffled, seed)
    from replab.patching import sanity

    variants = [p[4] for p in plan] + sanity.variants_for(layer, "corrupt")
    t0 = time.time()
    with progress_bar(len(variants), "direction patch", "run", enabled=progress) as bar:
        finals, forwards = run_variants(model, task.clean, task.corrupt, variants, base="corrupt",
                                    max_tokens=max_tokens, progress=bar.advance)
    seconds = time.time() - t0
    vals = _metrics(model, task, metric, finals, forwards)
    clean, corrupt, patched = vals["clean"], vals["corrupt"], vals["patched"]
    c_mean, x_mean = float(clean.mean()), float(corrupt.mean())
    names = [p[0] for p in plan]
    if leace is not None:
        final = leace_final(model, task, leace, site, layer, pos)
        lv = task_metrics(model, task, metric, final[None], forwards)[0]["patched"][0]
        patched = np.concatenate([patched[:len(plan)], lv[None], patched[len(plan):]])
        plan.append(("leace", "leace", "ablate", None, None))
        names.append("leace")
    n_plan = len(plan)
    from replab.patching.bootstrap import describe_groups, resample_weights, task_groups

    groups = task_groups(task)
    weights = resample_weights(task.n_prompts, groups, n_boot, seed)
    table = _effects(plan, patched[:n_plan], clean, corrupt, metric, weights)
    checks = V.sanity_checks(table, patched[n_plan:], c_mean, x_mean, TOL)
    random_tbl = V.random_table(table)
    steering = V.steering_table(table, patched[:n_plan], c_mean, x_mean, weights)
    keep = [i for i, n in enumerate(names) if not n.startswith(("random_", "steer_random_", "ablate_random_"))]
    per_prompt = pd.DataFrame([{"name": names[i], "prompt_id": j,
                                "prompt": task.prompts[j] if task.prompts else None,
                                "metric_after": float(patched[i, j])} for i in keep for j in range(task.n_prompts)])
    steering["coef"] = steering["alpha"] * unit
    scale.update(alpha_unit=alpha_unit, unit=float(unit))
    summary = V.summarize(table, random_tbl, steering, direction, task, site, layer, pos, pos_rule, metric,
                          c_mean, x_mean, checks, scale, seconds, len(variants),
                          random_tol=V.RANDOM_MEAN_TOL if random_tol is None else random_tol,
                          bootstrap=describe_groups(groups, task.n_prompts), shuffled_source=shuffled_source)
    return DirectionPatchResult(table, random_tbl, steering, per_prompt, summary)


def resolve_positions(task: PatchTask, direction: DirectionInput, positions=None):
    """``(rule, positions)`` for a run: ``positions`` (a rule or a tuple) if given, else the
    direction's own rule, else ``last``. A rule the task does not know is an error (never a
    silent fallback): the direction was fitted at one position and means little elsewhere."""
    from replab.patching.task import task_positions

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


def _effects(plan, patched, clean, corrupt, metric, weights) -> pd.DataFrame:
    """One row per variant: normalised effect with CI, and ``of_full`` (see module docstring).
    ``weights [B, N]``: bootstrap weights (:func:`replab.patching.bootstrap.resample_weights`)."""
    from replab.patching.bootstrap import ratio_ci

    c_mean, x_mean = float(clean.mean()), float(corrupt.mean())
    effect = normalized(patched.mean(1), c_mean, x_mean)
    low, high = ratio_ci(weights, patched, clean, corrupt)
    names = [p[0] for p in plan]
    up = np.array([p[2] in ("denoise", "steer") for p in plan])
    ref_up, ref_down = patched[names.index("full")], patched[names.index("full_noise")]
    of_lo, of_hi = np.full(len(plan), np.nan), np.full(len(plan), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        for sel, ref, base in ((up, ref_up, corrupt), (~up, ref_down, clean)):
            if sel.any():
                of_lo[sel], of_hi[sel] = ratio_ci(weights, patched[sel], ref, base)
    rows = []
    for i, (name, group, mode, alpha, _) in enumerate(plan):
        base, ref = (x_mean, ref_up.mean()) if up[i] else (c_mean, ref_down.mean())
        rows.append({"name": name, "group": group, "mode": mode, "alpha": alpha, "metric": metric,
                     "metric_after": float(patched[i].mean()), "normalized_effect": float(effect[i]),
                     "ci_low": float(low[i]), "ci_high": float(high[i]),
                     "of_full": _ratio(patched[i].mean() - base, ref - base),
                     "of_full_low": float(of_lo[i]), "of_full_high": float(of_hi[i])})
    return pd.DataFrame(rows)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if abs(den) > 1e-12 else float("nan")

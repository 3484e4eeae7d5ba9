"""THE experiment loop: a list of variants in, a typed result with checks and CIs out.

Every analysis that patches is a list of :class:`~replab.patching.engine.Variant` (named,
grouped, labelled data) handed to :func:`run_plan`: sweeps, the layer scan, direction and
latent patching, circuit validation, path patching, pruning and exact edge patching. A new
analysis is a new list of variants plus a summary, never a new loop.

>>> res = run_plan(model, task, [Variant((Intervention("z", 5, head=3),), name="L5H3")])  # doctest: +SKIP
>>> res.table()[["name", "normalized_effect", "ci_low", "ci_high"]]                     # doctest: +SKIP

:func:`run_plan` does, in order:

1. append the engine checks (:mod:`replab.patching.checks`: full patch and empty patch at the
   plan's first layer) and run everything in **one** batched engine call
   (:func:`~replab.patching.engine.run_variants`; the clean and corrupt forwards are cached
   once and can be passed in and reused);
2. read the metric of every variant on every prompt, with every candidate's logit;
3. normalise: ``(patched − corrupt) / (clean − corrupt)`` on prompt means (0 = corrupt run,
   1 = clean run, in either patching direction);
4. bootstrap 95% CIs with one resample matrix for every row (people when the task says who
   each pair names, else prompts: :mod:`replab.patching.bootstrap`);
5. evaluate and enforce the checks (a failure raises ReplabError before any result exists).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from replab.errors import ReplabError
from replab.patching.bootstrap import describe_groups, ratio_ci, resample_weights, task_groups
from replab.patching.checks import ENGINE_TOL, Check, enforce, expected_effect, other_run
from replab.patching.edge_patch import has_edges
from replab.patching.engine import Variant, cache_forwards, needed_hooks, prefix_ok, run_variants
from replab.patching.executors import make_engine
from replab.patching.interventions import Intervention
from replab.patching.metrics import check_metric, normalized, task_metrics


@dataclass
class PlanResult:
    """What :func:`run_plan` measured. Arrays are float64 numpy; ``V`` variants, ``N`` prompts,
    ``C`` candidates.

    Attributes:
        variants: the plan's variants (engine-check variants excluded).
        clean, corrupt: per-prompt metric of the clean / corrupt run ``[N]``.
        patched: per-prompt metric of every variant ``[V, N]``.
        candidates: candidate logits ``[V, N, C]`` (column 0 the answer, 1 the foil).
        effect, ci_low, ci_high: normalised effect and its bootstrap CI ``[V]``.
        weights: the bootstrap resample weights ``[B, N]`` (for further ratio CIs).
        checks: ``{name: Check}`` (all passed).
        runs: the cached clean/corrupt forwards (pass them to another call to reuse them).
        finals: final-position residuals of every variant ``[V, N, d_model]`` (torch), from
            which :meth:`values` reads any other metric without another forward.
        recorded: ``{row: {hook name: [N, T, ...]}}`` for variants that record (``Variant.record``).
    """

    task: object
    metric: str
    base: str
    variants: list[Variant]
    clean: np.ndarray
    corrupt: np.ndarray
    patched: np.ndarray
    candidates: np.ndarray
    effect: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    weights: np.ndarray
    checks: dict[str, Check]
    forwards: dict
    seconds: float
    bootstrap: str
    n_engine_variants: int = 0
    task_model: object = field(default=None, repr=False)
    finals: object = None
    recorded: dict = field(default_factory=dict, repr=False)
    _index: dict = field(default_factory=dict, repr=False)

    @property
    def clean_metric(self) -> float:
        return float(self.clean.mean())

    @property
    def corrupt_metric(self) -> float:
        return float(self.corrupt.mean())

    @property
    def base_metric(self) -> float:
        return float((self.clean if self.base == "clean" else self.corrupt).mean())

    def index(self, name: str) -> int:
        """Row of the variant called ``name`` (KeyError if none)."""
        if not self._index:
            self._index.update({v.name: i for i, v in enumerate(self.variants) if v.name})
        return self._index[name]

    def rows(self, group: str | None = None, **info) -> list[int]:
        """Rows whose ``group`` and ``info`` entries equal the given ones."""
        return [i for i, v in enumerate(self.variants)
                if (group is None or v.group == group) and all(v.info.get(k) == x for k, x in info.items())]

    def ratio_ci(self, rows, reference) -> tuple[np.ndarray, np.ndarray]:
        """CI of ``(patched[row] − corrupt) / (reference − corrupt)`` per row, where ``reference``
        is a row index (e.g. the full patch: "fraction of the full effect") or per-prompt values."""
        ref = self.patched[reference] if np.ndim(reference) == 0 else np.asarray(reference)
        with np.errstate(divide="ignore", invalid="ignore"):
            return ratio_ci(self.weights, self.patched[list(rows)], ref, self.corrupt)

    def of(self, row: int, reference: int) -> float:
        """``effect[row] / effect[reference]`` (NaN when the reference is about 0)."""
        ref = float(self.effect[reference])
        return float(self.effect[row] / ref) if abs(ref) > 1e-9 else float("nan")

    def table(self) -> pd.DataFrame:
        """One row per variant: ``name, group, <info keys>, metric, metric_after,
        normalized_effect, ci_low, ci_high, answer_logit, foil_logit, max_other_logit,
        candidate_logits`` (prompt means)."""
        cand = self.candidates
        means = cand.mean(1).tolist() if len(cand) else []
        rows = []
        for i, v in enumerate(self.variants):
            rows.append({"name": v.name, "group": v.group, **v.info, "metric": self.metric,
                         "metric_before": self.base_metric, "metric_after": float(self.patched[i].mean()),
                         "normalized_effect": float(self.effect[i]), "ci_low": float(self.ci_low[i]),
                         "ci_high": float(self.ci_high[i]), "answer_logit": float(cand[i, :, 0].mean()),
                         "foil_logit": float(cand[i, :, 1].mean()),
                         "max_other_logit": float(cand[i, :, 1:].max(-1).mean()),
                         "candidate_logits": means[i]})
        return pd.DataFrame(rows)

    def per_prompt(self, rows=None) -> pd.DataFrame:
        """One row per (variant, prompt): ``name, <info keys>, prompt_id, metric_after,
        candidate_ids, candidate_logits``."""
        rows = range(len(self.variants)) if rows is None else rows
        ids = self.task.candidates.tolist()
        out = []
        for i in rows:
            v = self.variants[i]
            for j in range(self.patched.shape[1]):
                out.append({"name": v.name, **v.info, "prompt_id": j, "metric_after": float(self.patched[i, j]),
                            "candidate_ids": ids[j], "candidate_logits": self.candidates[i, j].tolist()})
        return pd.DataFrame(out)

    def values(self, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(clean [N], corrupt [N], patched [V, N])`` per-prompt values of another ``metric``
        (e.g. ``kl`` next to ``logit_diff``), read from the same forwards (no new forward)."""
        check_metric(metric)
        if metric == self.metric:
            return self.clean, self.corrupt, self.patched
        vals, _ = task_metrics(self.task_model, self.task, metric, self.finals, self.forwards)
        return vals["clean"], vals["corrupt"], vals["patched"]

    def checks_dict(self) -> dict[str, dict]:
        return {k: c.to_dict() for k, c in self.checks.items()}

    def describe(self) -> dict:
        """The JSON-safe facts every summary repeats."""
        return {"metric": self.metric, "base": self.base, "clean_metric": self.clean_metric,
                "corrupt_metric": self.corrupt_metric, "base_metric": self.base_metric,
                "checks": self.checks_dict(), "bootstrap": self.bootstrap,
                "n_variants": len(self.variants) + self.n_engine_variants, "seconds": round(self.seconds, 3)}


def engine_variants(layer: int, base: str) -> list[Variant]:
    """The engine checks' variants at ``layer``: the full residual patch from the other run and
    the empty patch (see :mod:`replab.patching.checks`)."""
    return [Variant((Intervention("resid_pre", layer, source=other_run(base)),), name="engine_full"),
            Variant((), start=layer, name="engine_empty")]


def identity_variant(site: str, layer: int, base: str) -> Variant:
    """``site`` (head 0 for head sites) patched from the other run into that same run; run it
    with ``base=other_run(base)``: it must change nothing."""
    from replab.hooks import site_kind

    head = 0 if site_kind(site) != "vector" else None
    return Variant((Intervention(site, layer, head=head, source=other_run(base)),), name="engine_identity")


def plan_layer(variants: list[Variant], n_layers: int) -> int:
    """The first layer any variant enters at (where the engine checks run)."""
    starts = [v.start_layer(n_layers) for v in variants]
    starts = [s for s in starts if s < n_layers]
    return min(starts) if starts else 0


def plan_forwards(model, task, variants: list[Variant], base: str = "corrupt", hooks=(),
                identity: tuple[str, int] | None = None) -> dict:
    """The clean and corrupt forwards (one each) caching what ``variants`` (plus the engine
    checks, the identity check and the extra ``hooks``, cached in both runs) need. Pass the
    result to :func:`run_plan` (``runs=``) to share the forwards with other work."""
    use_prefix = prefix_ok(model) and not has_edges(variants)
    layer = plan_layer(variants, model.cfg.n_layers)
    need = needed_hooks(model, [*variants, *engine_variants(layer, base)], base, use_prefix)
    if identity is not None:
        for run, names in needed_hooks(model, [identity_variant(*identity, base)], other_run(base),
                                       use_prefix).items():
            need[run] |= names
    for names in need.values():
        names.update(hooks)
    with torch.inference_mode():
        return cache_forwards(model, task.clean, task.corrupt, need, split_inputs=has_edges(variants))


def run_plan(model, task, variants, metric: str = "logit_diff", *, base: str = "corrupt",
             checks: bool = True, identity: tuple[str, int] | None = None, extra_checks=(),
             sources: dict | None = None, forwards: dict | None = None, n_boot: int = 1000,
             seed: int = 0, max_tokens: int = 65536, progress: bool = False,
             label: str = "patch", unit: str = "run", engine="local") -> PlanResult:
    """Run ``variants`` on ``task`` and measure ``metric``; see the module docstring.

    Args:
        model: a HookedTransformer (from :func:`replab.models.load_model`).
        task: a :class:`~replab.patching.task.PatchTask`.
        variants: :class:`~replab.patching.engine.Variant` s; their ``name``/``group``/``info``
            label the result rows (names should be unique where the caller looks them up).
        metric: any metric of :mod:`replab.patching.metrics`.
        base: ``"corrupt"`` (denoising, patch clean values in) or ``"clean"`` (noising).
        checks: run the engine checks (full, empty) in the same batch and enforce them.
        identity: ``(site, layer)``: also check that patching ``site`` from a run into itself
            changes nothing (one more small batch on the other run).
        extra_checks: a callable ``(PlanResult) -> list[Check]`` or a list of them, evaluated
            and enforced with the engine checks.
        sources: values of ``custom:NAME`` interventions (see the engine).
        forwards: cached forwards from :func:`plan_forwards` or an earlier result's ``forwards``.
        engine: where the variants' forwards run: ``"local"`` (this process), ``"ray"`` (Ray
            actors, one model each: :mod:`replab.patching.executors`) or an engine object from
            :func:`~replab.patching.executors.make_engine`. Everything else (forwards on the
            driver, metrics, CIs, checks) is the same, and so are the results. A name makes an
            engine for this plan only; pass an engine object to keep its workers across plans.
    Returns:
        :class:`PlanResult`.
    """
    from replab._progress import progress_bar

    runner = make_engine(engine)
    metric = check_metric(metric)
    if base not in ("clean", "corrupt"):
        raise ReplabError(f"base must be 'clean' or 'corrupt', not {base!r}")
    variants = list(variants)
    layer = plan_layer(variants, model.cfg.n_layers)
    extra = engine_variants(layer, base) if checks else []
    if forwards is None and identity is not None:
        forwards = plan_forwards(model, task, variants, base, identity=identity)
    t0 = time.time()
    recorded: dict = {}
    try:
        with progress_bar(len(variants) + len(extra), label, unit, enabled=progress) as bar:
            finals, forwards = runner.run_variants(model, task.clean, task.corrupt, variants + extra, base=base,
                                                   forwards=forwards, max_tokens=max_tokens, progress=bar.advance,
                                                   sources=sources, recorded=recorded)
    finally:
        if runner is not engine:         # made here from a name: its workers stop with the plan
            runner.close()
    seconds = time.time() - t0
    values, cand = task_metrics(model, task, metric, finals, forwards)
    clean, corrupt, patched = values["clean"], values["corrupt"], values["patched"]
    n = len(variants)
    effect_all = normalized(patched.mean(1), float(clean.mean()), float(corrupt.mean()))
    groups = task_groups(task)
    weights = resample_weights(task.n_prompts, groups, n_boot, seed)
    low, high = ratio_ci(weights, patched[:n], clean, corrupt) if n else (np.zeros(0), np.zeros(0))
    found: list[Check] = []
    if checks:
        what = {"engine_full": f"resid_pre L{layer} patched at every position from the {other_run(base)} run "
                               f"reproduces that run",
                "engine_empty": f"no intervention, entering at L{layer} from the cached {base} run, reproduces it"}
        for j, v in enumerate(extra):
            want = expected_effect(other_run(base) if v.name == "engine_full" else base)
            found.append(Check(v.name, float(effect_all[n + j]), want, ENGINE_TOL, what[v.name]))
        if identity is not None:
            found.append(_identity_check(model, task, metric, base, identity, forwards, clean, corrupt))
    result = PlanResult(task, metric, base, variants, clean, corrupt, patched[:n], cand[:n], effect_all[:n],
                        np.asarray(low), np.asarray(high), weights, {}, forwards, seconds,
                        describe_groups(groups, task.n_prompts), len(extra), model, finals[:n], recorded)
    callables = extra_checks if isinstance(extra_checks, (list, tuple)) else [extra_checks]
    for item in callables:
        found.extend(item(result) if callable(item) else [item])
    enforce(found)
    result.checks = {c.name: c for c in found}
    return result


def _identity_check(model, task, metric, base, identity, forwards, clean, corrupt) -> Check:
    site, layer = identity
    other = other_run(base)
    v = identity_variant(site, layer, base)
    have = all(name in forwards[run].acts for run, names in
               needed_hooks(model, [v], other, prefix_ok(model)).items() for name in names)
    finals, forwards2 = run_variants(model, task.clean, task.corrupt, [v], base=other,
                                 forwards={k: forwards[k] for k in ("clean", "corrupt")} if have else None)
    vals, _ = task_metrics(model, task, metric, finals, forwards2)
    value = float(normalized(vals["patched"][0].mean(), float(clean.mean()), float(corrupt.mean())))
    return Check("engine_identity", value, expected_effect(other), ENGINE_TOL,
                 f"{site} L{layer} patched from the {other} run into itself changes nothing")

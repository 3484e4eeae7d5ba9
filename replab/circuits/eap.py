"""Edge attribution: first-order estimates of every edge's patching effect in a few passes.

For an edge ``u -> v`` (:mod:`replab.circuits.graph`) the exact effect is the change of the
prompt-averaged metric ``M`` when only that edge carries the corrupt value, everything else
clean: ``v``'s input becomes ``x_v + Δ_u`` with ``Δ_u = corrupt_u − clean_u`` (the sender's
output difference, ``[N, T, d_model]``). Estimates, all normalised by ``M_clean − M_corrupt``
(so they are comparable with ``exact = (M_patched − M_clean) / (M_clean − M_corrupt)``, the
engine's normalised effect minus 1):

* ``eap`` (edge attribution patching, Syed et al. 2023; = AtP on edges):
  ``Δ_u · ∂M/∂x_v`` at the clean run. One corrupt forward, one clean forward, one backward,
  for every edge at once (the senders of a receiver are a prefix of the sender list, so a whole
  layer of receivers is one matrix product).
* ``eap-ig`` (Hanna et al. 2024): ``Δ_u · ∫_0^1 ∂M/∂x_v dα`` with the input embedding moved to
  ``corrupt + α(clean − corrupt)`` (the clean tokens otherwise), integrated with ``m`` gradient
  passes. ``rule="gauss-legendre"`` (default; ``m`` Gauss–Legendre nodes on [0, 1], Captum's
  default for integrated gradients) and ``rule="midpoint"`` (``α = (k − ½)/m``) integrate the
  path more accurately for the same ``m`` than ``rule="riemann"``, the paper's right Riemann sum
  ``(1/m) Σ_{k=1..m}`` at ``α = k/m`` (so ``m = 1`` is exactly EAP; the reference
  implementation, hannamw/EAP-IG, sums ``k = 0..m−1``: the corrupt end instead of the clean
  one). They cost one more forward (the clean run's sender outputs, which the Riemann sum gets
  from its ``α = 1`` pass). How the rules compare against exact edge patching on SmolLM2:
  docs/edges.md (with the commands that measure it).
* ``atp*`` (Kramár et al. 2024), reported next to plain AtP (= ``eap``):
  - **QK fix**: for edges into a query or key input the attention pattern is recomputed exactly
    (norm, projection, rotary, scores, softmax with ``x_v + Δ_u``) and only the rest is
    linearised: ``Σ (pattern' − pattern) · ∂M/∂pattern``; value, MLP and logit edges keep the
    linear estimate. Every run first checks that the recomputation reproduces the model's own
    pattern at ``Δ = 0`` (tolerance 1e-4).
  - **GradDrop**: for each layer ℓ one more backward pass with the gradient through layer ℓ's
    attention and MLP outputs zeroed; ``graddrop = Σ_ℓ |estimate with ℓ dropped| / (L − 1)``, a
    magnitude that exposes effects which cancel between paths (compare it with ``|exact|``).

Gradients are taken in :func:`~replab.patching.edge_patch.edge_mode` (each head has its own
q/k/v input hook), on batches of prompts whose contributions add up. Positions before the first
one where any clean/corrupt pair differs are identical in every run (causal attention), so every
``Δ_u`` is zero there: EAP and EAP-IG compute that prefix once, keep its keys and values in a
frozen TransformerLens cache, and run the corrupt forward and every gradient pass on the
remaining positions only (no gradient is needed at the prefix: it would multiply a zero ``Δ``).
The scores are the same as with whole sequences (``tests/test_edges.py`` compares both).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from replab.circuits.eap_passes import (
    clean_log_probs,
    delta_rows,
    grad_pass,
    linear_scores,
    prefix_cache,
    prompt_batches,
    run_metric,
    sender_stack,
)
from replab.circuits.graph import EdgeGraph, edge_graph
from replab.circuits.qk_fix import QK_TOL, qk_edge_mask, qk_fixed_estimates
from replab.errors import ReplabError
from replab.patching.metrics import check_metric

GRAD_METHODS = ("eap", "eap-ig", "atp*")
IG_RULES = ("riemann", "midpoint", "gauss-legendre")


def ig_nodes(steps: int, rule: str = "gauss-legendre") -> tuple[np.ndarray, np.ndarray]:
    """Points ``α`` in [0, 1] and weights (summing to 1) of an ``steps``-point rule for
    ``∫_0^1 f(α) dα`` (:data:`IG_RULES`)."""
    if rule == "riemann":
        return np.arange(1, steps + 1) / steps, np.full(steps, 1.0 / steps)
    if rule == "midpoint":
        return (np.arange(1, steps + 1) - 0.5) / steps, np.full(steps, 1.0 / steps)
    if rule == "gauss-legendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return (x + 1) / 2, w / 2
    raise ReplabError(f"unknown integration rule {rule!r} (known: {', '.join(IG_RULES)})")


@dataclass
class EdgeAttribution:
    """Attribution scores of every edge of ``graph`` (arrays ``[n_edges]``, edge order).

    ``scores`` is the method's signed estimate (normalised); ``extra`` holds the side-by-side
    columns (``atp`` and ``atp_star`` and, with GradDrop, ``graddrop`` for ``atp*``);
    ``passes`` counts forwards and backwards (``shared_prefix``: the first positions, equal in
    every clean/corrupt pair, were computed once and every pass ran on the rest).
    """

    graph: EdgeGraph
    method: str
    metric: str
    scores: np.ndarray
    clean_metric: float
    corrupt_metric: float
    passes: dict
    seconds: float
    steps: int | None = None
    extra: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    rule: str | None = None

    def describe(self) -> dict:
        return {"method": self.method, "metric": self.metric, "steps": self.steps, "rule": self.rule,
                "clean_metric": self.clean_metric, "corrupt_metric": self.corrupt_metric,
                "passes": self.passes, "seconds": round(self.seconds, 3), "checks": self.checks}


def attribute_edges(model, task, method: str = "eap", *, steps: int = 5, metric: str = "logit_diff",
                    rule: str = "gauss-legendre", graddrop: bool = True, batch_size: int | None = None,
                    share_prefix: bool = True, progress: bool = False) -> EdgeAttribution:
    """Attribution scores of every edge (module docstring) on ``task`` (a PatchTask).

    Args:
        method: ``eap``, ``eap-ig`` or ``atp*``.
        steps: integration steps (gradient passes) of ``eap-ig`` (``steps=1`` with the Riemann
            rule is EAP).
        rule: ``eap-ig``'s integration rule: ``gauss-legendre`` (default), ``midpoint`` or
            ``riemann`` (the paper's) (module docstring).
        metric: a metric of :mod:`replab.patching.metrics` (``kl`` only with ``eap-ig``: its
            gradient at the clean run is 0).
        graddrop: for ``atp*``, also the GradDrop magnitudes (one more backward per layer).
        batch_size: prompts per pass (default: about 512 tokens; contributions add up).
        share_prefix: compute the positions before the first clean/corrupt difference once
            (``eap``, ``eap-ig``; module docstring); False runs whole sequences (same scores).
    Returns:
        :class:`EdgeAttribution` (scores normalised by ``M_clean − M_corrupt``).
    """
    from replab._progress import progress_bar

    method = {"atp-star": "atp*", "atpstar": "atp*", "eapig": "eap-ig"}.get(method, method)
    if method not in GRAD_METHODS:
        raise ReplabError(f"unknown attribution method {method!r} (known: {', '.join(GRAD_METHODS)})")
    metric = check_metric(metric)
    if metric == "kl" and method != "eap-ig":
        raise ReplabError("the kl metric has zero gradient at the clean run; use it with --method eap-ig, or "
                          "use logit_diff, margin, logprob or prob")
    if steps < 1:
        raise ReplabError(f"--steps must be at least 1, not {steps}")
    alphas, weights = ig_nodes(steps, rule)
    graph = edge_graph(model)
    t0 = time.time()
    n, t = task.clean.shape
    drops = list(range(model.cfg.n_layers)) if (method == "atp*" and graddrop) else []
    n_grad = {"eap": 1, "eap-ig": steps, "atp*": 1 + len(drops)}[method]
    n_fwd = 1 + n_grad + (method == "eap-ig" and rule != "riemann")      # + the clean run's senders
    lin = np.zeros((1 if method != "atp*" else 1 + len(drops), graph.n_edges))
    qk = np.zeros_like(lin) if method == "atp*" else None
    clean_sum = corrupt_sum = 0.0
    worst = 0.0
    batches = prompt_batches(n, t, batch_size)
    differ = (task.clean != task.corrupt).any(0).nonzero()
    start = int(differ[0]) if len(differ) else t          # first position where any pair differs
    keep = t - start if start < t else t                 # the positions where some Δ_u can be non-zero
    # EAP and EAP-IG: the first clean pass runs whole sequences and records the keys and values of
    # the shared prefix; the corrupt run and later passes compute the rest (AtP* reads patterns)
    cut = start if (share_prefix and method != "atp*" and 0 < start < t) else 0
    with progress_bar(len(batches) * n_fwd, f"{method} attribution", "pass", enabled=progress) as bar:
        for rows in batches:
            clean, corrupt = task.clean[rows], task.corrupt[rows]
            logp = clean_log_probs(model, clean) if metric == "kl" else None
            if method == "atp*":
                value, corrupt_acts = run_metric(model, corrupt, task, rows, metric, logp)
                corrupt_sum += value
                res = grad_pass(model, clean, task, rows, metric, n, logp, senders=True, patterns=True)
                bar.advance(2)
                clean_sum += res["value"]
                with torch.no_grad():      # [N, T, S, d] for the QK fix; its last positions as rows
                    delta = sender_stack(model, corrupt_acts) - sender_stack(model, res["senders"])
                    flat = delta[:, -keep:].permute(2, 0, 1, 3).reshape(delta.shape[2], -1)
                lin[0] += linear_scores(graph, flat, res["grads"], keep)
                pattern_passes = [res]
                for j, layer in enumerate(drops):
                    p = grad_pass(model, clean, task, rows, metric, n, logp, drop=layer, patterns=True)
                    lin[1 + j] += linear_scores(graph, flat, p["grads"], keep)
                    pattern_passes.append({"grads": {k: v for k, v in p["grads"].items() if k[0] == "pattern"}})
                    bar.advance(1)
                est, err = qk_fixed_estimates(model, graph, delta, pattern_passes)
                qk += est
                worst = max(worst, err)
                continue
            # EAP is EAP-IG's one-point rule (α = 1): the clean run
            points = list(zip(alphas, weights, strict=True)) if method == "eap-ig" else [(1.0, 1.0)]
            if method == "eap-ig":
                with torch.inference_mode():                          # blocks.0.hook_resid_pre
                    e_clean, e_corrupt = model(clean, stop_at_layer=0), model(corrupt, stop_at_layer=0)
            cache, clean_acts, summed = None, None, None
            for k, (alpha, weight) in enumerate(points):
                x_in = None if alpha == 1 else e_corrupt + float(alpha) * (e_clean - e_corrupt)
                off = cut if cache is not None else 0
                res = grad_pass(model, clean[:, off:], task, rows, metric, n, logp,
                                 input_value=None if x_in is None else x_in[:, off:], senders=alpha == 1,
                                 cache=cache, record_kv=k == 0 and cut > 0)
                part = {q: float(weight) * g[:, -keep:] for q, g in res["grads"].items()}
                summed = part if summed is None else {q: summed[q] + g for q, g in part.items()}
                if alpha == 1:
                    clean_sum += res["value"]
                    clean_acts = res["senders"]
                if k == 0 and cut > 0:
                    cache = prefix_cache(model, res["kv"], cut)
                bar.advance(1)
            off = cut if cache is not None else 0
            value, corrupt_acts = run_metric(model, corrupt[:, off:], task, rows, metric, logp, cache)
            corrupt_sum += value
            bar.advance(1)
            if clean_acts is None:               # no pass at α = 1: the clean run's senders separately
                value, clean_acts = run_metric(model, clean[:, off:], task, rows, metric, logp, cache)
                clean_sum += value
                bar.advance(1)
            lin[0] += linear_scores(graph, delta_rows(model, corrupt_acts, clean_acts, keep), summed, keep)
    passes = {"forwards": n_fwd, "backwards": n_grad, **({"shared_prefix": cut} if cut else {})}
    return _finish(model, task, graph, method, metric, steps, lin, qk, clean_sum / n, corrupt_sum / n,
                   passes, worst, time.time() - t0, rule)


def _finish(model, task, graph, method, metric, steps, lin, qk, clean_m, corrupt_m, passes, worst, seconds,
            rule):
    from replab.patching.metrics import normalized

    denom = clean_m - corrupt_m
    normalized(0.0, clean_m, corrupt_m)        # raises when the task does not separate the runs
    scores = lin[0] / denom
    extra, checks = {}, {}
    if method == "atp*":
        if worst > QK_TOL:
            raise ReplabError(f"the QK fix's recomputed attention pattern differs from the model's by {worst:.2e} "
                              f"(> {QK_TOL:g}); AtP* cannot be trusted on this model")
        checks["qk_recompute"] = {"value": worst, "expected": 0.0, "tolerance": QK_TOL, "ok": True,
                                  "what": "attention pattern recomputed by the QK fix at Δ = 0 equals hook_pattern"}
        mask = qk_edge_mask(graph)
        star = np.where(mask[None], qk, lin) / denom                   # [1 + drops, n_edges]
        extra["atp"] = lin[0] / denom
        extra["atp_star"] = star[0]
        scores = star[0]
        if star.shape[0] > 1:
            extra["graddrop"] = np.abs(star[1:]).sum(0) / max(1, graph.n_layers - 1)
    return EdgeAttribution(graph, method, metric, scores, clean_m, corrupt_m, passes, seconds,
                           steps if method == "eap-ig" else None, extra, checks,
                           rule if method == "eap-ig" else None)

"""Patching metrics, computed per prompt from final-position logits.

All metrics read the logits at the last position of each prompt:

* ``logit_diff``: logit(answer) − logit(foil);
* ``margin``: logit(answer) − max logit over the other candidates (the listed foils);
* ``logprob`` / ``prob``: log-probability / probability of the answer (full vocabulary);
* ``kl``: KL(clean ‖ patched) over the full vocabulary (0 on the clean run);
* ``class_mass``: log Σ_{w∈A} p(w) − log Σ_{w∈B} p(w), the log-probability mass on class
  A's words minus class B's, = logsumexp(candidate logits of A) − logsumexp(of B) (the
  full-vocabulary normaliser cancels). Which candidate columns are class A is the task's
  ``PatchTask.class_a`` mask (the super-class task of :mod:`replab.patching.superclass`).

A metric is computed from a :class:`Readout` (candidate logits, plus the log-softmax
statistics that the full-vocabulary metrics need). ``normalized_effect`` is the ratio of
prompt means, (patched − corrupt) / (clean − corrupt), as in TransformerLens's tutorials:
0 = the corrupt run, 1 = the clean run, in either patching direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from replab.errors import ReplabError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

METRICS = ("logit_diff", "margin", "logprob", "prob", "kl")
TASK_METRICS = ("class_mass",)   # need task data beyond answer/foil (PatchTask.class_a)
ALL_METRICS = METRICS + TASK_METRICS
FULL_VOCAB = {"logprob", "prob", "kl"}


@dataclass
class Readout:
    """What the metrics need from one batch of final-position logits.

    ``cand``: candidate logits ``[R, C]`` (column 0 = answer, 1 = foil); ``lse``: log-sum-exp
    over the vocabulary ``[R]`` (or None); ``logp``: full log-probabilities ``[R, V]`` kept only
    for ``kl`` (or None).
    """

    cand: torch.Tensor
    lse: torch.Tensor | None = None
    logp: torch.Tensor | None = None


def check_metric(metric: str) -> str:
    if metric not in ALL_METRICS:
        raise ReplabError(f"unknown metric {metric!r} (known: {', '.join(ALL_METRICS)})")
    return metric


def final_logits(model: HookedTransformer, resid_final: torch.Tensor,
                 cols: torch.Tensor | None = None) -> torch.Tensor:
    """Logits from the final residual ``[R, d]``: the model's own final norm, then ``W_U``,
    then its output soft cap if it has one (Gemma-2), as the model's forward does. The
    unembedding is computed in float32 whatever the model's dtype (bfloat16 / float16 models).

    ``cols`` ``[R, C]`` picks per-row vocabulary columns (cheap); None gives all ``[R, V]``.
    """
    x = model.ln_final(resid_final[:, None, :])[:, 0].float()   # float32 logits in any dtype
    if cols is None:
        logits = x @ model.W_U.float() + model.b_U.float()
    else:
        w = model.W_U[:, cols].float()              # [d, R, C]
        logits = torch.einsum("rd,drc->rc", x, w) + model.b_U[cols].float()
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def readout(model: HookedTransformer, resid_final: torch.Tensor, candidates: torch.Tensor, need_full: bool,
            need_logp: bool = False, chunk: int = 256) -> Readout:
    """A :class:`Readout` for final residuals ``[R, d]`` and per-row candidates ``[R, C]``."""
    cand = final_logits(model, resid_final, candidates)
    if not need_full:
        return Readout(cand)
    lses, logps = [], []
    for s in range(0, resid_final.shape[0], chunk):
        full = final_logits(model, resid_final[s:s + chunk])
        lse = torch.logsumexp(full, dim=-1)
        lses.append(lse)
        if need_logp:
            logps.append(full - lse[:, None])
    return Readout(cand, torch.cat(lses), torch.cat(logps) if need_logp else None)


def metric_values(metric: str, r: Readout, clean_logp: torch.Tensor | None = None,
                  class_a=None) -> torch.Tensor:
    """Per-row metric ``[R]``. ``clean_logp`` ``[R, V]`` (clean log-probs per row) for ``kl``;
    ``class_a`` ``[C]`` bools (candidate column in class A, else B) for ``class_mass``."""
    cand = r.cand
    if metric == "class_mass":
        return class_mass(cand, class_a)
    if metric == "logit_diff":
        return cand[:, 0] - cand[:, 1]
    if metric == "margin":
        return cand[:, 0] - cand[:, 1:].max(dim=1).values
    if metric in ("logprob", "prob"):
        lp = cand[:, 0] - r.lse
        return lp if metric == "logprob" else lp.exp()
    if metric == "kl":
        if clean_logp is None or r.logp is None:
            raise ReplabError("kl needs the clean run's log-probabilities")
        return (clean_logp.exp() * (clean_logp - r.logp)).sum(-1)
    raise ReplabError(f"unknown metric {metric!r}")


def class_mass(cand: torch.Tensor, class_a) -> torch.Tensor:
    """logsumexp(cand[:, A]) − logsumexp(cand[:, B]) ``[R]`` for candidate logits ``[R, C]``."""
    if class_a is None:
        raise ReplabError("metric class_mass needs the task's class columns (PatchTask.class_a: "
                          "the superclass task has them), passed as class_a=")
    mask = torch.as_tensor(np.asarray(class_a, dtype=bool))
    if mask.shape[0] != cand.shape[1] or bool(mask.all()) or not bool(mask.any()):
        raise ReplabError(f"class_mass: class_a marks {mask.shape[0]} columns; the candidates have "
                          f"{cand.shape[1]}, and both classes need at least one")
    return torch.logsumexp(cand[:, mask], dim=1) - torch.logsumexp(cand[:, ~mask], dim=1)


def normalized(patched, clean: float, corrupt: float):
    """(patched − corrupt) / (clean − corrupt) on prompt means; raises if clean == corrupt."""
    denom = clean - corrupt
    if abs(denom) < 1e-8:
        raise ReplabError(f"the clean and corrupt runs give the same metric ({clean:.4g}): "
                          "the task does not separate them, so recovery is undefined")
    return (np.asarray(patched) - corrupt) / denom


def bootstrap_ci(patched: np.ndarray, clean: np.ndarray, corrupt: np.ndarray, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap CI of the normalised effect (ratio of prompt means).

    ``patched`` ``[cells, n]``, ``clean``/``corrupt`` ``[n]`` per-prompt metrics; the same
    resamples are used for every cell. ``groups``: None resamples prompts; the people each
    pair names (:func:`replab.patching.bootstrap.task_groups`) resample people instead
    (:mod:`replab.patching.bootstrap`). Returns ``(low, high)`` ``[cells]``.
    """
    from replab.patching.bootstrap import ratio_ci, resample_weights

    patched = np.atleast_2d(np.asarray(patched, dtype=np.float64))
    weights = resample_weights(patched.shape[1], groups, n_boot=n_boot, seed=seed)
    return ratio_ci(weights, patched, clean, corrupt, level=level)


def task_metrics(model: HookedTransformer, task, metric: str, finals: torch.Tensor, forwards: dict):
    """Per-prompt metrics of the clean and corrupt runs and of every patched variant.

    ``finals`` ``[V, N, d]`` from :func:`replab.patching.engine.run_variants` (with its
    ``forwards``). Returns ``({"clean": [N], "corrupt": [N], "patched": [V, N]}, cand [V, N, C])``
    as float64 numpy arrays (``cand``: candidate logits of each variant).
    """
    n_var, n, d = finals.shape
    need_full, need_logp = metric in FULL_VOCAB, metric == "kl"
    cls = getattr(task, "class_a", None)
    with torch.inference_mode():
        base = {k: readout(model, forwards[k].final, task.candidates, need_full, need_logp)
                for k in ("clean", "corrupt")}
        clean_logp = base["clean"].logp
        out = {k: metric_values(metric, r, clean_logp, cls).cpu().numpy().astype(np.float64)
               for k, r in base.items()}
        if n_var:
            r = readout(model, finals.reshape(n_var * n, d), task.candidates.repeat(n_var, 1),
                        need_full, need_logp)
            rep = clean_logp.repeat(n_var, 1) if clean_logp is not None else None
            out["patched"] = metric_values(metric, r, rep, cls).cpu().numpy().astype(np.float64).reshape(n_var, n)
            cand = r.cand.cpu().numpy().reshape(n_var, n, -1)
        else:
            out["patched"], cand = np.zeros((0, n)), np.zeros((0, n, task.candidates.shape[1]))
    return out, cand

"""Ablations: what a removed component's activation becomes (``--ablation``).

======================  =================================================================
``zero``                zeros
``mean``                the mean over the task's clean prompts, per position
``resample``            the same activation on another clean prompt of the task (a fixed,
                        seeded derangement of the prompts)
``mean-other``          the mean, per position, over another prompt set (``--mean-over
                        NAME|FILE``): W4's "mean over other corruption types"
``corrupt``             the activation of the paired corrupt prompt
======================  =================================================================

Ablations act on the clean run (validation, hydra, pruning); ``mean`` and ``resample`` are
the engine's own sources applied to that run. ``mean-other`` is a ``custom:`` source with one
tensor per ablated hook, computed here from one forward over the other set's prompts.

``--mean-over`` takes any task or prompt set ``load_task`` accepts (a builtin name such as
``sequences:months/random``, a prompt set, a user JSONL/CSV/YAML file); its **clean** prompts are
averaged, or its corrupt prompts with a ``#corrupt`` suffix (``sequences/random#corrupt``: the
random corruption of the sequence task). Only prompts with the task's token length are used
(per-position means need aligned positions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from replab.errors import ReplabError

ABLATIONS = ("zero", "mean", "resample", "mean-other", "corrupt")
_SOURCE = {"zero": "zero", "mean": "mean", "resample": "resample", "corrupt": "corrupt",
           "mean-other": "custom:mean_other"}


@dataclass(frozen=True)
class Ablation:
    """An ablation spec: ``kind`` (:data:`ABLATIONS`), ``mean_over`` (for ``mean-other``), ``seed``."""

    kind: str = "mean"
    mean_over: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        kind = str(self.kind).strip().lower().replace("_", "-")
        if kind not in ABLATIONS:
            raise ReplabError(f"unknown ablation {self.kind!r} (known: {', '.join(ABLATIONS)})")
        object.__setattr__(self, "kind", kind)
        if kind == "mean-other" and not self.mean_over:
            raise ReplabError("--ablation mean-other needs --mean-over NAME|FILE (the prompts to average over)")

    @property
    def source(self) -> str:
        """The intervention source."""
        return _SOURCE[self.kind]

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.kind == "mean-other":
            return f"mean over {self.mean_over}"
        return self.kind

    def sources(self, model, task, hooks) -> dict:
        """The ``sources=`` argument of :func:`~replab.patching.plan.run_plan` for ``hooks``
        (empty unless ``mean-other``)."""
        if self.kind != "mean-other":
            return {}
        return {"mean_other": mean_over_prompts(model, other_tokens(model, self.mean_over, task.n_tokens),
                                                sorted(set(hooks)), task.n_prompts)}


def other_tokens(model, spec: str, n_tokens: int) -> torch.Tensor:
    """Token ids ``[M, n_tokens]`` of the prompts ``spec`` names (module docstring)."""
    from replab.patching.catalog import load_task
    from replab.prompts import load_prompts, token_ids

    name, _, which = str(spec).partition("#")
    which = which.strip() or "clean"
    if which not in ("clean", "corrupt"):
        raise ReplabError(f"--mean-over {spec!r}: the suffix must be #clean or #corrupt")
    tok = model.tokenizer
    bos = bool(model.cfg.default_prepend_bos)
    try:
        t = load_task(name, tok, prepend_bos=bos)
        seqs = (t.clean if which == "clean" else t.corrupt).tolist()
    except ReplabError:
        if which == "corrupt":
            raise
        rows = load_prompts(name, tok, prepend_bos=bos).rows
        seqs = [token_ids(tok, p, bos) for p in rows["prompt"] if isinstance(p, str) and p]
    keep = [s for s in seqs if len(s) == n_tokens]
    if not keep:
        have = sorted({len(s) for s in seqs})
        raise ReplabError(f"--mean-over {spec}: no prompt has the task's {n_tokens} tokens (lengths {have}); "
                          "per-position means need aligned prompts")
    return torch.tensor(keep)


def mean_over_prompts(model, tokens: torch.Tensor, hooks: list[str], n: int) -> dict[str, torch.Tensor]:
    """``{hook: [n, T, ...]}``: the mean over ``tokens``' prompts at each hook (one forward),
    repeated for the task's ``n`` prompts."""
    names = set(hooks)
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=lambda h: h in names, return_type=None)
    return {h: cache[h].mean(0, keepdim=True).expand(n, *cache[h].shape[1:]).clone() for h in hooks}

"""Component patching for the W1 report: one prompt, every head and MLP, three corruptions.

Noising (necessity): the base run is the **clean** prompt; a component's activation at the
prompt's positions is replaced by its corrupted value, and the effect is the **drop** of the
target's score (clean − patched; positive = the component supports the answer). Every
variant is a list of :class:`replab.patching.Intervention` handed to
:func:`replab.patching.run_variants` (the one experiment loop); nothing here runs its own
patched forward, except the independent TransformerLens-hook reference of the sanity check.

Corruptions (the report records which, because each gives a different answer):

* ``other-prompt``: activations from the item's ``corrupt_prompt`` (or, when it has none,
  the first other prompt of the set with the same token length and a different answer);
* ``zero``: zero ablation;
* ``mean``: the mean over the set's prompts of the same token length (per position).

Scoring: ``first_token`` reads the target's first token at the last prompt position;
``sum_logprob`` adds the teacher-forced log-probabilities of all target tokens: the run is
repeated with the prompt followed by the first ``k`` target tokens (only the prompt's
positions are patched) and position ``T + k − 1`` is read out, for each ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from replab.errors import ReplabError
from replab.hooks import hook_name
from replab.patching import Intervention, Variant, run_variants
from replab.patching.metrics import readout

CORRUPTIONS = ("other-prompt", "zero", "mean")
SCORINGS = ("first_token", "sum_logprob")


@dataclass
class Setup:
    """Token ids and the corruption source of one report."""

    prompt_ids: list[int]
    target_ids: list[int]
    corruption: str
    corrupt_ids: list[int] | None = None      # other-prompt
    corrupt_prompt: str | None = None
    corrupt_source: str | None = None         # "corrupt_prompt" or "row N"
    mean: dict | None = None                  # hook -> [T, ...] mean activation
    n_mean: int = 0

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_ids)


def check_options(corruption: str, scoring: str) -> None:
    if corruption not in CORRUPTIONS:
        raise ReplabError(f"unknown corruption {corruption!r} (known: {', '.join(CORRUPTIONS)})")
    if scoring not in SCORINGS:
        raise ReplabError(f"unknown scoring {scoring!r} (known: {', '.join(SCORINGS)})")


def source_of(setup: Setup, hook: str) -> str:
    return {"other-prompt": "corrupt", "zero": "zero"}.get(setup.corruption, f"custom:{hook}")


def intervention(setup: Setup, site: str, layer: int, head: int | None = None) -> Intervention:
    """Replace ``site`` (at every prompt position) by the setup's corrupted value."""
    return Intervention(site, layer, head=head, positions=tuple(range(setup.n_prompt)),
                        source=source_of(setup, hook_name(site, layer)))


def mean_activations(model, prompts_ids: list[list[int]], hooks: set[str]) -> dict[str, torch.Tensor]:
    """``{hook: [T, ...]}`` means over prompts of equal length (the ``mean`` corruption)."""
    toks = torch.tensor(prompts_ids)
    with torch.inference_mode():
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n in hooks, return_type=None)
    return {h: cache[h].mean(0).clone() for h in hooks}


def _sources(setup: Setup, k: int) -> dict[str, torch.Tensor] | None:
    if setup.mean is None:
        return None
    out = {}
    for hook, m in setup.mean.items():
        pad = torch.zeros((k, *m.shape[1:]), dtype=m.dtype)
        out[hook] = torch.cat([m, pad])[None]                       # [1, T + k, ...]
    return out


def score_variants(model, setup: Setup, variants: list[Variant], scoring: str,
                   max_tokens: int = 65536) -> dict[str, np.ndarray]:
    """Per variant: ``logit`` and ``logprob`` of the target's first token and ``sum_logprob``
    (of all target tokens under ``sum_logprob``, else equal to ``logprob``), ``[V]`` each."""
    k_max = len(setup.target_ids) if scoring == "sum_logprob" else 1
    V = len(variants)
    total = np.zeros(V)
    first = {}
    for k in range(k_max):
        extra = setup.target_ids[:k]
        clean = torch.tensor([setup.prompt_ids + extra])
        corrupt = torch.tensor([(setup.corrupt_ids or setup.prompt_ids) + extra])
        finals, _ = run_variants(model, clean, corrupt, variants, base="clean", sources=_sources(setup, k),
                                 max_tokens=max_tokens)
        cand = torch.full((V, 1), setup.target_ids[k], dtype=torch.long)
        with torch.inference_mode():
            r = readout(model, finals.reshape(V, -1), cand, need_full=True)
        lp = (r.cand[:, 0] - r.lse).double().numpy()
        if k == 0:
            first = {"logit": r.cand[:, 0].double().numpy(), "logprob": lp}
        total += lp
    return {**first, "sum_logprob": total}


@torch.inference_mode()
def reference_full_corruption(model, setup: Setup, scoring: str) -> float:
    """Independent reference (TransformerLens hooks, no engine): the target score when
    ``blocks.0.hook_resid_pre`` at the prompt's positions is replaced by the corrupted value."""
    hook = "blocks.0.hook_resid_pre"
    k_max = len(setup.target_ids) if scoring == "sum_logprob" else 1
    T = setup.n_prompt
    total = 0.0
    for k in range(k_max):
        ids = torch.tensor([setup.prompt_ids + setup.target_ids[:k]])
        if setup.corruption == "other-prompt":
            _, c = model.run_with_cache(torch.tensor([setup.corrupt_ids + setup.target_ids[:k]]),
                                        names_filter=lambda n: n == hook, return_type=None)
            value = c[hook][0, :T]
        elif setup.corruption == "zero":
            value = None
        else:
            value = setup.mean[hook]

        def patch(act, hook=None, value=value):
            act = act.clone()
            act[0, :T] = 0.0 if value is None else value
            return act

        logits = model.run_with_hooks(ids, fwd_hooks=[(hook, patch)])[0, -1].double()
        lp = float(torch.log_softmax(logits, -1)[setup.target_ids[k]])
        if k == 0 and scoring == "first_token":
            return float(logits[setup.target_ids[0]])
        total += lp
    return total

"""Attribution patching of head *ablations*: a first-order estimate, from one forward and one
backward pass, of what ablating each head would do to the metric, in a model that already has
a set of heads ablated.

For head ``h`` with output ``z_h`` (``hook_z``, every position) in the current run (the clean
prompts with the ``removed`` heads ablated) and ablation value ``s_h`` (the engine's own source
tensor: zero, the clean mean, a resampled prompt, the corrupt run, or the mean over another
set), the estimate is ``ΔM_h ≈ Σ (s_h − z_h) · ∂M/∂z_h``, with ``M`` the prompt-mean metric.
This is attribution patching (Nanda 2023; :mod:`replab.patching.attribution` does the
clean → corrupt case) applied to the ablation the pruner uses. The pruner ranks candidates
with it (``attribution`` order; ``greedy --candidates K``) and always re-evaluates exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from replab.circuits.components import Component, interventions
from replab.errors import ReplabError
from replab.patching.interventions import Intervention, apply
from replab.patching.patch_values import source_values


def _metric_from_logits(model, last: torch.Tensor, task, metric: str, clean_logp) -> torch.Tensor:
    from replab.patching.metrics import Readout, metric_values

    cand = last.gather(1, task.candidates)
    lse = torch.logsumexp(last, dim=-1)
    r = Readout(cand, lse, last - lse[:, None] if metric == "kl" else None)
    return metric_values(metric, r, clean_logp, getattr(task, "class_a", None)).mean()


def ablation_attribution(model, task, removed: list[Component], candidates: list[Component], source: str,
                         metric: str, forwards: dict, sources: dict | None = None, seed: int = 0) -> np.ndarray:
    """Estimated change of the prompt-mean ``metric`` from ablating each of ``candidates``
    (head outputs, every position) on top of ``removed`` ``[len(candidates)]`` (module docstring).

    ``forwards``: the cached clean/corrupt forwards holding every ``hook_z`` the sources need.
    """
    L = model.cfg.n_layers
    if any(not c.is_head_output for c in [*removed, *candidates]):
        raise ReplabError("ablation attribution ranks head outputs")
    ivs = interventions(removed, model, source, task.n_tokens, seed) if removed else ()
    by_layer: dict[int, list[Intervention]] = {}
    for iv in ivs:
        by_layer.setdefault(iv.layer, []).append(iv)
    src = {layer: source_values(Intervention("z", layer, head=0, source=source, seed=seed), forwards, "clean", sources)
           for layer in range(L)}
    clean_logp = None
    if metric == "kl":
        last = forwards["clean"].final
        from replab.patching.metrics import final_logits

        with torch.inference_mode():
            clean_logp = final_logits(model, last).log_softmax(-1).clone()
    acts: dict[int, torch.Tensor] = {}

    def leaf(act, hook):
        return act.detach().requires_grad_(True)

    def z_hook(act, hook):
        layer = int(hook.name.split(".")[1])
        if layer in by_layer:
            act = act.clone()
            for iv in by_layer[layer]:
                apply(act, src[layer], iv, 0)
        act.retain_grad()
        acts[layer] = act
        return act

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            hooks = [("hook_embed", leaf)] + [(f"blocks.{layer}.attn.hook_z", z_hook) for layer in range(L)]
            logits = model.run_with_hooks(task.clean, fwd_hooks=hooks)
            m = _metric_from_logits(model, logits[:, -1], task, metric, clean_logp)
            m.backward()
    finally:
        for p in params:
            p.requires_grad_(True)
    out = np.zeros(len(candidates))
    with torch.no_grad():
        for i, c in enumerate(candidates):
            z = acts[c.layer]
            out[i] = float(((src[c.layer][:, :, c.head] - z[:, :, c.head].detach()) * z.grad[:, :, c.head]).sum())
    return out

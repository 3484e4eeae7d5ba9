"""Attribution patching (AtP): a first-order estimate of every component's patching effect.

From one clean forward, one corrupt forward and one backward pass (on the corrupt run), the
effect of patching a component's clean activation into the corrupt run is estimated as
``(a_clean − a_corrupt) · ∂M/∂a`` evaluated on the corrupt run, summed over the component's
entries and positions, with ``M`` the prompt-averaged metric. Divided by
``M_clean − M_corrupt`` it is directly comparable with the sweep's ``normalized_effect``.

Components: every attention head (``hook_z`` per head), every attention layer and MLP
(``hook_attn_out`` / ``hook_mlp_out``) and every MLP neuron (``mlp.hook_post`` per unit).
:func:`atp_with_exact` then patches the top-N components exactly with the batched engine
and reports both numbers side by side, with their Spearman correlation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from replab.errors import ReplabError
from replab.patching.engine import Variant, run_variants
from replab.patching.interventions import Intervention

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

KINDS = ("head", "attn", "mlp", "neuron")


def _metric(model: HookedTransformer, logits_last: torch.Tensor, task) -> torch.Tensor:
    a = logits_last.gather(1, task.answer[:, None])[:, 0]
    f = logits_last.gather(1, task.foil[:, None])[:, 0]
    return (a - f).mean()


def _names(model: HookedTransformer) -> list[str]:
    out = []
    for layer in range(model.cfg.n_layers):
        out += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out",
                f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.mlp.hook_post"]
    return out


def atp(model: HookedTransformer, task) -> tuple[pd.DataFrame, dict]:
    """AtP estimates for every head, attention layer, MLP and neuron (logit-difference metric).

    Returns ``(table, summary)``: table columns ``kind, layer, head, neuron, component,
    atp_effect`` (normalised, comparable to ``normalized_effect``), sorted by |atp_effect|.
    """
    names = set(_names(model))
    with torch.inference_mode():
        clean_logits, clean_cache = model.run_with_cache(task.clean, names_filter=lambda n: n in names)
        clean_m = float(_metric(model, clean_logits[:, -1], task))
    acts: dict[str, torch.Tensor] = {}

    def leaf(act, hook):
        return act.detach().requires_grad_(True)

    def keep(act, hook):
        act.retain_grad()
        acts[hook.name] = act
        return act

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:      # gradients are needed for activations only
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", leaf)] +
                                              [(n, keep) for n in sorted(names)]):
            logits = model(task.corrupt)
            m = _metric(model, logits[:, -1], task)
            m.backward()
    finally:
        for p in params:
            p.requires_grad_(True)
    corrupt_m = float(m.detach())
    denom = clean_m - corrupt_m
    if abs(denom) < 1e-8:
        raise ReplabError("clean and corrupt runs give the same logit difference: nothing to attribute")
    rows = []
    for layer in range(model.cfg.n_layers):
        def attr(name):
            a = acts[name]
            return (clean_cache[name] - a.detach()) * a.grad
        z = attr(f"blocks.{layer}.attn.hook_z").sum(dim=(0, 1, 3))   # [H]
        for h, v in enumerate(z.tolist()):
            rows.append(("head", layer, h, None, f"L{layer}H{h}", v))
        rows.append(("attn", layer, None, None, f"L{layer}.attn", float(attr(f"blocks.{layer}.hook_attn_out").sum())))
        rows.append(("mlp", layer, None, None, f"L{layer}.mlp", float(attr(f"blocks.{layer}.hook_mlp_out").sum())))
        neurons = attr(f"blocks.{layer}.mlp.hook_post").sum(dim=(0, 1))
        for j, v in enumerate(neurons.tolist()):
            rows.append(("neuron", layer, None, j, f"L{layer}N{j}", v))
    table = pd.DataFrame(rows, columns=["kind", "layer", "head", "neuron", "component", "atp_delta"])
    table["atp_effect"] = table["atp_delta"] / denom
    table = table.reindex(table["atp_effect"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    summary = {"clean_metric": clean_m, "corrupt_metric": corrupt_m, "metric": "logit_diff",
               "n_components": {k: int((table["kind"] == k).sum()) for k in KINDS}}
    return table, summary


def _intervention(row) -> Intervention:
    layer = int(row.layer)
    if row.kind == "head":
        return Intervention("z", layer, head=int(row.head))
    if row.kind == "attn":
        return Intervention("attn_out", layer)
    if row.kind == "mlp":
        return Intervention("mlp_out", layer)
    return Intervention("mlp_post", layer, neurons=(int(row.neuron),))


def exact_effects(model: HookedTransformer, task, rows: pd.DataFrame) -> np.ndarray:
    """Exact normalised effects (denoising, logit difference) of AtP table ``rows``."""
    from replab.patching.metrics import metric_values, normalized, readout

    variants = [Variant((_intervention(r),)) for r in rows.itertuples(index=False)]
    finals, forwards = run_variants(model, task.clean, task.corrupt, variants)
    v, n, d = finals.shape
    with torch.inference_mode():
        patched = metric_values("logit_diff", readout(model, finals.reshape(v * n, d),
                                                      task.candidates.repeat(v, 1), False))
        base = {k: float(metric_values("logit_diff", readout(model, forwards[k].final, task.candidates, False)).mean())
                for k in ("clean", "corrupt")}
    return normalized(patched.reshape(v, n).mean(1).cpu().numpy(), base["clean"], base["corrupt"])


def atp_with_exact(model: HookedTransformer, task, top: int = 20, all_heads: bool = True) -> tuple[pd.DataFrame, dict]:
    """AtP for every component, exact patching for the top ``top`` per kind (and every head
    when ``all_heads``), Spearman/Pearson of AtP against exact over the exactly patched heads."""
    from scipy.stats import pearsonr, spearmanr

    table, summary = atp(model, task)
    table["exact_effect"] = np.nan
    pick = table.groupby("kind", group_keys=False).head(top).index
    if all_heads:
        pick = pick.union(table.index[table["kind"] == "head"])
    table.loc[pick, "exact_effect"] = exact_effects(model, task, table.loc[pick])
    heads = table[(table["kind"] == "head") & table["exact_effect"].notna()]
    if len(heads) >= 3:
        summary["heads_spearman"] = float(spearmanr(heads["atp_effect"], heads["exact_effect"]).statistic)
        summary["heads_pearson"] = float(pearsonr(heads["atp_effect"], heads["exact_effect"]).statistic)
        summary["heads_compared"] = int(len(heads))
    done = table[table["exact_effect"].notna()]
    summary["all_spearman"] = float(spearmanr(done["atp_effect"], done["exact_effect"]).statistic)
    summary["n_exact"] = int(len(done))
    return table, summary

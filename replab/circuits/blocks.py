"""Block sweeps at a candidate layer (W3 steps 1–2).

>>> res = block_sweeps(model, task, layers=[20], ablation=Ablation("zero"), metric="class_mass")   # doctest: +SKIP

At each layer, one component at a time: the residual stream leaving the layer
(``L20RESID``: ``resid_post``, the site the feature scan and the probes read), each
attention head's output and the MLP's output.

* **necessity**: the component ablated (default ``zero``) in the clean run;
* **sufficiency**: the component patched clean → corrupt with everything else corrupted.

Both in batched engine runs sharing one clean and one corrupt forward. One table: ``layer,
block, test, metric_before`` (the unpatched run: clean for necessity, corrupt for
sufficiency), ``metric_after, normalized_effect, ci_low, ci_high, kl`` and every candidate's
logit (``answer_logit, foil_logit, max_other_logit, candidate_logits``). ``positions``
restricts every component to positions (a rule such as ``entity_last`` or ``-1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from replab.circuits.ablation import Ablation
from replab.circuits.batching import shared_forwards
from replab.circuits.components import Component
from replab.errors import ReplabError
from replab.patching.engine import Variant
from replab.patching.plan import run_plan

COLUMNS = ["layer", "block", "test", "positions", "metric", "metric_before", "metric_after", "normalized_effect",
           "ci_low", "ci_high", "kl", "answer_logit", "foil_logit", "max_other_logit", "candidate_logits"]


@dataclass
class BlocksResult:
    """``table`` (one row per layer × block × test), ``per_prompt``, ``summary``."""

    table: pd.DataFrame
    per_prompt: pd.DataFrame
    summary: dict = field(default_factory=dict)
    plans: tuple = ()


def layer_blocks(model, layer: int, positions) -> list[Component]:
    """The residual stream, every head and the MLP at ``layer`` (with ``positions``)."""
    cfg = model.cfg
    return ([Component("resid", layer, positions=positions)]
            + [Component("head", layer, h, positions=positions) for h in range(cfg.n_heads)]
            + [Component("mlp", layer, positions=positions)])


def block_sweeps(model, task, layers, ablation: Ablation | None = None, metric: str = "logit_diff",
           positions: tuple[int, ...] | None = None, n_boot: int = 1000, seed: int = 0, forwards=None,
           progress: bool = False) -> BlocksResult:
    """Necessity and sufficiency of each block at each of ``layers`` (module docstring)."""
    ablation = ablation or Ablation("zero")
    if ablation.kind == "corrupt":
        raise ReplabError("the necessity sweep ablates the clean run; --ablation corrupt is the sufficiency "
                          "sweep's mirror image: use zero, mean, resample or mean-other")
    layers = list(layers)
    if not layers:
        raise ReplabError("no layers given")
    pos = None if positions is None else tuple(positions)
    nec, suf = [], []
    for layer in layers:
        for c in layer_blocks(model, layer, pos):
            info = {"layer": layer, "block": c.whole().name.removeprefix(f"L{layer}") or c.name,
                    "positions": "all" if pos is None else ",".join(map(str, pos))}
            nec.append(Variant((c.intervention(model, ablation.source, task.n_tokens, ablation.seed),),
                               name=f"nec {c.name}", group="necessity", info={**info, "test": "necessity"}))
            suf.append(Variant((c.intervention(model, "clean", task.n_tokens),),
                               name=f"suf {c.name}", group="sufficiency", info={**info, "test": "sufficiency"}))
    if forwards is None:
        forwards = shared_forwards(model, task, [(nec, "clean"), (suf, "corrupt")])
    sources = ablation.sources(model, task, sorted({iv.hook for v in nec for iv in v.interventions}))
    out, pp, checks = [], [], {}
    for variants, base in ((nec, "clean"), (suf, "corrupt")):
        res = run_plan(model, task, variants, metric, base=base, sources=sources, forwards=forwards, n_boot=n_boot,
                       seed=seed, progress=progress, label=f"blocks {variants[0].group}", unit="block")
        t = res.table()
        t["kl"] = res.values("kl")[2].mean(1) if metric != "kl" else t["metric_after"]
        out.append(t)
        pp.append(res.per_prompt())
        checks.update({f"{base}_{k}": v for k, v in res.checks_dict().items()})
    table = pd.concat(out, ignore_index=True)[COLUMNS]
    summary = {"layers": layers, "ablation": ablation.describe(), "metric": metric,
               "positions": "all" if pos is None else list(pos), "clean_metric": res.clean_metric,
               "corrupt_metric": res.corrupt_metric, "checks": checks, "bootstrap": res.bootstrap,
               "n_variants": len(nec) + len(suf)}
    return BlocksResult(table, pd.concat(pp, ignore_index=True), summary)

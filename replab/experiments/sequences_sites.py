"""The ``sequences`` experiment's site stage (W4 step 2, by input and by position): the pruned
circuit's heads ablated at one site at a time, through ``replab circuit necessity``.

Sites (:mod:`replab.circuits.components` vocabulary, applied to every head of the circuit):

* ``output``: the heads' outputs at every position (the plain necessity of the circuit);
* ``last`` / ``earlier``: their outputs at the last position only / at every earlier position;
* ``q``: their query inputs; ``k`` / ``v``: the keys / values they read. Under grouped-query
  attention these are per **KV head**, so they also change what the other query heads of the
  group read (the records' ``kv_group`` lists them); the narrative says so.

Each site is one necessity run with the experiment's ablation (default ``mean``) and no random
baseline (random head sets are drawn over head outputs, not over sites).
"""

from __future__ import annotations

from markupsafe import Markup

from replab.circuits.validate_run import run_necessity
from replab.errors import ReplabError
from replab.experiments.report import text
from replab.experiments.sequences_common import run_command, task_name
from replab.experiments.spec import Section

SITES = ("output", "last", "earlier", "q", "k", "v")
_WHAT = {"output": "outputs, every position", "last": "outputs at the last position",
         "earlier": "outputs at every earlier position", "q": "query inputs", "k": "keys (their KV heads)",
         "v": "values (their KV heads)"}


def parse_sites(spec: str) -> list[str]:
    """``"q,k,v"`` -> ``["q", "k", "v"]`` (known: :data:`SITES`)."""
    items = [x.strip().lower() for x in str(spec).split(",") if x.strip()]
    bad = [x for x in items if x not in SITES]
    if bad or not items:
        raise ReplabError(f"unknown site(s) {', '.join(bad) or spec!r} (known: {', '.join(SITES)})")
    return items


def site_components(heads: list[str], site: str, n_tokens: int) -> list[str]:
    """Component names that ablate ``heads`` at ``site`` on prompts of ``n_tokens`` tokens."""
    if site == "output":
        return list(heads)
    if site == "last":
        return [f"{h}@-1" for h in heads]
    if site == "earlier":
        if n_tokens < 2:
            raise ReplabError("the 'earlier' site needs prompts of at least two tokens")
        pos = ",".join(str(i) for i in range(n_tokens - 1))
        return [f"{h}@{pos}" for h in heads]
    return [f"{h}.{site}" for h in heads]


def sites(ctx) -> dict:
    """Stage: necessity of the pruned circuit at each site (module docstring)."""
    c = ctx.config
    prune = ctx.results["prune"]
    heads, n_tokens = prune["circuit"]["heads"], int(prune["n_tokens"])
    rows, commands = [], []
    for site in parse_sites(c["sites"]):
        out = ctx.out / site
        s = run_necessity(site_components(heads, site, n_tokens), task=task_name(c), out=out, model=ctx.model,
                          limit=c["limit"], metric=c["metric"], ablation=c["ablation"], n_random=0,
                          seed=c["seed"], n_boot=c["n_boot"], progress=ctx.progress)
        r = s["records"][0]
        rows.append({"site": site, "what": _WHAT[site], "n_components": len(r["components"]),
                     "performance": r["metric"] / r["clean_metric"], "normalized_effect": r["normalized_effect"],
                     "ci_low": r["ci_low"], "ci_high": r["ci_high"], "kl": r["kl"]})
        commands.append(run_command(s, out))
    by = {r["site"]: r for r in rows}
    inputs = [r for r in rows if r["site"] in ("q", "k", "v")]
    worst_input = min(inputs, key=lambda r: r["performance"])["site"] if inputs else None
    return {"n_heads": len(heads), "n_tokens": n_tokens, "ablation": c["ablation"], "rows": rows,
            "by_site": {k: {"performance": v["performance"], "kl": v["kl"]} for k, v in by.items()},
            "worst_input": worst_input, "command": " && ".join(commands)}


def sites_section(s: dict) -> Section:
    """Report section of the site stage: every number from ``summary.json``."""
    st = s["stages"]["sites"]
    parts = []
    for r in st["rows"]:
        k = f"stages.sites.by_site.{r['site']}"
        parts.append(text(f"{r['what']}: {{{k}.performance:.3f}} (KL {{{k}.kl:.3f}})", s))
    paras = [Markup(" ").join([text(f"The circuit's {{stages.sites.n_heads}} heads ablated ({st['ablation']}) at "
                                    "one site at a time, performance (ablated / intact logit difference) and KL "
                                    "to the clean run:", s), Markup("; ").join(parts) + "."])]
    by = st["by_site"]
    if "last" in by and "earlier" in by:
        later = by["last"]["performance"] < by["earlier"]["performance"]
        paras.append(text("Removing the heads' output at the last position "
                          + ("hurts more than removing it at every earlier position: they act where the next "
                             "item is predicted." if later else
                             "hurts less than removing it at the earlier positions: part of their work is "
                             "done before the final position."), s))
    if st["worst_input"]:
        paras.append(text(f"Of the inputs, ablating the {_WHAT[st['worst_input']]} hurts most. Keys and values "
                          "are per KV head under grouped-query attention, so those rows also change what the "
                          "other query heads of each group read.", s))
    rows = [{k: r[k] for k in ("site", "what", "n_components", "performance", "normalized_effect", "ci_low",
                               "ci_high", "kl")} for r in st["rows"]]
    return Section("Ablation by site: q, k, v and position (step 2)", paras, [],
                   [("Circuit ablated at each site", rows)], st["command"])


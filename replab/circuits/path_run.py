"""``replab circuit path``: one call, writing a run directory.

Run directory: ``config.yaml``, ``records`` (one per sender set), ``paths`` (with every
candidate's logit), ``per_prompt``, ``path_heatmap`` (one-head sender sets as a layer × head
grid of the drop) and ``summary.json`` last (records, the path checks, the GQA note).
"""

from __future__ import annotations

import pandas as pd

from replab.circuits.ablation import Ablation
from replab.circuits.components import all_heads, names, parse_components
from replab.circuits.path import parse_receiver, path_patch
from replab.circuits.runs import finish, load, runner, start
from replab.errors import ReplabError
from replab.rundir import write_table


def sender_sets(model, senders, receiver, each: bool, n_tokens: int):
    """``(sets, labels)``: ``senders == "all"``: every head below the receiver, one set each;
    ``each``: each listed head alone; otherwise the whole list as one set."""
    if str(senders).strip().lower() == "all":
        top = receiver.layer + (1 if receiver.kind == "mlp" else 0) if receiver.kind != "logits" else model.cfg.n_layers
        heads = [c for c in all_heads(model) if c.layer < top]
        if not heads:
            raise ReplabError(f"no head sits below the receiver {receiver.name}")
        return [[c] for c in heads], [c.name for c in heads]
    comps = parse_components(senders, model, n_tokens)
    if each:
        return [[c] for c in comps], [c.name for c in comps]
    return [comps], ["+".join(names(comps))]


@runner("path")
def run_path(sender, receiver: str = "logits", task: str = "next_day", out=None, model: str | None = None,
             dataset=None, classes=None, template=None, limit=None, metric: str = "logit_diff",
             ablation: str = "corrupt", mean_over=None, each: bool = False, freeze_mlps: bool = False,
             seed: int = 0, n_boot: int = 1000, progress: bool = True) -> dict:
    """Path patching from ``sender`` (heads, or ``all``) into ``receiver`` (``logits``,
    ``L9H1.q|.k|.v``, ``L12MLP``); see :mod:`replab.circuits.path`.

    Args:
        each: score every listed sender separately (``sender="all"`` always does).
        ablation: what the senders' outputs become: ``corrupt`` (path patching) or an ablation
            (``mean``, ``zero`` ...: ablate only that path).
        freeze_mlps: freeze the MLPs at their clean values too.
    Returns:
        The summary written to ``<out>/summary.json`` (``records``), plus ``out``.
    """
    from replab.circuits.plots import path_heatmap
    from replab.patching.plots import save_figure

    abl = Ablation(ablation, mean_over, seed)
    m, t = load(model, task, dataset, classes, template, limit)
    rec = parse_receiver(receiver, m)
    sets, labels = sender_sets(m, sender, rec, each, t.n_tokens)
    every = str(sender).strip().lower() == "all"
    sender_opt = "all" if every else names(parse_components(sender, m, t.n_tokens))
    options = {"sender": sender_opt, "receiver": rec.name, "task": task, "dataset": dataset, "classes": classes,
               "template": template, "limit": limit, "model": model, "metric": metric, "ablation": abl.kind,
               "mean_over": mean_over, "each": each, "freeze_mlps": freeze_mlps, "seed": seed, "n_boot": n_boot}
    out = start(out or "runs/circuit-path", "path", options)
    res = path_patch(m, t, sets, rec, abl, metric, freeze_mlps, n_boot, seed, progress=progress, labels=labels)
    files = write_table(pd.DataFrame(res.records), out, "records")
    files += write_table(res.table, out, "paths")
    files += write_table(res.per_prompt, out, "per_prompt")
    if sum(len(s) == 1 for s in sets) > 1:
        title = f"path patching into {rec.name} ({abl.describe()}{', MLPs frozen' if freeze_mlps else ''}), {t.name}"
        files += save_figure(path_heatmap(res.table, m.cfg.n_layers, m.cfg.n_heads, title), out / "path_heatmap")
    summary = {"task": t.describe(), **res.summary, "records": res.records, "files": files}
    return finish(out, summary, m)

"""``replab circuit necessity|sufficiency|minimality``: one call each, writing a run directory.

Run directory: ``config.yaml`` (replayable), ``records`` (the JSON records as a table),
``variants`` (one row per engine variant: the set and every random set, with every
candidate's logit), ``per_prompt``, a figure (``random_baseline`` or ``minimality``) and
``summary.json`` last (records, checks, task, bootstrap, model identity).
"""

from __future__ import annotations

import pandas as pd

from replab.circuits.ablation import Ablation
from replab.circuits.components import names, parse_components
from replab.circuits.runs import finish, load, runner, start
from replab.rundir import write_table


def _run(kind: str, components, task, out, model, dataset, classes, template, limit, metric, ablation,
         mean_over, n_random, seed, n_boot, progress, ablate_mlps=None) -> dict:
    from replab.circuits import validate
    from replab.circuits.plots import baseline_histogram, minimality_bars
    from replab.patching.plots import save_figure

    abl = Ablation(ablation, mean_over, seed)
    m, t = load(model, task, dataset, classes, template, limit)
    comps = parse_components(components, m, t.n_tokens)
    options = {"task": task, "dataset": dataset, "classes": classes, "template": template, "limit": limit,
               "model": model, "components": names(comps), "metric": metric, "ablation": abl.kind,
               "mean_over": mean_over, "n_random": n_random, "seed": seed, "n_boot": n_boot}
    if ablate_mlps is not None:
        options["ablate_mlps"] = ablate_mlps
    out = start(out or f"runs/circuit-{kind}", kind, options)
    fn = getattr(validate, kind)
    kw = {} if ablate_mlps is None else {"ablate_mlps": ablate_mlps}
    res = fn(m, t, comps, abl, metric=metric, n_random=n_random, seed=seed, n_boot=n_boot, progress=progress, **kw)
    files = write_table(pd.DataFrame(res.records), out, "records")
    files += write_table(res.table, out, "variants")
    files += write_table(res.per_prompt, out, "per_prompt")
    title = f"{kind} of {len(comps)} components ({abl.describe()} ablation), {t.name}"
    if kind == "minimality":
        files += save_figure(minimality_bars(res.records, title), out / "minimality")
    else:
        r = res.records[0]
        files += save_figure(baseline_histogram(r["normalized_effect"], res.table["normalized_effect"].iloc[1:],
                                                title), out / "random_baseline")
    plan = res.plan.describe()
    summary = {"task": t.describe(), "records": res.records, "checks": plan["checks"],
               "bootstrap": plan["bootstrap"], "seconds": plan["seconds"], "n_variants": plan["n_variants"],
               "files": files}
    return finish(out, summary, m)


_DOC = """{what}

    Args:
        components: a component set (``"L23H3,L29H1,L20MLP"``, a list, or a JSON file; see
            :mod:`replab.circuits.components`).
        task, dataset, classes, template, limit: the task (:func:`replab.patching.catalog.load_task`).
        metric: any patching metric (``logit_diff``, ``margin``, ``logprob``, ``prob``, ``kl``,
            ``class_mass``); KL to the clean run is reported whatever the metric.
        ablation: ``zero``, ``mean``, ``resample``, ``mean-other`` (with ``mean_over``) or ``corrupt``.
        n_random: random sets of the same size and layer profile (at least 20, or 0).
    Returns:
        The summary written to ``<out>/summary.json`` (``records`` as in
        :mod:`replab.circuits.validate`), plus ``out``.
    """


@runner("necessity")
def run_necessity(components, task: str = "next_day", out=None, model: str | None = None, dataset=None,
                  classes=None, template=None, limit=None, metric: str = "logit_diff", ablation: str = "mean",
                  mean_over=None, n_random: int = 20, seed: int = 0, n_boot: int = 1000,
                  progress: bool = True) -> dict:
    return _run("necessity", components, task, out, model, dataset, classes, template, limit, metric, ablation,
                mean_over, n_random, seed, n_boot, progress)


@runner("sufficiency")
def run_sufficiency(components, task: str = "next_day", out=None, model: str | None = None, dataset=None,
                    classes=None, template=None, limit=None, metric: str = "logit_diff", ablation: str = "mean",
                    mean_over=None, n_random: int = 20, seed: int = 0, n_boot: int = 1000,
                    ablate_mlps: bool = False, progress: bool = True) -> dict:
    return _run("sufficiency", components, task, out, model, dataset, classes, template, limit, metric, ablation,
                mean_over, n_random, seed, n_boot, progress, ablate_mlps)


@runner("minimality")
def run_minimality(components, task: str = "next_day", out=None, model: str | None = None, dataset=None,
                   classes=None, template=None, limit=None, metric: str = "logit_diff", ablation: str = "mean",
                   mean_over=None, n_random: int = 20, seed: int = 0, n_boot: int = 1000,
                   ablate_mlps: bool = False, progress: bool = True) -> dict:
    return _run("minimality", components, task, out, model, dataset, classes, template, limit, metric, ablation,
                mean_over, n_random, seed, n_boot, progress, ablate_mlps)


run_necessity.__doc__ = _DOC.format(what="Necessity of a component set: ablate it in the clean run "
                                         "(:func:`replab.circuits.validate.necessity`).")
run_sufficiency.__doc__ = _DOC.format(what="Sufficiency: keep only the set, ablate every other head (and MLP "
                                           "with ``ablate_mlps``) (:func:`replab.circuits.validate.sufficiency`).")
run_minimality.__doc__ = _DOC.format(what="Minimality: each member's contribution to the set kept alone "
                                          "(:func:`replab.circuits.validate.minimality`).")

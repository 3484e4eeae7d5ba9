"""The W1 report's run directory: ``report.json``, ``report.md``, tables, a figure, ``summary.json`` last.

:func:`run_component_report` is what ``replab circuit report`` calls; :func:`write_component_report`
writes the directory (``replab run fact-recall``'s last stage calls it too), and the step figures
(:func:`drops_figure`, :func:`stages_figure`, :func:`grad_norms_figure`) are public.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from replab.circuits.runs import model_option, read_config, runner, start
from replab.errors import ReplabError
from replab.io import json_plain, write_json_atomic, write_text_atomic
from replab.models.coerce import as_model
from replab.rundir import finish_run, start_run, write_table


def load_rows(dataset: str | None, task: str | None, tokenizer, prepend_bos: bool) -> tuple[pd.DataFrame, str]:
    """The rows of a prompt set: ``dataset`` (a file or builtin name) or ``task`` (a builtin set)."""
    from replab.prompts import load_prompts

    if (dataset is None) == (task is None):
        raise ReplabError("give exactly one of --dataset FILE or --task NAME")
    ps = load_prompts(dataset or task, tokenizer, prepend_bos=prepend_bos)
    return ps.rows.reset_index(drop=True), ps.name


@runner("report")
def run_component_report(dataset: str | None = None, task: str | None = None, prompt_index: int = 0,
                         corruption: str = "other-prompt", scoring: str = "first_token", top: int = 10,
                         out=None, model=None, layers="all", progress: bool = False) -> dict:
    """``replab circuit report``: :func:`replab.circuits.report.component_report` on one prompt of a
    set, written to ``out`` (``config.yaml`` first, then ``report.json``, ``report.md``,
    ``components.parquet|csv``, ``grad_norms.parquet|csv``, ``drops.png|svg``, and
    ``summary.json`` last). ``replab circuit replay OUT/config.yaml`` repeats it. Returns the
    report dict with ``out`` added."""
    from replab._progress import progress_bar
    from replab.circuits.report import component_report
    from replab.circuits.report_patching import check_options

    check_options(corruption, scoring)
    t0 = time.time()
    m = as_model(model)
    rows, name = load_rows(dataset, task, m.tokenizer, bool(m.cfg.default_prepend_bos))
    with progress_bar(6, "component report", "step", enabled=progress) as bar:
        rep = component_report(m, rows, prompt_index, corruption, scoring, top, dataset=name, layers=layers,
                               progress=bar.advance)
    out = Path(out or f"runs/report-{name}-{prompt_index}-{corruption}")
    given = {"dataset": dataset, "task": task, "prompt_index": prompt_index, "corruption": corruption,
             "scoring": scoring, "top": top, "layers": layers, "model": model_option(model)}
    config = read_config(start(out, "report", given))
    options = {**{k: v for k, v in given.items() if k != "model"}, "layers": rep.report["layers"]}
    report, _ = write_component_report(out, rep.report, rep.components, rep.grad_norms, m, options,
                                       with_loading=round(time.time() - t0, 2), config=config)
    return {**report, "out": str(out)}


def write_component_report(out, report: dict, components: pd.DataFrame, grad_norms: pd.DataFrame, model,
                           options: dict, with_loading: float | None = None,
                           config: dict | None = None) -> tuple[dict, list[str]]:
    """Write a W1 report's run directory (``report.json``, ``report.md``, ``components``,
    ``grad_norms``, ``drops.png|svg``, then ``summary.json``) from
    :func:`replab.circuits.report.build_report`'s dict and its tables; ``config`` (the run's
    ``config.yaml``, when it has one) goes into the summary. Returns the report (with the model
    identity added) and the files written."""
    out = start_run(Path(out))
    report = {**report, "model": model.replab_identity.to_dict(), "seconds": dict(report["seconds"])}
    if with_loading is not None:
        report["seconds"]["with_loading"] = with_loading
    files = write_table(components, out, "components") + write_table(grad_norms, out, "grad_norms")
    write_json_atomic(out / "report.json", json_plain(report), sort_keys=False)
    write_text_atomic(out / "report.md", markdown(report))
    files += [str(out / "report.json"), str(out / "report.md")]
    files += _figure(components, report, out)
    summary = {"kind": "component_report", "prompt": report["prompt"], "target": report["target"],
               "corruption": report["corruption"], "candidates": [c["component"] for c in report["candidates"]],
               "lora": report["lora"], "checks": report["checks"], "seconds": report["seconds"], "files": files,
               "options": options, **({"config": config} if config is not None else {})}
    finish_run(out, summary, model)
    return report, files


def markdown(report: dict) -> str:
    """The report as Markdown: answer check, corruption, ranked candidates, LoRA targets, checks."""
    t, c = report["target"], report["corruption"]
    p = report["prompt"]
    lines = [f"# Component report: {p['text']!r} → {t['text']!r}", "",
             f"Model `{report.get('model', {}).get('name', '?')}`; prompt {p['index']} of `{p['dataset']}`.", "",
             "## 1. Answer check", "",
             f"- target tokens: {', '.join(repr(x) for x in t['tokens'])} (scoring `{t['scoring']}`)",
             f"- first token: logit {t['logit']:.3f}, probability {t['prob']:.4f}, rank {t['rank']}",
             f"- summed log-probability of all target tokens: {t['sum_logprob']:.3f}",
             "- top 5: " + ", ".join(f"{x['token']!r} {x['logit']:.2f}" for x in t["top5"]), "",
             "## 2. Corruption", "",
             f"- `{c['kind']}`" + (f": {c['corrupt_prompt']!r} ({c['source']})" if c.get("corrupt_prompt") else "")
             + (f": mean over {c['n_mean_prompts']} prompts of the same length" if c.get("n_mean_prompts") else ""),
             f"- target {t['metric']}: clean {c['clean']:.3f}, fully corrupted {c['fully_corrupted']:.3f} "
             f"(drop {c['full_drop']:.3f})", "",
             "## 3. Ranked candidates", "", f"Ranking: {report['ranking']}.", "",
             "| rank | component | drop | normalized | causal rank | refinement (site: drop) | matters more | "
             "mean abs act | grad norm | combined |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cand in report["candidates"]:
        e = cand["evidence"]
        pa, rf = e["patch"], e["refinement"]
        nd = "–" if pa["normalized_drop"] is None else f"{pa['normalized_drop']:.2f}"
        rd = "–" if rf["drop"] is None else f"{rf['drop']:.3f}"
        lines.append(f"| {cand['rank']} | {cand['component']} | {pa['drop']:.3f} | {nd} | {pa['causal_rank']} | "
                     f"{rf['site']} ({rf['unit']}): {rd} | {rf['matters_more'] or '–'} | "
                     f"{e['mean_abs_activation']['value']:.4f} | {e['grad_norm']:.4g} | {e['combined_score']:.3f} |")
    lines += ["", "Parameters per candidate (exact `named_parameters()` names):", ""]
    for cand in report["candidates"]:
        lines.append(f"- {cand['component']}: " + ", ".join(f"`{n}`" for n in cand["parameters"]))
    lines += ["", "## 4. LoRA targets", "", "```python",
              f"target_modules = {json.dumps(report['lora']['target_modules'])}", "```", "",
              report["lora"]["note"] + ".", "", "## 5. Largest gradient norms", "",
              "| parameter | L2 norm of d NLL / dW |", "|---|---|"]
    for name, v in sorted(report["grad_norms"].items(), key=lambda kv: -kv[1])[:10]:
        lines.append(f"| `{name}` | {v:.4g} |")
    lines += ["", "## Checks", ""]
    for name, chk in report["checks"].items():
        lines.append(f"- {name}: {'ok' if chk['ok'] else 'FAILED'} (|error| {chk['abs_error']:.2e})")
    return "\n".join(lines) + "\n"


def _figure(table: pd.DataFrame, report: dict, out: Path) -> list[str]:
    t = report["target"]
    return drops_figure(table, out / "drops", f"{report['prompt']['text']!r} → {t['text']!r}: drop in target "
                        f"{t['metric']} ({report['corruption']['kind']} corruption)")


def drops_figure(table: pd.DataFrame, stem: Path, title: str) -> list[str]:
    """W1 step 2's figure: the drop of every head (layer × query head heatmap, ``z`` patched) and
    every MLP (bars, ``post`` patched) from a table with ``kind``, ``layer``, ``head``, ``drop``;
    ``<stem>.png`` and ``.svg``."""
    import seaborn as sns

    from replab._figures import pyplot, save

    plt = pyplot()
    heads = table[table["kind"] == "head"]
    grid = heads.pivot(index="layer", columns="head", values="drop")
    grid.columns = [int(c) for c in grid.columns]
    mlp = table[table["kind"] == "mlp"].set_index("layer")["drop"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.22 * len(grid) + 2.2), gridspec_kw={"width_ratios": [3, 1]})
    vmax = float(np.nanmax(np.abs(table["drop"].values))) or 1.0
    sns.heatmap(grid, ax=a, cmap="RdBu", center=0, vmin=-vmax, vmax=vmax, cbar_kws={"label": "drop"})
    a.set_xlabel("query head (z patched)")
    a.set_ylabel("layer")
    a.set_title("heads: drop of the target when z is corrupted")
    b.barh(mlp.index, mlp.values, color=["tab:blue" if v > 0 else "tab:red" for v in mlp.values])  # as RdBu
    b.invert_yaxis()
    b.set_xlabel("drop")
    b.set_ylabel("layer")
    b.set_title("MLPs (post patched)")
    fig.suptitle(title)
    fig.tight_layout()
    return [str(p) for p in save(fig, stem, formats=("png", "svg"))]


def stages_figure(table: pd.DataFrame, stem: Path, title: str) -> list[str]:
    """W1 step 3's figure: for each component of ``table`` (``component``, ``drop``,
    ``refine_drop``, ``refine_site``, as :func:`replab.circuits.report.compare_stages` gives), the
    output-stage drop (``z`` / ``post``) beside the input-stage drop (``v`` per KV head /
    ``pre``); ``<stem>.png`` and ``.svg``."""
    from replab._figures import pyplot, save

    plt = pyplot()
    n = len(table)
    y = np.arange(n)
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * n + 1.8))
    ax.barh(y - 0.2, table["drop"], height=0.4, color="tab:blue", label="output stage (head z / MLP post)")
    ax.barh(y + 0.2, table["refine_drop"], height=0.4, color="tab:orange",
            label="input stage (KV head v / MLP gate pre)")
    ax.set_yticks(y, [f"{c} ({s})" for c, s in zip(table["component"], table["refine_site"], strict=True)])
    ax.invert_yaxis()
    ax.axvline(0, color="grey", lw=0.7)
    ax.set_xlabel("drop of the target's score")
    ax.set_ylabel("component (refined by)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return [str(p) for p in save(fig, stem, formats=("png", "svg"))]


def grad_norms_figure(grad_norms: pd.DataFrame, stem: Path, title: str) -> list[str]:
    """W1 step 4's figure: the gradient norm of every attention/MLP weight matrix, layer × matrix
    (the last part of its name, e.g. ``q_proj``; a table with ``name``, ``layer``, ``grad_norm``,
    as :class:`replab.circuits.report_evidence.GradientEvidence` gives); ``<stem>.png`` and ``.svg``."""
    import seaborn as sns

    from replab._figures import pyplot, save

    plt = pyplot()
    df = grad_norms.assign(matrix=[n.rsplit(".", 2)[-2] for n in grad_norms["name"]])
    order = list(dict.fromkeys(df["matrix"]))
    grid = df.pivot_table(index="layer", columns="matrix", values="grad_norm", aggfunc="sum")[order]
    fig, ax = plt.subplots(figsize=(6.5, 0.22 * len(grid) + 2.0))
    sns.heatmap(grid, ax=ax, cmap="viridis", cbar_kws={"label": "L2 norm of d NLL / dW"})
    ax.set_xlabel("weight matrix")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.tight_layout()
    return [str(p) for p in save(fig, stem, formats=("png", "svg"))]

"""The W1 report's run directory: ``report.json``, ``report.md``, tables, a figure, ``summary.json`` last.

:func:`run_component_report` is what ``replab circuit report`` calls.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from replab.errors import ReplabError
from replab.io import write_json_atomic, write_text_atomic
from replab.models.coerce import as_model
from replab.rundir import finish_run, start_run, write_table


def load_rows(dataset: str | None, task: str | None, tokenizer, prepend_bos: bool) -> tuple[pd.DataFrame, str]:
    """The rows of a prompt set: ``dataset`` (a file or builtin name) or ``task`` (a builtin set)."""
    from replab.prompts import load_prompts

    if (dataset is None) == (task is None):
        raise ReplabError("give exactly one of --dataset FILE or --task NAME")
    ps = load_prompts(dataset or task, tokenizer, prepend_bos=prepend_bos)
    return ps.rows.reset_index(drop=True), ps.name


def run_component_report(dataset: str | None = None, task: str | None = None, prompt_index: int = 0,
                         corruption: str = "other-prompt", scoring: str = "first_token", top: int = 10,
                         out=None, model=None, layers="all", progress: bool = False) -> dict:
    """``replab circuit report``: :func:`replab.circuits.report.component_report` on one prompt of a
    set, written to ``out`` (``report.json``, ``report.md``, ``components.parquet|csv``,
    ``grad_norms.parquet|csv``, ``drops.png|svg``, then ``summary.json``). Returns the report
    dict with ``out`` added."""
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
    out = start_run(Path(out or f"runs/report-{name}-{prompt_index}-{corruption}"))
    report = {**rep.report, "model": m.replab_identity.to_dict()}
    report["seconds"]["with_loading"] = round(time.time() - t0, 2)
    files = write_table(rep.components, out, "components") + write_table(rep.grad_norms, out, "grad_norms")
    write_json_atomic(out / "report.json", _jsonable(report), sort_keys=False)
    write_text_atomic(out / "report.md", markdown(report))
    files += [str(out / "report.json"), str(out / "report.md")]
    files += _figure(rep.components, report, out)
    summary = {"kind": "component_report", "prompt": report["prompt"], "target": report["target"],
               "corruption": report["corruption"], "candidates": [c["component"] for c in report["candidates"]],
               "lora": report["lora"], "checks": report["checks"], "seconds": report["seconds"], "files": files,
               "options": {"dataset": dataset, "task": task, "prompt_index": prompt_index, "corruption": corruption,
                           "scoring": scoring, "top": top, "layers": report["layers"]}}
    finish_run(out, summary, m)
    return {**report, "out": str(out)}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


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
    t = report["target"]
    fig.suptitle(f"{report['prompt']['text']!r} → {t['text']!r}: drop in target {t['metric']} "
                 f"({report['corruption']['kind']} corruption)")
    fig.tight_layout()
    return [str(p) for p in save(fig, out / "drops", formats=("png", "svg"))]

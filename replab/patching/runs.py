"""One call per workflow step (W2 of docs/workflows.md, whose numbered steps the docstrings
below cite): load the model and task, run, write a run directory.

These are what the ``replab patch`` / ``replab attribute`` / ``replab test-prompt`` commands
call; each returns the summary dict that is also written to ``<out>/summary.json``. ``model``
is a model name (None: the default SmolLM2) or an already loaded model (``replab run next-day``
passes its one loaded model to every step).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from replab.errors import ReplabError
from replab.hooks import check_head, parse_head_list
from replab.io import inside, read_table
from replab.rundir import finish_run, start_run, write_table

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def load(model_name, task: str, template: str | None = None, limit: int | None = None):
    """``(model, PatchTask)``: the model (a name, default SmolLM2, or a loaded model) and a task
    on its tokenizer."""
    from replab.models import load_tokenizer
    from replab.models.coerce import as_model
    from replab.patching.catalog import load_task

    model = as_model(model_name)
    tok = model.tokenizer or load_tokenizer(model_name if isinstance(model_name, str) else None)
    return model, load_task(task, tok, template=template, limit=limit,
                            prepend_bos=bool(model.cfg.default_prepend_bos))


def run_sweep(task: str = "next_day", site: str = "resid_pre", by: str = "layer,position",
              out=None, model: str | None = None, template: str | None = None,
              limit: int | None = None, progress: bool = True, engine: str = "local",
              workers: int | None = None, address: str | None = None, cpus_per_worker: float | None = None,
              **kw) -> dict:
    """:func:`replab.patching.sweeps.sweep` on a named task, saved to ``out``.

    ``engine="ray"`` runs the cells on ``workers`` Ray actors of the cluster at ``address``
    (:mod:`replab.patching.executors`); the tables are the local engine's."""
    from replab.patching.executors import engine_scope
    from replab.patching.sweeps import sweep

    with engine_scope(engine, workers=workers, address=address, cpus_per_worker=cpus_per_worker) as runner:
        m, t = load(model, task, template, limit)
        res = sweep(m, t, site=site, by=by, progress=progress, engine=runner, **kw)
        res.summary["engine"] = runner.describe()
    out = Path(out or f"runs/patch-{site}-{by.replace(',', '_')}")
    summary = res.save(out, m) or {}
    return {**summary, "out": str(out)}


def run_heads(task: str = "next_day", out=None, model: str | None = None, template=None,
              limit=None, progress: bool = True, **kw) -> dict:
    """W2 step 5 for heads: output (z), value (v, per KV head) and pattern sweeps (layer × head),
    their heatmaps, and the z-vs-v and z-vs-pattern scatters."""
    m, t = load(model, task, template, limit)
    return _heads(m, t, Path(out or "runs/patch-heads"), progress, **kw)


def _heads(m: HookedTransformer, t, out: Path, progress: bool, **kw) -> dict:
    from replab.patching.plots import head_scatter, save_figure
    from replab.patching.sweeps import sweep

    out = start_run(out)
    tables, files, seconds = {}, [], {}
    for site in ("z", "v", "pattern"):
        res = sweep(m, t, site=site, by="layer,head", progress=progress, **kw)
        res.save(out / site, m)
        tables[site] = res.table
        seconds[site] = res.summary["seconds"]
    cfg = m.cfg
    for other in ("v", "pattern"):
        fig = head_scatter(tables["z"], tables[other], other,
                           f"head output vs {other} patching, task {t.name}", cfg.n_heads,
                           cfg.n_key_value_heads or cfg.n_heads)
        files += save_figure(fig, out / f"scatter_z_vs_{other}")
    z = tables["z"].sort_values("normalized_effect", key=np.abs, ascending=False)
    summary = {"kind": "patch_heads", "task": t.describe(), "sites": ["z", "v", "pattern"],
               "seconds": seconds, "files": files,
               "top_heads": z.head(10)[["layer", "head", "normalized_effect"]].to_dict("records")}
    return {**finish_run(out, summary, m), "out": str(out)}


GRID_SITES = ("resid_pre", "attn_out", "mlp_out")


def run_grid(task: str = "next_day", out=None, model: str | None = None, template=None,
             limit=None, progress: bool = True, **kw) -> dict:
    """W2 step 5 in one call: the residual stream, attention-output and MLP-output
    layer × position sweeps (``<out>/<site>/``) and the head output / value / pattern sweeps
    with their scatters (``<out>/heads/``), on one loaded model. A finished part (its
    ``summary.json`` exists) is reused, so an interrupted grid resumes, but only when
    ``<out>/grid_config.json`` (task, model weights, options) matches this call; otherwise
    every part is recomputed."""
    import json

    from replab.patching.sweeps import sweep

    m, t = load(model, task, template, limit)
    out = start_run(Path(out or "runs/patch-grid"))
    config = json.dumps({"task": t.describe(), "weights_sha256": m.replab_identity.weights_sha256,
                         "options": kw}, sort_keys=True, default=str)
    key = out / "grid_config.json"
    if not key.is_file() or key.read_text() != config:
        for part in (*GRID_SITES, "heads"):
            (out / part / "summary.json").unlink(missing_ok=True)
        key.write_text(config)
    parts = {}
    for site in GRID_SITES:
        done = out / site / "summary.json"
        if not done.is_file():
            sweep(m, t, site=site, by="layer,position", progress=progress, **kw).save(out / site, m)
        parts[site] = json.loads(done.read_text())
    done = out / "heads" / "summary.json"
    parts["heads"] = json.loads(done.read_text()) if done.is_file() else _heads(m, t, out / "heads", progress, **kw)
    summary = {"kind": "patch_grid", "task": t.describe(),
               "parts": {k: str(out / k) for k in parts},
               "seconds": {k: v.get("seconds") for k, v in parts.items()},
               "top_heads": parts["heads"]["top_heads"]}
    return {**finish_run(out, summary, m), "out": str(out)}


def run_baseline(task: str = "next_day", out=None, model: str | None = None, template=None,
                 limit=None) -> dict:
    """W2 step 2: per-prompt clean and corrupt metrics (every metric, every candidate logit)."""
    from replab.patching.metrics import METRICS, Readout, metric_values

    m, t = load(model, task, template, limit)
    rows = []
    with torch.inference_mode():
        logp_clean = None
        for run, tokens in (("clean", t.clean), ("corrupt", t.corrupt)):
            final = m(tokens)[:, -1]
            lse = torch.logsumexp(final, -1)
            r = Readout(final.gather(1, t.candidates), lse, final - lse[:, None])
            logp_clean = r.logp if run == "clean" else logp_clean
            vals = {k: metric_values(k, r, logp_clean) for k in METRICS}
            for i in range(t.n_prompts):
                rows.append({"prompt_id": i, "run": run,
                             "prompt": (t.prompts if run == "clean" else t.corrupt_prompts)[i],
                             **{k: float(v[i]) for k, v in vals.items()},
                             "candidates": [m.tokenizer.decode([c]) for c in t.candidates[i].tolist()],
                             "candidate_logits": r.cand[i].tolist()})
    table = pd.DataFrame(rows)
    out = start_run(Path(out or "runs/patch-baseline"))
    files = write_table(table, out, "baseline")
    means = table.groupby("run")[list(METRICS)].mean()
    summary = {"kind": "patch_baseline", "task": t.describe(), "files": files,
               "mean": {run: means.loc[run].to_dict() for run in means.index},
               "frac_clean_positive_logit_diff": float((table[table.run == "clean"]["logit_diff"] > 0).mean())}
    return {**finish_run(out, summary, m), "out": str(out)}


def run_dla(task: str = "next_day", out=None, model: str | None = None, template=None,
            limit=None, top: int = 6) -> dict:
    """W2 step 3: DLA tables (accumulated, per layer, per head) and figures."""
    from replab.patching.logit_attribution import dla, top_heads
    from replab.patching.plots import dla_layers, dla_line, save_figure, sweep_heatmap

    m, t = load(model, task, template, limit)
    res = dla(m, t)
    out = start_run(Path(out or "runs/dla"))
    files = []
    for name, df in res.items():
        files += write_table(df, out, f"dla_{name}")
    files += save_figure(dla_line(res["accumulated"], f"accumulated residual → logit diff, {t.name}"),
                         out / "dla_accumulated")
    lay = res["layers"][res["layers"]["component"].isin(["attn", "mlp"])]
    files += save_figure(dla_layers(lay, f"direct logit attribution per layer, {t.name}"), out / "dla_layers")
    heads = res["heads"].groupby(["layer", "head"], as_index=False)["logit_diff"].mean()
    grid = heads.rename(columns={"logit_diff": "dla"}).assign(position=None, query_heads=None)
    files += save_figure(sweep_heatmap(grid, f"direct logit attribution per head, {t.name}", value="dla"),
                         out / "dla_heads")
    tops = top_heads(res["heads"], top)
    summary = {"kind": "dla", "task": t.describe(), "files": files,
               "max_abs_sum_error": float(res["check"]["abs_error"].max()),
               "logit_diff_mean": float(res["check"]["logit_diff"].mean()),
               "top_heads": tops.to_dict("records"),
               "approximation": "final-norm scale frozen at the forward pass's value (exactly additive)"}
    return {**finish_run(out, summary, m), "out": str(out)}


def run_atp(task: str = "next_day", out=None, model: str | None = None, template=None,
            limit=None, top: int = 20, all_heads: bool = True) -> dict:
    """AtP for every head / attention layer / MLP / neuron, exact patching of the top ones."""
    from replab.patching.attribution import atp_with_exact

    m, t = load(model, task, template, limit)
    table, summary = atp_with_exact(m, t, top=top, all_heads=all_heads)
    out = start_run(Path(out or "runs/atp"))
    files = write_table(table, out, "atp")
    files += _atp_figure(table, out, t.name)
    summary = {"kind": "atp", "task": t.describe(), "files": files, "top": top, **summary,
               "top_components": table.head(top)[["component", "atp_effect", "exact_effect"]].to_dict("records")}
    return {**finish_run(out, summary, m), "out": str(out)}


def _atp_figure(table: pd.DataFrame, out: Path, name: str) -> list[str]:
    from replab._figures import pyplot
    from replab.patching.plots import save_figure

    plt = pyplot()
    done = table[table["exact_effect"].notna()]
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for kind, sub in done.groupby("kind"):
        ax.scatter(sub["exact_effect"], sub["atp_effect"], s=14, alpha=0.75, label=kind)
    lo = float(min(done["exact_effect"].min(), done["atp_effect"].min(), 0)) - 0.05
    hi = float(max(done["exact_effect"].max(), done["atp_effect"].max(), 0)) + 0.05
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.7, ls="--")
    ax.set_xlabel("exact patching: normalised effect")
    ax.set_ylabel("attribution patching estimate")
    ax.set_title(f"AtP vs exact activation patching, {name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out / "atp_vs_exact")


def run_patterns(task: str = "next_day", heads: str | None = None, from_dir=None, top: int = 9,
                 out=None, model: str | None = None, template=None, limit=None) -> dict:
    """W2 steps 4 and 6: attention patterns (averaged over the clean prompts) of chosen heads,
    or of the ``top`` heads of a head sweep / DLA run, grouped into early/middle/late layers."""
    from replab.patching.plots import attention_patterns, save_figure

    m, t = load(model, task, template, limit)
    L, H = m.cfg.n_layers, m.cfg.n_heads
    chosen, notes = (parse_head_list(heads, L, H), {}) if heads else _top_from(from_dir, top)
    for layer, h in chosen:
        check_head(layer, h, L, H)
    names = {f"blocks.{layer}.attn.hook_pattern" for layer, _ in chosen}
    with torch.inference_mode():
        _, cache = m.run_with_cache(t.clean, names_filter=lambda n: n in names)
    third = lambda layer: layer_group(layer, L)  # noqa: E731
    pats, groups, rows = {}, {}, []
    for layer, h in sorted(chosen):
        p = cache[f"blocks.{layer}.attn.hook_pattern"][:, h].mean(0).cpu().numpy()
        key = f"L{layer}H{h}"
        pats[key], groups[key] = p, third(layer)
        last = p[-1]
        top_src = int(np.argmax(last))
        rows.append({"head": key, "layer": layer, "index": h, "group": third(layer),
                     "selected_by": notes.get(key),
                     "last_attends_to": f"{top_src}:{t.str_tokens[top_src]}", "weight": float(last[top_src])})
    out = start_run(Path(out or "runs/patterns"))
    table = pd.DataFrame(rows)
    files = write_table(table, out, "heads")
    files += save_figure(attention_patterns(pats, t.str_tokens, f"attention patterns, {t.name} "
                                            "(mean over clean prompts)", groups, notes), out / "patterns")
    summary = {"kind": "attention_patterns", "task": t.describe(), "files": files,
               "heads": table.to_dict("records"), "groups": layer_groups(L)}
    return {**finish_run(out, summary, m), "out": str(out)}


GROUPS = ("early", "middle", "late")


def layer_group(layer: int, n_layers: int) -> str:
    """W2 step 6: ``early``, ``middle`` or ``late``: the third of the network ``layer`` is in."""
    return GROUPS[min(2, layer * 3 // n_layers)]


def layer_groups(n_layers: int) -> dict[str, list[int]]:
    """``{group: [first layer, last layer]}`` of :func:`layer_group` (a group may be empty: absent)."""
    out: dict[str, list[int]] = {}
    for layer in range(n_layers):
        g = out.setdefault(layer_group(layer, n_layers), [layer, layer])
        g[1] = layer
    return out


def _top_from(from_dir, top: int) -> tuple[list[tuple[int, int]], dict[str, str]]:
    """Heads to show, and a note per head saying why. From a DLA run: the ``top`` most
    positive *and* the ``top`` most negative heads by mean direct effect (W2 step 4); from a
    head sweep: the ``top`` heads by |normalised effect| of output (z) patching."""
    from replab.patching.logit_attribution import top_heads

    if from_dir is None:
        raise ReplabError("give --heads or --from (a `patch heads`, `patch sweep` or `attribute dla` run)")
    d = Path(from_dir)
    if not d.is_dir():
        raise ReplabError(f"--from {from_dir} is not a run directory")
    dla_file = inside(d, "dla_heads.parquet", "DLA table")
    if dla_file.is_file():
        tops = top_heads(read_table(dla_file, "DLA table"), top)
        return ([(int(r.layer), int(r.head)) for r in tops.itertuples()],
                {f"L{int(r.layer)}H{int(r.head)}": f"DLA {r.logit_diff:+.2f} ({r.sign})" for r in tops.itertuples()})
    for name in ("z/sweep.parquet", "heads/z/sweep.parquet", "sweep.parquet"):
        cand = inside(d, name, "sweep table")
        if cand.is_file():
            df = read_table(cand, "sweep table")
            if "head" not in df or df["head"].isna().all():
                continue
            df = df.groupby(["layer", "head"], as_index=False)["normalized_effect"].mean()
            df = df.reindex(df["normalized_effect"].abs().sort_values(ascending=False).index).head(top)
            return ([(int(r.layer), int(r.head)) for r in df.itertuples()],
                    {f"L{int(r.layer)}H{int(r.head)}": f"patch effect {r.normalized_effect:+.2f}"
                     for r in df.itertuples()})
    raise ReplabError(f"{from_dir} has no per-head results (sweep.parquet or dla_heads.parquet)")


def test_prompt(prompt: str, answer: str | None = None, k: int = 10, model: str | None = None) -> dict:
    """W2 step 1: the top-k next tokens with logits and probabilities, and the answer's rank."""
    from replab.models.coerce import as_model
    from replab.prompts import answer_ids, token_ids

    if not prompt:
        raise ReplabError("empty prompt")
    m = as_model(model)
    ids = token_ids(m.tokenizer, prompt, bool(m.cfg.default_prepend_bos))
    with torch.inference_mode():
        logits = m(torch.tensor([ids]))[0, -1]
    probs = logits.softmax(-1)
    top = torch.topk(logits, k)
    rows = [{"rank": i + 1, "token": m.tokenizer.decode([int(t)]), "token_id": int(t),
             "logit": float(logits[t]), "prob": float(probs[t])} for i, t in enumerate(top.indices)]
    out = {"prompt": prompt, "n_tokens": len(ids), "top": rows}
    if answer:
        a = answer_ids(m.tokenizer, answer)[0]
        out["answer"] = {"token": m.tokenizer.decode([a]), "token_id": a, "logit": float(logits[a]),
                         "prob": float(probs[a]), "rank": int((logits > logits[a]).sum()) + 1}
    return out

"""``replab run next-day`` (W2): how does the model know that tomorrow follows today?

Stages, one per step of W2 (docs/workflows.md), each a call of :mod:`replab.patching.runs`
(what ``replab test-prompt``, ``replab patch ...`` and ``replab attribute ...`` call):

1. ``test_prompt``: the top-k next tokens of one prompt and the answer's rank (``test_prompt``);
2. ``logit_diff``: per-prompt clean and corrupt logit differences (``run_baseline``);
3. ``dla``: direct logit attribution: accumulated residual, per layer, per head (``run_dla``);
4. ``dla_patterns``: attention patterns of the top positive and negative DLA heads (``run_patterns``);
5. ``patching_grid``: residual / attention / MLP layer × position sweeps and head output,
   value and pattern sweeps with the scatters (``run_grid``);
6. ``patterns``: the top heads of the grid grouped into early, middle and late layers (``run_patterns``);
7. ``atp``: attribution patching next to exact patching, as a cross-check (``run_atp``).
"""

from __future__ import annotations

import json
import shlex

import pandas as pd

from replab.experiments.report import text
from replab.experiments.spec import Experiment, Section, Stage, png_figures, rel
from replab.patching.runs import run_atp, run_baseline, run_dla, run_grid, run_patterns, test_prompt
from replab.rundir import write_table

DEFAULTS = {
    "task": "next_day",            # a patching task (clean/corrupt pairs with answer and foil)
    "template": None,              # None: the task's default template (next_day: today_tomorrow)
    "limit": None,                 # first N prompts (None: all)
    "prompt": "Today it is Monday so tomorrow it is",
    "answer": " Tuesday",
    "top_k": 10,
    "dla_top": 3,                  # top positive and top negative DLA heads whose patterns are shown
    "direction": "denoise",        # patching grid: clean into corrupt (0 = corrupt, 1 = clean)
    "grid_layers": "all",
    "pattern_top": 9,              # heads of the grid (by |output-patch effect|) shown early/middle/late
    "atp_top": 20,                 # components per kind patched exactly next to their AtP estimate
    "atp_all_heads": True,         # also patch every head exactly (Spearman over all heads)
}
QUICK = {"limit": 3, "top_k": 5, "dla_top": 2, "grid_layers": "22-", "pattern_top": 4, "atp_top": 3,
         "atp_all_heads": False}

TASK_KEYS = ("task", "template", "limit")


def _cmd(ctx, *args, task: bool = True, out: bool = True) -> str:
    c = ctx.config
    parts = ["replab", *args]
    if task:
        parts += ["--task", c["task"]] + (["--template", c["template"]] if c["template"] else []) \
            + (["--limit", str(c["limit"])] if c["limit"] is not None else [])
    if ctx.model_name:
        parts += ["--model", str(ctx.model_name)]
    if out:
        parts += ["--out", str(ctx.out)]
    return shlex.join(parts)


def _task_kw(ctx) -> dict:
    c = ctx.config
    return {"model": ctx.model, "template": c["template"], "limit": c["limit"]}


def step_test_prompt(ctx) -> dict:
    c = ctx.config
    r = test_prompt(c["prompt"], c["answer"], c["top_k"], ctx.model)
    write_table(pd.DataFrame(r["top"]), ctx.out, "top_k")
    a, top = r["answer"], r["top"][0]
    return {"prompt": c["prompt"], "answer": a["token"], "answer_rank": a["rank"], "answer_logit": a["logit"],
            "answer_prob": a["prob"], "top1_token": top["token"], "top1_prob": top["prob"],
            "top": [{"rank": t["rank"], "token": repr(t["token"]), "logit": round(t["logit"], 3),
                     "prob": round(t["prob"], 4)} for t in r["top"]],
            "command": _cmd(ctx, "test-prompt", c["prompt"], c["answer"], "--top-k", str(c["top_k"]), task=False,
                            out=False)}


def step_logit_diff(ctx) -> dict:
    s = run_baseline(ctx.config["task"], out=ctx.out, **_task_kw(ctx))
    t = pd.read_parquet(ctx.out / "baseline.parquet")
    clean = t[t["run"] == "clean"]
    return {"n_prompts": s["task"]["n_prompts"], "task_name": s["task"]["name"],
            "logit_diff_clean": s["mean"]["clean"]["logit_diff"],
            "logit_diff_corrupt": s["mean"]["corrupt"]["logit_diff"],
            "answer_prob_clean": s["mean"]["clean"]["prob"],
            "frac_clean_positive": s["frac_clean_positive_logit_diff"],
            "per_prompt": [{"prompt": r.prompt, "logit_diff": round(r.logit_diff, 3), "answer_prob": round(r.prob, 3)}
                           for r in clean.itertuples()],
            "command": _cmd(ctx, "patch", "baseline")}


def step_dla(ctx) -> dict:
    s = run_dla(ctx.config["task"], out=ctx.out, top=ctx.config["dla_top"], **_task_kw(ctx))
    layers = pd.read_parquet(ctx.out / "dla_layers.parquet")
    per_layer = layers.groupby(["layer", "component"], as_index=False)["logit_diff"].mean()
    blocks = per_layer[per_layer["component"].isin(["attn", "mlp"])].sort_values("logit_diff")
    acc = pd.read_parquet(ctx.out / "dla_accumulated.parquet")
    curve = acc[acc["run"] == "clean"].groupby(["depth", "point"], as_index=False)["logit_diff"].mean()
    final = float(curve["logit_diff"].iloc[-1])
    # the first point of the curve from which the accumulated logit difference stays above half its final value
    above = (curve["logit_diff"] > final / 2).tolist() if final > 0 else [False] * len(curve)
    half = next((i for i in range(len(above)) if all(above[i:])), None)
    tops = s["top_heads"]
    pos = [h for h in tops if h["sign"] == "positive"]
    neg = [h for h in tops if h["sign"] == "negative"]
    name = lambda h: f"L{h['layer']}H{h['head']}"  # noqa: E731
    return {"logit_diff_mean": s["logit_diff_mean"], "max_abs_sum_error": s["max_abs_sum_error"],
            "sum_of_layer_components": float(per_layer["logit_diff"].sum()),
            "final_accumulated": final, "half_point": None if half is None else _point(curve["point"].iloc[half]),
            "top_block": f"L{int(blocks.iloc[-1].layer)} {blocks.iloc[-1].component}",
            "top_block_dla": float(blocks.iloc[-1].logit_diff),
            "bottom_block": f"L{int(blocks.iloc[0].layer)} {blocks.iloc[0].component}",
            "bottom_block_dla": float(blocks.iloc[0].logit_diff),
            "top_head": name(pos[0]) if pos else None, "top_head_dla": pos[0]["logit_diff"] if pos else None,
            "bottom_head": name(neg[0]) if neg else None, "bottom_head_dla": neg[0]["logit_diff"] if neg else None,
            "top_heads": [{"head": name(h), "dla": round(h["logit_diff"], 4), "sign": h["sign"]} for h in tops],
            "figures": png_figures(ctx, s["files"]),
            "command": _cmd(ctx, "attribute", "dla", "--top", str(ctx.config["dla_top"]))}


def _point(point: str) -> str:
    """A point of the accumulated-residual curve in words (``23_mid``: after layer 23's attention)."""
    if point == "final_post":
        return "the final residual stream"
    layer, _, where = point.partition("_")
    return f"the start of layer {layer}" if where == "pre" else f"layer {layer}, after its attention"


def _patterns(ctx, from_stage: str, top: int) -> dict:
    src = ctx.run_dir / from_stage
    s = run_patterns(ctx.config["task"], from_dir=src, top=top, out=ctx.out, **_task_kw(ctx))
    heads = [{"head": h["head"], "group": h["group"], "selected_by": h["selected_by"],
              "last_attends_to": h["last_attends_to"], "weight": round(h["weight"], 3)} for h in s["heads"]]
    counts = {g: sum(h["group"] == g for h in heads) for g in ("early", "middle", "late")}
    return {"heads": heads, "n_heads": len(heads), "groups": s["groups"], "counts": counts,
            "figures": png_figures(ctx, s["files"]),
            "command": _cmd(ctx, "patch", "patterns", "--from", str(src), "--top", str(top))}


def step_dla_patterns(ctx) -> dict:
    r = _patterns(ctx, "dla", ctx.config["dla_top"])
    by = {h["head"]: h for h in r["heads"]}
    d = ctx.results["dla"]
    for key in ("top_head", "bottom_head"):
        h = by.get(d[key]) if d[key] else None
        r[f"{key}_attends_to"] = h["last_attends_to"] if h else None
        r[f"{key}_weight"] = h["weight"] if h else None
    return r


def _best_cell(table: pd.DataFrame) -> dict:
    r = table.loc[table["normalized_effect"].idxmax()]
    return {"layer": int(r["layer"]), "token": str(r["token"]), "effect": float(r["normalized_effect"])}


def step_grid(ctx) -> dict:
    c = ctx.config
    kw = {} if c["grid_layers"] == "all" else {"layers": c["grid_layers"]}
    s = run_grid(c["task"], out=ctx.out, progress=ctx.progress, direction=c["direction"], **kw, **_task_kw(ctx))
    out, parts, checks = ctx.out, {}, {}
    for site in ("resid_pre", "attn_out", "mlp_out"):
        t = pd.read_parquet(out / site / "sweep.parquet")
        parts[site] = _best_cell(t[t["layer"] == t["layer"].min()] if site == "resid_pre" else t)
        checks[site] = _checks(out / site)
    for site in ("z", "v", "pattern"):
        t = pd.read_parquet(out / "heads" / site / "sweep.parquet")
        r = t.loc[t["normalized_effect"].abs().idxmax()]
        parts[f"head_{site}"] = {"component": str(r["component"]), "effect": float(r["normalized_effect"])}
        checks[f"head_{site}"] = _checks(out / "heads" / site)
    resid = pd.read_parquet(out / "resid_pre" / "sweep.parquet")
    last = int(resid["position"].max())
    argmax = resid.loc[resid.groupby("layer")["normalized_effect"].idxmax()]
    moved = argmax[argmax["position"] == last]["layer"]
    full = [ch["engine_full"]["value"] for ch in checks.values()]
    empty = [abs(ch["engine_empty"]["value"] - ch["engine_empty"]["expected"]) for ch in checks.values()]
    first = s["top_heads"][0]
    figs = [f"{site}/heatmap.png" for site in ("resid_pre", "attn_out", "mlp_out")] + \
        [f"heads/{site}/heatmap.png" for site in ("z", "v", "pattern")] + \
        ["heads/scatter_z_vs_v.png", "heads/scatter_z_vs_pattern.png"]
    base = _summary(out / "resid_pre")
    return {"direction": c["direction"], "clean_metric": base["clean_metric"], "corrupt_metric": base["corrupt_metric"],
            "full_patch_min": min(full), "full_patch_max": max(full), "empty_patch_max_error": max(empty),
            "all_checks_ok": all(x["ok"] for ch in checks.values() for x in ch.values()),
            "expected_full": 1.0 if c["direction"] == "denoise" else 0.0,
            "best": parts, "last_position_from_layer": int(moved.min()) if len(moved) else None,
            "top_head": f"L{first['layer']}H{first['head']}", "top_head_effect": first["normalized_effect"],
            "top_heads": [{"head": f"L{h['layer']}H{h['head']}",
                           "output_patch_effect": round(h["normalized_effect"], 3)} for h in s["top_heads"]],
            "figures": [rel(out / f, ctx.run_dir) for f in figs],
            "command": _cmd(ctx, "patch", "grid", "--direction", c["direction"])
            + (f" --layers={c['grid_layers']}" if c["grid_layers"] != "all" else "")}


def _summary(d) -> dict:
    return json.loads((d / "summary.json").read_text())


def _checks(d) -> dict:
    return {k: {"value": v["value"], "expected": v["expected"], "ok": v["ok"]}
            for k, v in _summary(d)["checks"].items()}


def step_patterns(ctx) -> dict:
    return _patterns(ctx, "patching_grid", ctx.config["pattern_top"])


def step_atp(ctx) -> dict:
    c = ctx.config
    s = run_atp(c["task"], out=ctx.out, top=c["atp_top"], all_heads=c["atp_all_heads"], **_task_kw(ctx))
    return {"all_spearman": s["all_spearman"], "n_exact": s["n_exact"],
            "heads_spearman": s.get("heads_spearman"), "heads_compared": s.get("heads_compared"),
            "top_components": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                               for r in s["top_components"]],
            "figures": png_figures(ctx, s["files"]),
            "command": _cmd(ctx, "attribute", "atp", "--top", str(c["atp_top"]))
            + ("" if c["atp_all_heads"] else " --no-all-heads")}


STAGES = (
    Stage("test_prompt", "test prompt: top-k tokens, the answer's rank", step_test_prompt,
          ("prompt", "answer", "top_k")),
    Stage("logit_diff", "logit difference (answer − foil), clean and corrupt", step_logit_diff, TASK_KEYS),
    Stage("dla", "direct logit attribution: accumulated, per layer, per head", step_dla, (*TASK_KEYS, "dla_top")),
    Stage("dla_patterns", "attention patterns of the top ± DLA heads", step_dla_patterns, (*TASK_KEYS, "dla_top")),
    Stage("patching_grid", "patching grid: residual, attn, MLP, heads (z, v, pattern)", step_grid,
          (*TASK_KEYS, "direction", "grid_layers"), slow=True),
    Stage("patterns", "top patching heads: early / middle / late", step_patterns, (*TASK_KEYS, "pattern_top")),
    Stage("atp", "attribution patching against exact patching", step_atp, (*TASK_KEYS, "atp_top", "atp_all_heads")),
)


def headline(results: dict, config: dict) -> dict:
    tp, ld, d, g, a = (results[k] for k in ("test_prompt", "logit_diff", "dla", "patching_grid", "atp"))
    return {"answer_prob": tp["answer_prob"], "answer_rank": tp["answer_rank"],
            "logit_diff_clean": ld["logit_diff_clean"], "logit_diff_corrupt": ld["logit_diff_corrupt"],
            "dla_top_head": d["top_head"], "dla_top_head_value": d["top_head_dla"],
            "dla_sum_error": d["max_abs_sum_error"],
            "patch_top_head": g["top_head"], "patch_top_head_effect": g["top_head_effect"],
            "atp_spearman": a["all_spearman"]}


def narrative(s: dict) -> list[Section]:
    st = s["stages"]
    tp, ld, d, dp, g, pt, a = (st[k] for k in ("test_prompt", "logit_diff", "dla", "dla_patterns", "patching_grid",
                                               "patterns", "atp"))
    out = []
    if tp["answer_rank"] == 1:
        first = text("On “{stages.test_prompt.prompt}” the model puts {stages.test_prompt.answer_prob:.0%} on the "
                     "answer {stages.test_prompt.answer} (rank 1, logit {stages.test_prompt.answer_logit:.2f}).", s)
    else:
        first = text("On “{stages.test_prompt.prompt}” the model does not give the answer first: "
                     "{stages.test_prompt.answer} has rank {stages.test_prompt.answer_rank} (probability "
                     "{stages.test_prompt.answer_prob:.1%}); its top token is {stages.test_prompt.top1_token} "
                     "({stages.test_prompt.top1_prob:.0%}).", s)
    out.append(Section("Test prompt", [first], tables=[("top tokens", tp["top"])], command=tp["command"]))

    paras = [text("Over the {stages.logit_diff.n_prompts} prompts of {stages.logit_diff.task_name}, the mean logit "
                  "difference (answer − foil) is {stages.logit_diff.logit_diff_clean:.2f} on the clean prompts and "
                  "{stages.logit_diff.logit_diff_corrupt:.2f} on the corrupted ones, whose day is swapped so that "
                  "answer and foil trade places. The clean prompts put the answer above the foil in "
                  "{stages.logit_diff.frac_clean_positive:.0%} of the prompts, with a mean probability of "
                  "{stages.logit_diff.answer_prob_clean:.0%} on the answer.", s)]
    if ld["logit_diff_clean"] <= 0:
        paras.append(text("On average the model does not prefer the answer: the analyses below explain a behaviour "
                          "it does not reliably have.", s))
    if ld["logit_diff_corrupt"] >= ld["logit_diff_clean"]:
        paras.append(text("The corruption does not lower the logit difference, so the normalised patching effects "
                          "below (0 = corrupt, 1 = clean) are not meaningful.", s))
    out.append(Section("Logit difference", paras, tables=[("clean prompts", ld["per_prompt"])],
                       command=ld["command"]))

    paras = [text("The direct contributions of the embedding, every attention layer and every MLP to the final "
                  "residual stream sum to the model's logit difference within {stages.dla.max_abs_sum_error:.1e} "
                  "(mean {stages.dla.logit_diff_mean:.3f}; the baseline's independent forward pass gives "
                  "{stages.logit_diff.logit_diff_clean:.3f}).", s)]
    if d["half_point"] is not None:
        paras.append(text("Projected on the logit-difference direction after the final norm, the accumulated "
                          "residual stream stays above half of its final value ({stages.dla.final_accumulated:.2f}) "
                          "from {stages.dla.half_point} on.", s))
    else:
        paras.append(text("Projected on the logit-difference direction after the final norm, the accumulated "
                          "residual stream ends at {stages.dla.final_accumulated:.2f} and never settles above half "
                          "of it.", s))
    paras.append(text("Per block, the largest direct contribution is {stages.dla.top_block} "
                      "({stages.dla.top_block_dla:+.2f}) and the most negative {stages.dla.bottom_block} "
                      "({stages.dla.bottom_block_dla:+.2f}).", s))
    if d["top_head"] is not None and d["bottom_head"] is not None:
        paras.append(text("DLA: the top head {stages.dla.top_head} writes {stages.dla.top_head_dla:+.2f} to the "
                          "logit difference; the most negative head, {stages.dla.bottom_head}, writes "
                          "{stages.dla.bottom_head_dla:+.2f}.", s))
    out.append(Section("Direct logit attribution", paras, d["figures"], [("top and bottom heads", d["top_heads"])],
                       command=d["command"]))

    paras = []
    for key, what in (("top_head", "the top positive head"), ("bottom_head", "the most negative head")):
        if dp.get(f"{key}_attends_to") is not None:
            paras.append(text(f"From the last token, {what} {{stages.dla.{key}}} attends most to "
                              f"“{{stages.dla_patterns.{key}_attends_to}}” (weight "
                              f"{{stages.dla_patterns.{key}_weight:.2f}}).", s))
    out.append(Section("Attention patterns of the top DLA heads", paras, dp["figures"],
                       [("heads (mean pattern over the clean prompts)", dp["heads"])], command=dp["command"]))

    what = ("the clean run's activation patched into the corrupted run" if g["direction"] == "denoise"
            else "the corrupted run's activation patched into the clean run")
    paras = [text(f"Activation patching, {what}, normalised so that 0 = corrupted and 1 = clean. Sanity checks in "
                  "every sweep: patching the whole residual stream gives {stages.patching_grid.full_patch_min:.4f}–"
                  "{stages.patching_grid.full_patch_max:.4f} (expected {stages.patching_grid.expected_full}) and the "
                  "empty patch reproduces the base run within {stages.patching_grid.empty_patch_max_error:.1e}.", s)]
    moved = ("; the last position carries the largest effect from layer "
             "{stages.patching_grid.last_position_from_layer} on" if g["last_position_from_layer"] is not None
             else "; the last position never carries the largest effect of its layer")
    cell = "layer {stages.patching_grid.best.%s.layer}, “{stages.patching_grid.best.%s.token}” " \
        "({stages.patching_grid.best.%s.effect:.2f})"
    paras.append(text("In the residual stream at the grid's first layer ({stages.patching_grid.best.resid_pre.layer}) "
                      "the largest effect is at “{stages.patching_grid.best.resid_pre.token}” "
                      "({stages.patching_grid.best.resid_pre.effect:.2f})" + moved + ". Attention output: largest "
                      "at " + cell % (("attn_out",) * 3) + "; MLP output: " + cell % (("mlp_out",) * 3) + ".", s))
    paras.append(text("Head output patching singles out {stages.patching_grid.top_head} "
                      "({stages.patching_grid.top_head_effect:.2f}); value patching (per KV head) "
                      "{stages.patching_grid.best.head_v.component} ({stages.patching_grid.best.head_v.effect:.2f}); "
                      "pattern patching {stages.patching_grid.best.head_pattern.component} "
                      "({stages.patching_grid.best.head_pattern.effect:.2f}).", s))
    out.append(Section("Activation patching grid", paras, g["figures"], [("top heads by |output-patch effect|",
                                                                          g["top_heads"])], command=g["command"]))

    parts = [f"{{stages.patterns.counts.{grp}}} {grp} (layers {{stages.patterns.groups.{grp}.0}}–"
             f"{{stages.patterns.groups.{grp}.1}})" for grp in ("early", "middle", "late") if grp in pt["groups"]]
    paras = [text("Of the top {stages.patterns.n_heads} heads by |output-patch effect|, " + ", ".join(parts) + ".", s)]
    out.append(Section("Early, middle and late heads", paras, pt["figures"], [("heads", pt["heads"])],
                       command=pt["command"]))

    paras = [text("Attribution patching (one forward and backward pass) ranks the {stages.atp.n_exact} components "
                  "that were also patched exactly with Spearman {stages.atp.all_spearman:.3f} against exact patching"
                  + ("; over {stages.atp.heads_compared} heads, {stages.atp.heads_spearman:.3f}."
                     if a["heads_spearman"] is not None else "."), s)]
    if a["all_spearman"] < 0.8:
        paras.append(text("That is below 0.8: trust the exact patching numbers above, not the gradient estimate.", s))
    out.append(Section("Attribution patching (cross-check)", paras, a["figures"],
                       [("top components", a["top_components"])], command=a["command"]))
    return out


EXPERIMENT = Experiment(
    name="next-day", workflow="W2", title="How does the model know that tomorrow follows today?",
    description="Test prompt, logit difference, DLA per layer and head, attention patterns of the top heads, the "
                "patching grid with scatters, early/middle/late heads, and AtP against exact patching.",
    defaults=DEFAULTS, quick=QUICK, stages=STAGES, headline=headline, narrative=narrative)

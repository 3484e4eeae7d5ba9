"""``replab run fact-recall`` (W1): which heads and MLPs recall this fact, and which weights to edit.

Stages, one per step of W1 (docs/workflows.md), each the step function of the component report
(:mod:`replab.circuits.report`, what ``replab circuit report`` runs in one go):

1. ``answer_check``: the target's logit, probability and rank (``build_setup`` + ``answer_check``);
2. ``broad_patching``: every head's ``z`` and every MLP's ``post`` corrupted (``patch_units`` of
   ``component_units``, three sanity checks in the same batch);
3. ``refinement``: the top components' KV-head ``v`` and MLP ``pre`` (``patch_units`` of
   ``refine_units``) against their output stage (``compare_stages``);
4. ``evidence``: mean |activation| at the final position and gradient norms on the Hugging Face
   model (``mean_abs_activations``, ``gradient_evidence``);
5. ``ranked_report``: the ranked candidates with their exact parameter names and the LoRA
   ``target_modules`` (``rank_components``, ``build_report``), written as ``replab circuit
   report``'s run directory (``write_component_report``).

Each stage re-derives the prompt's setup (one tokenisation; a forward for ``mean`` corruption)
and reads earlier stages' tables from their directories.
"""

from __future__ import annotations

import json
import shlex

import pandas as pd

from replab.circuits.report import (
    answer_check,
    build_setup,
    compare_stages,
    rank_components,
)
from replab.circuits.report import build_report as _build_report
from replab.circuits.report_evidence import gradient_evidence, mean_abs_activations
from replab.circuits.report_files import (
    drops_figure,
    grad_norms_figure,
    load_rows,
    stages_figure,
    write_component_report,
)
from replab.circuits.report_patching import check_options, component_units, patch_units, refine_units, unit_name
from replab.experiments.report import text
from replab.experiments.spec import Experiment, Section, Stage, png_figures, rel
from replab.hooks import parse_layers
from replab.io import write_json_atomic
from replab.rundir import write_table

DEFAULTS = {
    "dataset": "fact_recall",      # a prompt set (builtin name or file): prompt, answer, optionally corrupt_prompt
    "prompt_index": 0,             # which prompt of the set
    "corruption": "other-prompt",  # other-prompt | zero | mean (each gives a different answer; recorded)
    "scoring": "first_token",      # first_token (the target's first-token logit) | sum_logprob
    "layers": "all",               # patch only these layers' heads and MLPs (gradients cover every layer)
    "top": 10,                     # components refined and reported as candidates
}
QUICK = {"layers": "24-", "top": 5}

SETUP_KEYS = ("dataset", "prompt_index", "corruption", "scoring")


def _setup(ctx):
    """The prompt's setup and answer check, built once per run (every stage reads them; a resumed
    run builds them in its first stage)."""
    if "fact_recall" not in ctx.memo:
        c = ctx.config
        check_options(c["corruption"], c["scoring"])
        m = ctx.model
        rows, name = load_rows(c["dataset"], None, m.tokenizer, bool(m.cfg.default_prepend_bos))
        setup, prompt, answer = build_setup(m, rows, c["prompt_index"], c["corruption"])
        ctx.memo["fact_recall"] = (setup, prompt, answer, name, answer_check(m, setup))
    return ctx.memo["fact_recall"]


def _report_cmd(ctx) -> str:
    c = ctx.config
    parts = ["replab", "circuit", "report", "--dataset", c["dataset"], "--prompt-index", str(c["prompt_index"]),
             "--corruption", c["corruption"], "--scoring", c["scoring"], "--top", str(c["top"])]
    parts += [f"--layers={c['layers']}"] if c["layers"] != "all" else []
    parts += ["--model", str(ctx.model_name)] if ctx.model_name else []
    return shlex.join(parts + ["--out", str(ctx.out)])


def _metric(c: dict) -> str:
    return "logit" if c["scoring"] == "first_token" else "sum_logprob"


def step_answer_check(ctx) -> dict:
    setup, prompt, answer, name, chk = _setup(ctx)
    write_table(pd.DataFrame(chk["top5"]), ctx.out, "top5")
    tok = ctx.model.tokenizer
    parts = ["replab", "test-prompt", prompt, answer, "--top-k", "5"] + \
        (["--model", str(ctx.model_name)] if ctx.model_name else [])
    return {"prompt": prompt, "answer": answer, "dataset": name,
            "target_tokens": [tok.decode([t]) for t in setup.target_ids],
            "logit": chk["logit"], "prob": chk["prob"], "logprob": chk["logprob"], "rank": chk["rank"],
            "sum_logprob": chk["sum_logprob"], "top1": chk["top5"][0]["token"],
            "top5": [{"token": repr(t["token"]), "logit": round(t["logit"], 3)} for t in chk["top5"]],
            "corruption": setup.corruption, "corrupt_prompt": setup.corrupt_prompt,
            "corrupt_source": setup.corrupt_source,
            "n_mean_prompts": setup.n_mean or None, "command": shlex.join(parts)}


def step_broad(ctx) -> dict:
    c = ctx.config
    setup, prompt, answer, _, chk = _setup(ctx)
    p = patch_units(ctx.model, setup, component_units(ctx.model, c["layers"]), chk, c["scoring"])
    write_table(p.table, ctx.out, "drops")
    figs = drops_figure(p.table, ctx.out / "drops", f"{prompt!r} → {answer!r}: drop in target {_metric(c)} "
                        f"({c['corruption']} corruption)")
    t = p.table.sort_values("drop", ascending=False)
    top = t.head(c["top"])
    heads, mlps = t[t["kind"] == "head"], t[t["kind"] == "mlp"]
    lays = parse_layers(c["layers"], ctx.model.cfg.n_layers)
    return {"metric": _metric(c), "clean": p.clean, "fully_corrupted": p.full, "full_drop": p.clean - p.full,
            "checks": p.checks, "all_checks_ok": all(x["ok"] for x in p.checks.values()),
            "max_check_error": max(x["abs_error"] for x in p.checks.values()),
            "n_components": len(t), "first_layer": lays[0], "last_layer": lays[-1],
            "top_component": str(top.iloc[0]["component"]), "top_drop": float(top.iloc[0]["drop"]),
            "top_normalized_drop": _f(top.iloc[0]["normalized_drop"]),
            "top_head": str(heads.iloc[0]["component"]), "top_head_drop": float(heads.iloc[0]["drop"]),
            "top_mlp": str(mlps.iloc[0]["component"]), "top_mlp_drop": float(mlps.iloc[0]["drop"]),
            "n_top": len(top), "n_mlps_in_top": int((top["kind"] == "mlp").sum()),
            "top": [{"component": r.component, "drop": round(r.drop, 4), "normalized_drop": _r(r.normalized_drop)}
                    for r in top.itertuples()],
            "figures": png_figures(ctx, figs), "command": _report_cmd(ctx)}


def step_refine(ctx) -> dict:
    c = ctx.config
    setup, prompt, answer, _, chk = _setup(ctx)
    drops = pd.read_parquet(ctx.run_dir / "broad_patching" / "drops.parquet")
    top = drops.sort_values("drop", ascending=False, kind="stable").head(c["top"])
    p = patch_units(ctx.model, setup, refine_units(ctx.model, components=list(top["component"])), chk, c["scoring"])
    write_table(p.table, ctx.out, "refined")
    cmp = compare_stages(top.reset_index(drop=True), p.table)
    write_table(cmp, ctx.out, "stages")
    figs = stages_figure(cmp, ctx.out / "stages", f"{prompt!r} → {answer!r}: output vs input stage")
    more_in = cmp["matters_more"].isin(["value (v)", "input (pre)"])
    return {"n_refined": len(p.table), "n_compared": len(cmp), "n_input_matters_more": int(more_in.sum()),
            "all_checks_ok": all(x["ok"] for x in p.checks.values()),
            "stages": [{"component": r.component, "output_drop": round(r.drop, 4), "input_unit": r.refine_unit,
                        "input_drop": _r(r.refine_drop), "matters_more": r.matters_more} for r in cmp.itertuples()],
            "figures": png_figures(ctx, figs), "command": _report_cmd(ctx)}


def step_evidence(ctx) -> dict:
    c = ctx.config
    setup, prompt, answer, _, chk = _setup(ctx)
    units = component_units(ctx.model, c["layers"])
    act = mean_abs_activations(ctx.model, setup, units)
    g = gradient_evidence(ctx.model, setup, units, chk, c["scoring"])
    names = [unit_name(*u) for u in units]
    ev = pd.DataFrame({"component": names, "kind": [u[0] for u in units], "layer": [u[1] for u in units],
                       "mean_abs_activation": act, "grad_norm": [g.component_grad_norm[n] for n in names]})
    write_table(ev, ctx.out, "evidence")
    write_table(g.grad_table, ctx.out, "grad_norms")
    write_json_atomic(ctx.out / "parameters.json", {"parameters": g.parameters, "grad_slices": g.grad_slices,
                                                    "hf_loss_equals_tl": g.check})
    figs = grad_norms_figure(g.grad_table, ctx.out / "grad_norms", f"{prompt!r} → {answer!r}: gradient norm of "
                             "the target's NLL per weight matrix")
    drops = pd.read_parquet(ctx.run_dir / "broad_patching" / "drops.parquet")[["component", "drop"]]
    both = ev.merge(drops, on="component")
    top = g.grad_table.sort_values("grad_norm", ascending=False).head(5)
    return {"hf_loss": g.check["value"], "tl_loss": g.check["expected"], "hf_loss_error": g.check["abs_error"],
            "hf_check_ok": g.check["ok"], "n_matrices": len(g.grad_table),
            "top_parameter": str(top.iloc[0]["name"]), "top_grad_norm": float(top.iloc[0]["grad_norm"]),
            "spearman_drop_grad": _f(both["drop"].corr(both["grad_norm"], method="spearman")),
            "spearman_drop_activation": _f(both["drop"].corr(both["mean_abs_activation"], method="spearman")),
            "top_parameters": [{"parameter": r.name, "grad_norm": float(f"{r.grad_norm:.4g}")}
                               for r in top.itertuples()],
            "figures": png_figures(ctx, figs), "command": _report_cmd(ctx)}


def step_report(ctx) -> dict:
    c = ctx.config
    setup, prompt, answer, name, chk = _setup(ctx)
    run = ctx.run_dir
    drops = pd.read_parquet(run / "broad_patching" / "drops.parquet")
    ev = pd.read_parquet(run / "evidence" / "evidence.parquet")[["component", "mean_abs_activation", "grad_norm"]]
    params = json.loads((run / "evidence" / "parameters.json").read_text())
    cfg = ctx.model.cfg
    group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)
    refined = pd.read_parquet(run / "refinement" / "refined.parquet")
    table, cands = rank_components(drops.merge(ev, on="component"), refined, c["top"], setup, params["parameters"],
                                   params["grad_slices"], group)
    b = ctx.results["broad_patching"]
    grad_table = pd.read_parquet(run / "evidence" / "grad_norms.parquet")
    grad_norms = dict(zip(grad_table["name"], grad_table["grad_norm"], strict=True))
    report = _build_report(ctx.model, setup, prompt, answer, c["prompt_index"], name, c["scoring"], chk, b["clean"],
                           b["fully_corrupted"], {**b["checks"], "hf_loss_equals_tl": params["hf_loss_equals_tl"]},
                           cands, grad_norms, parse_layers(c["layers"], cfg.n_layers), {})
    options = {"dataset": c["dataset"], "task": None, "prompt_index": c["prompt_index"], "corruption": c["corruption"],
               "scoring": c["scoring"], "top": c["top"], "layers": report["layers"]}
    report, _ = write_component_report(ctx.out, report, table, grad_table, ctx.model, options)
    first = cands[0]
    return {"top_candidate": first["component"], "top_candidate_score": first["evidence"]["combined_score"],
            "n_candidates": len(cands), "candidate_order": [x["component"] for x in cands],
            "n_heads_in_candidates": sum(x["evidence"]["kind"] == "head" for x in cands),
            "lora_target_modules": report["lora"]["target_modules"],
            "n_lora_modules": len(report["lora"]["target_modules"]),
            "n_parameters": len({n for x in cands for n in x["parameters"]}),
            "all_checks_ok": all(x["ok"] for x in report["checks"].values()),
            "candidates": [_candidate_row(x) for x in cands],
            "report": rel(ctx.out / "report.json", run), "command": _report_cmd(ctx)}


def _candidate_row(x: dict) -> dict:
    e = x["evidence"]
    return {"rank": x["rank"], "component": x["component"], "drop": round(e["patch"]["drop"], 4),
            "causal_rank": e["patch"]["causal_rank"], "refined_by": e["refinement"]["site"],
            "refine_drop": _r(e["refinement"]["drop"]), "matters_more": e["refinement"]["matters_more"],
            "grad_norm": float(f"{e['grad_norm']:.4g}"), "combined_score": round(e["combined_score"], 3),
            "parameters": ", ".join(n.rsplit(".", 2)[-2] for n in x["parameters"])}


def _f(x) -> float | None:
    return None if x is None or pd.isna(x) else float(x)


def _r(x, nd: int = 4) -> float | None:
    return None if x is None or pd.isna(x) else round(float(x), nd)


STAGES = (
    Stage("answer_check", "answer check: the target's logit, probability and rank", step_answer_check, SETUP_KEYS),
    Stage("broad_patching", "broad patching: every head's z and MLP's post", step_broad, ("layers", "top"), slow=True),
    Stage("refinement", "refinement: the top components' v (KV head) and MLP pre", step_refine, ("top",)),
    Stage("evidence", "evidence: mean |activation|, gradient norms (HF model)", step_evidence, ("layers",)),
    Stage("ranked_report", "ranked component report with LoRA targets", step_report, ("top",)),
)


def headline(results: dict, config: dict) -> dict:
    a, b, r = results["answer_check"], results["broad_patching"], results["ranked_report"]
    return {"target_prob": a["prob"], "target_rank": a["rank"], "full_drop": b["full_drop"],
            "top_causal_component": b["top_component"], "top_causal_drop": b["top_drop"],
            "top_candidate": r["top_candidate"], "n_lora_modules": r["n_lora_modules"]}


def _corruption_text(s: dict):
    a = s["stages"]["answer_check"]
    if a["corruption"] == "other-prompt":
        return text("The corrupted input is the prompt “{stages.answer_check.corrupt_prompt}” (source: "
                    "{stages.answer_check.corrupt_source}); zero and mean ablation give different answers, so the "
                    "report records the corruption.", s)
    if a["corruption"] == "mean":
        return text("The corruption is the mean activation over {stages.answer_check.n_mean_prompts} prompts of the "
                    "same token length; another prompt or zero ablation gives different answers.", s)
    return text("The corruption is zero ablation; another prompt or mean ablation gives different answers.", s)


def narrative(s: dict) -> list[Section]:
    st = s["stages"]
    a, b, f, e, r = (st[k] for k in ("answer_check", "broad_patching", "refinement", "evidence", "ranked_report"))
    out = []
    if a["rank"] == 1:
        first = text("The model completes “{stages.answer_check.prompt}” with {stages.answer_check.answer}: "
                     "probability {stages.answer_check.prob:.0%}, raw logit {stages.answer_check.logit:.2f}, rank 1.",
                     s)
    else:
        first = text("The model does not give the target first: after “{stages.answer_check.prompt}”, "
                     "{stages.answer_check.answer} has rank {stages.answer_check.rank} (probability "
                     "{stages.answer_check.prob}, logit {stages.answer_check.logit:.2f}) and its top token is "
                     "{stages.answer_check.top1}. The components below explain a fact the model does not recall.", s)
    out.append(Section("Answer check", [first, _corruption_text(s)], tables=[("top 5 tokens", a["top5"])],
                       command=a["command"]))

    m = b["metric"]
    paras = [text(f"Corrupting every prompt position of the layer-0 residual stream moves the target's {m} from "
                  "{stages.broad_patching.clean:.2f} to {stages.broad_patching.fully_corrupted:.2f} (a drop of "
                  "{stages.broad_patching.full_drop:.2f}). Sanity checks, in the same batch: the empty patch "
                  "reproduces the clean run, the full corruption equals an independent TransformerLens-hook forward "
                  "and a clean-into-clean patch changes nothing (largest error "
                  "{stages.broad_patching.max_check_error:.1e}).", s)]
    if b["full_drop"] <= 0:
        paras.append(text("The corruption does not lower the target, so the drops below are not evidence of recall: "
                          "choose another corruption.", s))
    norm = (", {stages.broad_patching.top_normalized_drop:.0%} of the full drop" if b["top_normalized_drop"] is not None
            else "")
    paras.append(text("Of the {stages.broad_patching.n_components} heads (z) and MLPs (post) of layers "
                      "{stages.broad_patching.first_layer}–{stages.broad_patching.last_layer}, corrupting "
                      "{stages.broad_patching.top_component} alone drops the target most "
                      "({stages.broad_patching.top_drop:.2f}" + norm + "). The top head is "
                      "{stages.broad_patching.top_head} ({stages.broad_patching.top_head_drop:.2f}), "
                      "the top MLP {stages.broad_patching.top_mlp} ({stages.broad_patching.top_mlp_drop:.2f}); "
                      "{stages.broad_patching.n_mlps_in_top} of the top {stages.broad_patching.n_top} are MLPs.", s))
    out.append(Section("Which heads and MLPs matter: broad patching (z, post)", paras, b["figures"],
                       [("largest drops", b["top"])], command=b["command"]))

    paras = [text("Refining the top {stages.refinement.n_compared} components: a head's value vectors (v, per KV head, "
                  "shared by its query heads) separate what is moved from the output projection, an MLP's gate "
                  "pre-activation (pre) its input stage from its output. The input stage matters more for "
                  "{stages.refinement.n_input_matters_more} of the {stages.refinement.n_compared}.", s)]
    out.append(Section("Refinement: value vectors and MLP inputs", paras, f["figures"],
                       [("output stage against input stage", f["stages"])], command=f["command"]))

    paras = [text("Correlational evidence: the gradient of the target's negative log-likelihood on the Hugging Face "
                  "model (exact parameter names; its loss equals the analysed model's within "
                  "{stages.evidence.hf_loss_error:.1e}) is largest for {stages.evidence.top_parameter} "
                  "({stages.evidence.top_grad_norm:.3g}) among {stages.evidence.n_matrices} weight matrices.", s)]
    if e["spearman_drop_grad"] is not None and e["spearman_drop_activation"] is not None:
        paras.append(text("Across the components, the patching drop has Spearman "
                          "{stages.evidence.spearman_drop_grad:.2f} with the gradient norm and "
                          "{stages.evidence.spearman_drop_activation:.2f} with the mean |activation| at the final "
                          "position: this evidence can reorder the causal candidates, never add one.", s))
    out.append(Section("Supporting evidence: activations and gradient norms", paras, e["figures"],
                       [("largest gradient norms", e["top_parameters"])], command=e["command"]))

    order = ", ".join(f"{{stages.ranked_report.candidate_order.{i}}}" for i in range(min(3, r["n_candidates"])))
    paras = [text("Which heads and MLPs recall this fact: the top {stages.ranked_report.n_candidates} components by "
                  "drop, ordered by 0.5 × the drop's percentile + 0.25 × the gradient norm's + 0.25 × the "
                  "activation's; " + ("the first three: " if r["n_candidates"] > 3 else "in order: ") + order + ".",
                  s),
             text("LoRA target_modules for an edit of these components ({stages.ranked_report.n_lora_modules} modules, "
                  "{stages.ranked_report.n_parameters} weight matrices): {stages.ranked_report.lora_target_modules}. "
                  + ("A head is a slice of its layer's attention matrices, so LoRA on them also edits the layer's "
                     "other heads. " if r["n_heads_in_candidates"] else "")
                  + "{stages.ranked_report.report} lists each candidate's evidence and exact parameter names.", s)]
    if not r["all_checks_ok"]:
        paras.append(text("A sanity check failed: see the checks in the report JSON.", s))
    out.append(Section("Ranked components and LoRA targets", paras, tables=[("candidates", r["candidates"])],
                       command=r["command"]))
    return out


EXPERIMENT = Experiment(
    name="fact-recall", workflow="W1", title="Which components recall this fact?",
    description="Answer check, broad z/post patching, v/pre refinement, activation and gradient-norm evidence, "
                "and the ranked component report with the LoRA target modules.",
    defaults=DEFAULTS, quick=QUICK, stages=STAGES, headline=headline, narrative=narrative)

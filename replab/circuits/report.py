"""The W1 component report: which heads and MLPs recall this fact, and which weights to edit.

>>> from replab.circuits.report import component_report
>>> rep = component_report(model, rows, prompt_index=0, corruption="other-prompt")   # doctest: +SKIP
>>> rep.report["candidates"][0]["parameters"]                                          # doctest: +SKIP

Steps (WORKFLOWS W1):

1. **Answer check**: the target's raw logit, probability and rank on the clean prompt (first
   token), and its summed teacher-forced log-probability (``scoring="sum_logprob"``).
2. **Broad patching** (:mod:`replab.circuits.report_patching`): every query head's ``z`` and every
   MLP's ``post`` replaced by its corrupted value (``other-prompt``, ``zero`` or ``mean``),
   the effect being the drop of the target's score: its first-token logit under
   ``first_token`` scoring, its summed log-probability under ``sum_logprob``.
3. **Refinement**: every KV head's ``v`` (**per KV head**: it changes what every query head
   of the group reads, so it can exceed one head's ``z`` effect) and every MLP's ``pre``
   (``blocks.L.mlp.hook_pre``; in a gated MLP such as SmolLM2's this is the gate branch
   only, the up-projection branch is not patched), in the same batched run as step 2; each
   component's table row has its input-stage number beside its output-stage number, and
   ``matters_more`` names the stage with the larger absolute drop.
4. **Supporting evidence** (correlational; :mod:`replab.circuits.report_evidence`): the mean
   absolute activation of each head's ``z`` and each MLP's ``post`` at the final prompt
   position (clean run), and the L2 norms of the gradient of the target's negative
   log-likelihood for every attention/MLP weight matrix of the Hugging Face model
   (:mod:`replab.circuits.gradients`; exact ``named_parameters()`` names). A head's own
   gradient norm uses its slices (its ``q_proj`` rows and ``o_proj`` columns; its KV head's
   ``k_proj``/``v_proj`` rows).
5. **Ranking**: the candidates are the ``top`` components by drop (the causal evidence
   selects them); they are ordered by a combined score
   ``0.5·pct(drop) + 0.25·pct(grad norm) + 0.25·pct(mean |activation|)``, where ``pct`` is
   a percentile rank in (0, 1]: for the drop, among the candidates (the largest drop gets 1);
   for the other two, among all components of the same kind (heads vs MLPs, whose
   activations and gradients are not comparable). Correlational evidence can reorder
   causally selected components, never add one.

Sanity checks run inside every report and stop it on failure: the unpatched variant equals
a plain forward; patching the whole residual stream at layer 0 equals an independent
TransformerLens-hook forward of the corrupted input; a clean-into-clean patch changes
nothing; the Hugging Face model's loss equals the TransformerLens model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from replab.circuits.report_evidence import gradient_evidence, mean_abs_activations
from replab.circuits.report_patching import (
    Setup,
    check_options,
    component_units,
    mean_activations,
    patch_units,
    refine_units,
    unit_name,
)
from replab.errors import ReplabError
from replab.hooks import parse_layers

WEIGHTS = {"drop": 0.5, "grad_norm": 0.25, "mean_abs_activation": 0.25}
RANKING = ("candidates = the top components by drop (causal); order = combined score "
           "0.5*pct(drop) + 0.25*pct(grad_norm) + 0.25*pct(mean_abs_activation), pct = percentile rank "
           "among the candidates (drop) or among all components of the same kind (grad_norm, activation)")


@dataclass
class ComponentReport:
    """``report``: the JSON report; ``components``: one row per head and MLP with every piece of
    evidence; ``grad_norms``: one row per weight matrix (name, layer, block, shape, grad_norm)."""

    report: dict
    components: pd.DataFrame
    grad_norms: pd.DataFrame


def _row(rows: pd.DataFrame, i: int):
    if not 0 <= i < len(rows):
        raise ReplabError(f"--prompt-index {i} is out of range 0-{len(rows) - 1}")
    row = rows.iloc[i]
    if not isinstance(row["answer"], str) or not row["answer"]:
        raise ReplabError(f"prompt {i} has no answer: the report needs a target")
    return row


def build_setup(model, rows: pd.DataFrame, i: int, corruption: str) -> tuple[Setup, str, str]:
    """``(Setup, prompt, answer)`` for prompt ``i`` of ``rows`` under ``corruption``."""
    from replab.prompts import answer_ids, token_ids

    tok, bos = model.tokenizer, bool(model.cfg.default_prepend_bos)
    row = _row(rows, i)
    prompt_ids = token_ids(tok, row["prompt"], bos)
    setup = Setup(prompt_ids, answer_ids(tok, row["answer"]), corruption)
    same = [(j, token_ids(tok, p, bos)) for j, p in enumerate(rows["prompt"])]
    same = [(j, ids) for j, ids in same if len(ids) == len(prompt_ids)]
    if corruption == "other-prompt":
        cp = row.get("corrupt_prompt")
        if isinstance(cp, str) and cp:
            ids = token_ids(tok, cp, bos)
            if len(ids) != len(prompt_ids):
                raise ReplabError(f"prompt {i}: its corrupt_prompt has {len(ids)} tokens, the prompt {len(prompt_ids)}")
            setup.corrupt_ids, setup.corrupt_prompt, setup.corrupt_source = ids, cp, "corrupt_prompt"
        else:
            first = setup.target_ids[0]
            for j, ids in same:
                a = rows.iloc[j]["answer"]
                if j != i and ids != prompt_ids and isinstance(a, str) and a and answer_ids(tok, a)[0] != first:
                    setup.corrupt_ids, setup.corrupt_prompt = ids, rows.iloc[j]["prompt"]
                    setup.corrupt_source = f"row {j}"
                    break
            else:
                raise ReplabError(f"prompt {i} has no corrupt_prompt and no other prompt of the same token length "
                                  f"({len(prompt_ids)}) with a different answer; use --corruption zero or mean")
        if setup.corrupt_ids == prompt_ids:
            raise ReplabError(f"prompt {i}: the corrupt prompt has the same tokens as the prompt")
    elif corruption == "mean":
        if len(same) < 2:
            raise ReplabError(f"--corruption mean needs at least 2 prompts of prompt {i}'s token length "
                              f"({len(prompt_ids)}); the set has {len(same)}")
        L = model.cfg.n_layers
        hooks = {"blocks.0.hook_resid_pre"} | {f"blocks.{la}.{h}" for la in range(L)
                                               for h in ("attn.hook_z", "attn.hook_v", "mlp.hook_post", "mlp.hook_pre")}
        setup.mean, setup.n_mean = mean_activations(model, [ids for _, ids in same], hooks), len(same)
    return setup, row["prompt"], row["answer"]


@torch.inference_mode()
def answer_check(model, setup: Setup) -> dict:
    """The target on the clean prompt: first-token logit, probability, log-probability, rank
    (1 = top), the top 5 tokens, and the summed teacher-forced log-probability of all tokens."""
    ids = torch.tensor([setup.prompt_ids + setup.target_ids[:-1]])
    logits = model(ids)[0].double()
    T = setup.n_prompt
    logp = torch.log_softmax(logits[T - 1:], -1)
    first = logits[T - 1]
    t0 = setup.target_ids[0]
    top = torch.topk(first, 5)
    tok = model.tokenizer
    return {"logit": float(first[t0]), "prob": float(logp[0, t0].exp()), "logprob": float(logp[0, t0]),
            "rank": int((first > first[t0]).sum()) + 1,
            "sum_logprob": float(sum(logp[k, t] for k, t in enumerate(setup.target_ids))),
            "top5": [{"token": tok.decode([int(t)]), "logit": float(first[t])} for t in top.indices]}


def rank_components(components: pd.DataFrame, refined: pd.DataFrame | None, top: int, setup: Setup,
                    parameters: dict, grad_slices: dict, group: int) -> tuple[pd.DataFrame, list[dict]]:
    """Step 5: rank the ``top`` components by drop (the causal selection), order them by the
    combined score (:data:`RANKING`) and attach each one's evidence and exact parameter names.

    Args:
        components: :func:`patch_units`' table of the step-2 units with ``mean_abs_activation``
            and ``grad_norm`` columns added.
        refined: :func:`patch_units`' table of step-3 units (any subset; a component whose
            unit is missing gets no refinement number), or None.
        parameters / grad_slices: :class:`GradientEvidence`'s, by component name.
    Returns:
        ``(table, candidates)``: the components with ranking columns, and the candidates in rank
        order (``component``, ``rank``, ``evidence``, ``parameters``).
    """
    if top < 1:
        raise ReplabError("--top must be at least 1")
    table = components.copy()
    table["causal_rank"] = table["drop"].rank(ascending=False, method="first").astype(int)
    is_cand = table["causal_rank"] <= top
    table["pct_drop"] = table["drop"].where(is_cand).rank(pct=True)
    for col in ("grad_norm", "mean_abs_activation"):
        table[f"pct_{col}"] = table.groupby("kind")[col].rank(pct=True)
    table["combined_score"] = (WEIGHTS["drop"] * table["pct_drop"] + WEIGHTS["grad_norm"] * table["pct_grad_norm"]
                               + WEIGHTS["mean_abs_activation"] * table["pct_mean_abs_activation"])
    table = compare_stages(table, refined)
    chosen = table[is_cand].sort_values(["combined_score", "drop"], ascending=False)
    candidates = []
    for rank, r in enumerate(chosen.itertuples(), start=1):
        table.loc[r.Index, "rank"] = rank
        candidates.append({"component": r.component, "rank": rank,
                           "evidence": _evidence(r, setup, group, grad_slices.get(r.component)),
                           "parameters": parameters[r.component]})
    return table, candidates


def compare_stages(components: pd.DataFrame, refined: pd.DataFrame | None) -> pd.DataFrame:
    """Step 3's comparison: ``components`` (step 2's :func:`patch_units` table, heads and MLPs)
    with ``refine_unit`` (a head's KV head ``LxKVg``, an MLP's ``LxMLP.pre``), ``refine_site``
    (``v`` / ``mlp_pre``), ``refine_drop`` (NaN where ``refined`` lacks the unit) and
    ``matters_more``: the stage with the larger absolute drop (``value (v)`` / ``output (z)``,
    ``input (pre)`` / ``output (post)``; None without a refinement number)."""
    table = components.copy()
    table["refine_site"] = [("v" if k == "head" else "mlp_pre") for k in table["kind"]]
    ref_drop = {} if refined is None else dict(zip(refined["component"], refined["drop"], strict=True))
    units = [unit_name("v", r.layer, int(r.kv_head)) if r.kind == "head" else unit_name("mlp_pre", r.layer)
             for r in table.itertuples()]
    table["refine_unit"] = units
    table["refine_drop"] = [ref_drop.get(u, np.nan) for u in units]
    table["matters_more"] = [_stage(r.kind, r.drop, r.refine_drop) for r in table.itertuples()]
    return table


def lora_modules(candidates: list[dict]) -> list[str]:
    """The full module names (PEFT ``target_modules``) of the candidates' parameters, in model order."""
    return sorted({n.rsplit(".", 1)[0] for c in candidates for n in c["parameters"]},
                  key=lambda n: [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in n.split(".")])


LORA_NOTE = ("full module names (PEFT matches them exactly); a head's weights are slices of its "
             "layer's q/k/v/o matrices (see evidence.grad_slices), so LoRA on them also edits the "
             "layer's other heads")


def build_report(model, setup: Setup, prompt: str, answer: str, prompt_index: int, dataset: str, scoring: str,
                 check: dict, clean: float, full: float, checks: dict, candidates: list[dict], grad_norms: dict,
                 layers: list[int], seconds: dict) -> dict:
    """The JSON report (``report.json``; keys in docs/heads.md) from the steps' results: ``check``
    (:func:`answer_check`), ``clean`` / ``full`` / ``checks`` (:class:`PatchedUnits`'s, plus the
    gradient check), ``candidates`` (:func:`rank_components`), ``grad_norms``
    (:class:`GradientEvidence`'s)."""
    key = "logit" if scoring == "first_token" else "sum_logprob"
    tok = model.tokenizer
    return {
        "target": {"text": answer, "tokens": [tok.decode([t]) for t in setup.target_ids], "token_ids": setup.target_ids,
                   "scoring": scoring, "metric": key, **check},
        "corruption": {"kind": setup.corruption, "corrupt_prompt": setup.corrupt_prompt,
                       "source": setup.corrupt_source, "n_mean_prompts": setup.n_mean or None, "clean": clean,
                       "fully_corrupted": full, "full_drop": clean - full,
                       "note": "fully_corrupted: every prompt position of the layer-0 residual stream patched"},
        "candidates": candidates,
        "grad_norms": grad_norms,
        "prompt": {"text": prompt, "index": prompt_index, "dataset": dataset,
                   "tokens": [tok.decode([t]) for t in setup.prompt_ids]},
        "ranking": RANKING,
        "lora": {"target_modules": lora_modules(candidates), "note": LORA_NOTE},
        "checks": checks,
        "per": {"z": "query head", "v": "KV head (shared by its query heads)", "mlp": "layer"},
        "layers": layers,
        "seconds": seconds,
    }


def component_report(model, rows: pd.DataFrame, prompt_index: int = 0, corruption: str = "other-prompt",
                     scoring: str = "first_token", top: int = 10, hf_model=None, dataset: str = "dataset",
                     layers="all", progress=None) -> ComponentReport:
    """The W1 report for prompt ``prompt_index`` of ``rows`` (a prompt set's rows: ``prompt``,
    ``answer``, optionally ``corrupt_prompt``). See the module docstring for every step; each
    step is also its own call (:func:`build_setup` + :func:`answer_check`, :func:`patch_units`
    of :func:`component_units` and :func:`refine_units`, :func:`mean_abs_activations`,
    :func:`gradient_evidence`, :func:`rank_components`, :func:`build_report`), which is how
    ``replab run fact-recall`` runs them as stages.

    Args:
        model: a TransformerLens model from :func:`replab.load_model`.
        hf_model: its Hugging Face model (default: loaded with :func:`replab.models.load_hf_model`).
        top: how many components to report as candidates.
        layers: a layer spec (``all``, ``20-29`` ...): patch only these layers' heads and MLPs
            (gradient norms always cover every layer).
        progress: optional ``advance(n)``, called once per step (6 steps).
    """
    check_options(corruption, scoring)
    if top < 1:
        raise ReplabError("--top must be at least 1")
    tick = progress or (lambda n=1: None)
    t_start = time.time()
    cfg = model.cfg
    group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)
    setup, prompt, answer = build_setup(model, rows, prompt_index, corruption)
    check = answer_check(model, setup)
    steps = {"setup": round(time.time() - t_start, 2)}
    tick(1)

    # 2. broad patching (every head's z, every MLP's post) and 3. the refinement stages (every KV
    # head's v, every MLP's pre), all in one batched engine run with three sanity variants
    lays = parse_layers(layers, cfg.n_layers)
    comps, refine = component_units(model, lays), refine_units(model, lays)
    patched = patch_units(model, setup, comps + refine, check, scoring)
    steps.update(patched.seconds)
    tick(1)
    table = patched.table.iloc[:len(comps)].reset_index(drop=True)
    refined = patched.table.iloc[len(comps):].reset_index(drop=True)
    tick(1)

    # 4. evidence: mean |activation| at the final prompt position, gradient norms (HF model)
    table["mean_abs_activation"] = mean_abs_activations(model, setup, comps)
    tick(1)
    grads = gradient_evidence(model, setup, comps, check, scoring, hf_model)
    steps.update(grads.seconds)
    table["grad_norm"] = [grads.component_grad_norm[c] for c in table["component"]]
    tick(1)

    # 5. combined ranking of the causally selected candidates
    table, candidates = rank_components(table, refined, top, setup, grads.parameters, grads.grad_slices, group)
    tick(1)
    report = build_report(model, setup, prompt, answer, prompt_index, dataset, scoring, check, patched.clean,
                          patched.full, {**patched.checks, "hf_loss_equals_tl": grads.check}, candidates,
                          grads.grad_norms, lays, {**steps, "total": round(time.time() - t_start, 2)})
    return ComponentReport(report, table, grads.grad_table)


def _stage(kind: str, out_drop: float, in_drop: float) -> str | None:
    if in_drop is None or not np.isfinite(in_drop):
        return None
    inp, outp = ("value (v)", "output (z)") if kind == "head" else ("input (pre)", "output (post)")
    return inp if abs(in_drop) > abs(out_drop) else outp


def _evidence(r, setup: Setup, group: int, slices: dict | None) -> dict:
    ev = {"kind": r.kind, "layer": int(r.layer),
          "patch": {"site": r.site, "drop": float(r.drop), "drop_logit": float(r.drop_logit),
                    "drop_logprob": float(r.drop_logprob), "normalized_drop": _f(r.normalized_drop),
                    "patched": float(r.patched), "causal_rank": int(r.causal_rank)},
          "refinement": {"site": r.refine_site, "drop": _f(r.refine_drop), "matters_more": r.matters_more},
          "mean_abs_activation": {"value": float(r.mean_abs_activation),
                                  "hook": "attn.hook_z" if r.kind == "head" else "mlp.hook_post",
                                  "position": setup.n_prompt - 1},
          "grad_norm": float(r.grad_norm), "combined_score": float(r.combined_score),
          "percentiles": {"drop": float(r.pct_drop), "grad_norm": float(r.pct_grad_norm),
                          "mean_abs_activation": float(r.pct_mean_abs_activation)}}
    if r.kind == "head":
        kv = int(r.kv_head)
        ev["head"] = int(r.head)
        ev["kv_head"] = kv
        ev["refinement"]["unit"] = f"KV head {kv} (query heads {kv * group}-{(kv + 1) * group - 1})"
        if slices:
            ev["grad_slices"] = slices
    else:
        ev["refinement"]["unit"] = "gate pre-activation (mlp.hook_pre)"
    return ev


def _f(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)

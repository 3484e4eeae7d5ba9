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
4. **Supporting evidence** (correlational): the mean absolute activation of each head's ``z``
   and each MLP's ``post`` at the final prompt position (clean run), and the L2 norms of the
   gradient of the target's negative log-likelihood for every attention/MLP weight matrix of
   the Hugging Face model (:mod:`replab.circuits.gradients`; exact ``named_parameters()``
   names). A head's own gradient norm uses its slices (its ``q_proj`` rows and ``o_proj``
   columns; its KV head's ``k_proj``/``v_proj`` rows).
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

from replab.circuits.report_patching import (
    Setup,
    check_options,
    intervention,
    mean_activations,
    reference_full_corruption,
    score_variants,
)
from replab.errors import ReplabError
from replab.hooks import parse_layers
from replab.patching import Intervention, Variant

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


def _checks(model, setup: Setup, scoring: str, key: str, res: dict, clean: float) -> dict:
    ref_full = reference_full_corruption(model, setup, scoring)
    out = {"empty_patch_equals_clean": (res[key][0], clean),
           "full_corruption_equals_reference": (res[key][1], ref_full),
           "clean_into_clean_is_noop": (res[key][2], clean)}
    checks = {}
    for name, (got, want) in out.items():
        err = abs(float(got) - float(want))
        checks[name] = {"value": float(got), "expected": float(want), "abs_error": err,
                        "ok": err <= 1e-4 * max(1.0, abs(float(want)))}
    bad = [n for n, c in checks.items() if not c["ok"]]
    if bad:
        raise ReplabError(f"sanity check failed: {bad[0]} (error {checks[bad[0]]['abs_error']:.2e})")
    return checks


def component_report(model, rows: pd.DataFrame, prompt_index: int = 0, corruption: str = "other-prompt",
                     scoring: str = "first_token", top: int = 10, hf_model=None, dataset: str = "dataset",
                     layers="all", progress=None) -> ComponentReport:
    """The W1 report for prompt ``prompt_index`` of ``rows`` (a prompt set's rows: ``prompt``,
    ``answer``, optionally ``corrupt_prompt``). See the module docstring for every step.

    Args:
        model: a TransformerLens model from :func:`replab.load_model`.
        hf_model: its Hugging Face model (default: loaded with :func:`replab.models.load_hf_model`).
        top: how many components to report as candidates.
        layers: a layer spec (``all``, ``20-29`` ...): patch only these layers' heads and MLPs
            (gradient norms always cover every layer).
        progress: optional ``advance(n)``, called once per step (6 steps).
    """
    from replab.circuits.gradients import (
        block_parameters,
        component_parameters,
        gradient_norms,
        head_slices,
        hf_model_for,
    )

    check_options(corruption, scoring)
    if top < 1:
        raise ReplabError("--top must be at least 1")
    tick = progress or (lambda n=1: None)
    t_start = time.time()
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    n_kv = cfg.n_key_value_heads or H
    group = H // n_kv
    setup, prompt, answer = build_setup(model, rows, prompt_index, corruption)
    key = "logit" if scoring == "first_token" else "sum_logprob"
    check = answer_check(model, setup)
    clean = check[key]
    steps = {"setup": round(time.time() - t_start, 2)}
    tick(1)

    # 2. broad patching (every head's z, every MLP's post) and 3. the refinement stages (every KV
    # head's v, every MLP's pre), all in one batched engine run with three sanity variants
    lays = parse_layers(layers, L)
    comps = [("head", la, h) for la in lays for h in range(H)] + [("mlp", la, None) for la in lays]
    refine_units = [("v", la, g) for la in lays for g in range(n_kv)] + [("mlp_pre", la, None) for la in lays]
    variants = [Variant(()), Variant((intervention(setup, "resid_pre", 0),)),
                Variant((Intervention("z", L // 2, head=0, positions=tuple(range(setup.n_prompt)), source="clean"),))]
    variants += [Variant((intervention(setup, "z" if k == "head" else "mlp_post", la, h),)) for k, la, h in comps]
    variants += [Variant((intervention(setup, s, la, h),)) for s, la, h in refine_units]
    t0 = time.time()
    res = score_variants(model, setup, variants, scoring)
    steps["patching"] = round(time.time() - t0, 2)
    t0 = time.time()
    checks = _checks(model, setup, scoring, key, res, clean)
    steps["checks"] = round(time.time() - t0, 2)
    full = float(res[key][1])
    tick(1)
    n_c = 3 + len(comps)
    table = pd.DataFrame([{"component": f"L{la}H{h}" if k == "head" else f"L{la}MLP", "kind": k, "layer": la,
                           "head": h, "kv_head": None if h is None else h // group,
                           "site": "z" if k == "head" else "mlp_post"} for k, la, h in comps])
    table["patched"] = res[key][3:n_c]
    table["drop"] = clean - table["patched"]
    table["drop_logit"] = check["logit"] - res["logit"][3:n_c]
    table["drop_logprob"] = check["logprob"] - res["logprob"][3:n_c]
    table["normalized_drop"] = table["drop"] / (clean - full) if abs(clean - full) > 1e-6 else np.nan
    ref_drop = {u: clean - float(v) for u, v in zip(refine_units, res[key][n_c:], strict=True)}
    tick(1)

    # 4. evidence: mean |activation| at the final prompt position, gradient norms (HF model)
    names = {f"blocks.{la}.attn.hook_z" for la in range(L)} | {f"blocks.{la}.mlp.hook_post" for la in range(L)}
    with torch.inference_mode():
        _, cache = model.run_with_cache(torch.tensor([setup.prompt_ids]), names_filter=lambda n: n in names,
                                        return_type=None)
    act = [float(cache[f"blocks.{la}.attn.hook_z"][0, -1, h].abs().mean()) if k == "head"
           else float(cache[f"blocks.{la}.mlp.hook_post"][0, -1].abs().mean()) for k, la, h in comps]
    table["mean_abs_activation"] = act
    tick(1)
    t0 = time.time()
    hf = hf_model if hf_model is not None else hf_model_for(model)
    steps["hf_load"] = round(time.time() - t0, 2)
    t0 = time.time()
    grad_norms, grads, loss = gradient_norms(hf, setup.prompt_ids, setup.target_ids, scoring)
    steps["gradients"] = round(time.time() - t0, 2)
    tl_loss = -(check["logprob"] if scoring == "first_token" else check["sum_logprob"])
    checks["hf_loss_equals_tl"] = {"value": loss, "expected": tl_loss, "abs_error": abs(loss - tl_loss),
                                   "ok": abs(loss - tl_loss) <= 1e-3 * max(1.0, abs(tl_loss))}
    if not checks["hf_loss_equals_tl"]["ok"]:
        raise ReplabError(f"the Hugging Face model's loss {loss:.5f} differs from the analysed model's "
                          f"{tl_loss:.5f}: they are not the same model")
    params = block_parameters(hf)
    g_rows, slices, params_of = [], {}, {}
    for k, la, h in comps:
        names_k = component_parameters(params, k, la)
        params_of[(k, la, h)] = names_k
        if k == "head":
            sl = head_slices(params, grads, la, h, H, n_kv, cfg.d_head)
            slices[(la, h)] = sl
            g = np.sqrt(sum(s["grad_norm"] ** 2 for s in sl.values())) if sl else \
                np.sqrt(sum(grad_norms[n] ** 2 for n in names_k))
        else:
            g = np.sqrt(sum(grad_norms[n] ** 2 for n in names_k))
        g_rows.append(float(g))
    table["grad_norm"] = g_rows
    tick(1)

    # 5. combined ranking of the causally selected candidates
    table["causal_rank"] = table["drop"].rank(ascending=False, method="first").astype(int)
    is_cand = table["causal_rank"] <= top
    table["pct_drop"] = table["drop"].where(is_cand).rank(pct=True)
    for col in ("grad_norm", "mean_abs_activation"):
        table[f"pct_{col}"] = table.groupby("kind")[col].rank(pct=True)
    table["combined_score"] = (WEIGHTS["drop"] * table["pct_drop"] + WEIGHTS["grad_norm"] * table["pct_grad_norm"]
                               + WEIGHTS["mean_abs_activation"] * table["pct_mean_abs_activation"])
    table["refine_site"] = [("v" if k == "head" else "mlp_pre") for k in table["kind"]]
    unit = lambda r: ("v", r.layer, int(r.kv_head)) if r.kind == "head" else ("mlp_pre", r.layer, None)  # noqa: E731
    table["refine_drop"] = [ref_drop.get(unit(r), np.nan) for r in table.itertuples()]
    table["matters_more"] = [_stage(r.kind, r.drop, r.refine_drop) for r in table.itertuples()]
    chosen = table[is_cand].sort_values(["combined_score", "drop"], ascending=False)
    candidates = []
    for rank, r in enumerate(chosen.itertuples(), start=1):
        table.loc[r.Index, "rank"] = rank
        h = None if r.kind == "mlp" else int(r.head)
        candidates.append({"component": r.component, "rank": rank,
                           "evidence": _evidence(r, setup, group, slices.get((r.layer, h))),
                           "parameters": params_of[(r.kind, r.layer, h)]})
    tick(1)
    modules = sorted({n.rsplit(".", 1)[0] for c in candidates for n in c["parameters"]},
                     key=lambda n: [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in n.split(".")])
    tok = model.tokenizer
    report = {
        "target": {"text": answer, "tokens": [tok.decode([t]) for t in setup.target_ids], "token_ids": setup.target_ids,
                   "scoring": scoring, "metric": key, **check},
        "corruption": {"kind": corruption, "corrupt_prompt": setup.corrupt_prompt, "source": setup.corrupt_source,
                       "n_mean_prompts": setup.n_mean or None, "clean": clean, "fully_corrupted": full,
                       "full_drop": clean - full,
                       "note": "fully_corrupted: every prompt position of the layer-0 residual stream patched"},
        "candidates": candidates,
        "grad_norms": grad_norms,
        "prompt": {"text": prompt, "index": prompt_index, "dataset": dataset,
                   "tokens": [tok.decode([t]) for t in setup.prompt_ids]},
        "ranking": RANKING,
        "lora": {"target_modules": modules,
                 "note": "full module names (PEFT matches them exactly); a head's weights are slices of its "
                         "layer's q/k/v/o matrices (see evidence.grad_slices), so LoRA on them also edits the "
                         "layer's other heads"},
        "checks": checks,
        "per": {"z": "query head", "v": "KV head (shared by its query heads)", "mlp": "layer"},
        "layers": lays,
        "seconds": {**steps, "total": round(time.time() - t_start, 2)},
    }
    grad_table = pd.DataFrame([{"name": n, **params[n], "grad_norm": v} for n, v in grad_norms.items()])
    return ComponentReport(report, table, grad_table)


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

"""Supporting, correlational evidence for the W1 report (step 4): the mean |activation| of each
head and MLP at the final prompt position, and gradient norms of the target's negative
log-likelihood on the Hugging Face model (:mod:`replab.circuits.gradients`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from replab.circuits.report_patching import Setup, unit_name
from replab.errors import ReplabError


@torch.inference_mode()
def mean_abs_activations(model, setup: Setup, units: list[tuple[str, int, int | None]]) -> list[float]:
    """Step 4 (correlational): per component unit, the mean |activation| at the final prompt
    position of the clean run: a head's ``z`` ``[d_head]``, an MLP's ``post`` ``[d_mlp]``."""
    names = {f"blocks.{la}.attn.hook_z" if k == "head" else f"blocks.{la}.mlp.hook_post" for k, la, _ in units}
    _, cache = model.run_with_cache(torch.tensor([setup.prompt_ids]), names_filter=lambda n: n in names,
                                    return_type=None)
    return [float(cache[f"blocks.{la}.attn.hook_z"][0, -1, h].abs().mean()) if k == "head"
            else float(cache[f"blocks.{la}.mlp.hook_post"][0, -1].abs().mean()) for k, la, h in units]


@dataclass
class GradientEvidence:
    """Step 4's gradients (Hugging Face model): ``grad_norms`` ``{parameter: L2 norm}`` of every
    attention/MLP weight matrix; ``grad_table`` one row per matrix (name, layer, block, shape,
    grad_norm); per component name, its ``grad_norm`` (a head's from its slices), its exact
    ``parameters`` and, for heads, its ``grad_slices``; ``check``: the HF loss against the
    analysed model's; ``seconds``: HF load and backward times."""

    grad_norms: dict
    grad_table: pd.DataFrame
    component_grad_norm: dict
    parameters: dict
    grad_slices: dict
    check: dict
    seconds: dict


def gradient_evidence(model, setup: Setup, units: list[tuple[str, int, int | None]], check: dict,
                      scoring: str = "first_token", hf_model=None) -> GradientEvidence:
    """Step 4 (correlational): the gradient of the target's NLL on the Hugging Face model
    (:mod:`replab.circuits.gradients`), per weight matrix and per component unit; checks that the
    HF model's loss equals the analysed model's (ReplabError when they differ); ``check`` is
    :func:`replab.circuits.report.answer_check`'s result. ``hf_model``: default
    :func:`replab.circuits.gradients.hf_model_for` of ``model``."""
    from replab.circuits.gradients import (
        block_parameters,
        component_parameters,
        gradient_norms,
        head_slices,
        hf_model_for,
    )

    cfg = model.cfg
    H = cfg.n_heads
    n_kv = cfg.n_key_value_heads or H
    seconds = {}
    t0 = time.time()
    hf = hf_model if hf_model is not None else hf_model_for(model)
    seconds["hf_load"] = round(time.time() - t0, 2)
    t0 = time.time()
    grad_norms, grads, loss = gradient_norms(hf, setup.prompt_ids, setup.target_ids, scoring)
    seconds["gradients"] = round(time.time() - t0, 2)
    tl_loss = -(check["logprob"] if scoring == "first_token" else check["sum_logprob"])
    hf_check = {"value": loss, "expected": tl_loss, "abs_error": abs(loss - tl_loss),
                "ok": abs(loss - tl_loss) <= 1e-3 * max(1.0, abs(tl_loss))}
    if not hf_check["ok"]:
        raise ReplabError(f"the Hugging Face model's loss {loss:.5f} differs from the analysed model's "
                          f"{tl_loss:.5f}: they are not the same model")
    params = block_parameters(hf)
    per, slices, params_of = {}, {}, {}
    for k, la, h in units:
        name = unit_name(k, la, h)
        names_k = component_parameters(params, k, la)
        params_of[name] = names_k
        if k == "head":
            sl = head_slices(params, grads, la, h, H, n_kv, cfg.d_head)
            if sl:
                slices[name] = sl
            g = np.sqrt(sum(s["grad_norm"] ** 2 for s in sl.values())) if sl else \
                np.sqrt(sum(grad_norms[n] ** 2 for n in names_k))
        else:
            g = np.sqrt(sum(grad_norms[n] ** 2 for n in names_k))
        per[name] = float(g)
    grad_table = pd.DataFrame([{"name": n, **params[n], "grad_norm": v} for n, v in grad_norms.items()])
    return GradientEvidence(grad_norms, grad_table, per, params_of, slices, hf_check, seconds)

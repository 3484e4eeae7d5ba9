"""Direct logit attribution (DLA) of the logit difference, at the last position.

The final residual is a sum of components: the embedding, every attention layer's output
(itself the sum of its heads' outputs plus the output bias) and every MLP's output. With the
final norm's scale **frozen** at the value of the actual forward pass (the cached
``ln_final.hook_scale``), the final norm is linear, so each component's direct effect on
``logit(answer) − logit(foil)`` is ``(component / scale) · (W_U[:, answer] − W_U[:, foil])``
and the effects sum exactly to the model's logit difference minus the unembedding-bias term.
Projections are computed in float32 whatever the model's dtype. The approximation is the
frozen scale: a component's effect on the norm's scale (and everything it does through later
layers) is not counted. The final norm is the model's own,
applied with the frozen scale: ``x / scale`` (RMSNormPre, norms folded into ``W_U``),
``x / scale * w`` (RMSNorm), ``(x − mean x) / scale`` (LayerNormPre), ``(x − mean x) / scale * w``
(LayerNorm, whose ``b`` joins the bias term). The ``check`` table compares the sum of the
components with the logit difference of the model's real forward pass (its logits). A model
with an output soft cap (Gemma-2: ``cap · tanh(logits / cap)``) is decomposed before the cap,
and checked against its logits before the cap. Parallel attention + MLP blocks (GPT-NeoX, Phi)
have no ``resid_mid`` point.

Three views, each a tidy DataFrame with one row per prompt:

* ``accumulated``: the accumulated residual at every ``resid_pre`` and ``resid_mid`` point
  and the final residual, projected the same way (with the bias term, so the last point is the
  model's logit difference), for the clean and the corrupt prompts;
* ``layers``: the embedding, each layer's attention and MLP output, and the bias term;
* ``heads``: each head's output ``z_h W_O[h]`` (attention output biases are in ``layers``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from replab.errors import ReplabError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def _frozen_norm(model: HookedTransformer, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The final norm's linear part with its scale frozen: ``x`` ``[..., d]``, ``scale``
    broadcastable to ``x`` (see the module docstring)."""
    kind = model.cfg.normalization_type
    if kind in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    elif kind not in ("RMS", "RMSPre"):
        raise ReplabError(f"DLA does not support final norm type {kind!r}")
    x = x.float() / scale.float()
    w = getattr(model.ln_final, "w", None)
    return x * w.float() if w is not None else x


def _cache(model: HookedTransformer, tokens):
    L = model.cfg.n_layers
    want = {"hook_embed", "hook_pos_embed", "ln_final.hook_scale"}
    for layer in range(L):
        want |= {f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_mid",   # mid: if any
                 f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out",
                 f"blocks.{layer}.attn.hook_z"}
    want.add(f"blocks.{L - 1}.hook_resid_post")
    with torch.inference_mode():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in want)
        if (getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0) > 0:   # logits before the cap
            final = model.ln_final(cache[f"blocks.{L - 1}.hook_resid_post"][:, -1:])[:, 0]
            return final.float() @ model.W_U.float() + model.b_U.float(), cache
    return logits[:, -1].float(), cache


def _direction(model: HookedTransformer, task):
    W_U, b_U = model.W_U.float(), model.b_U.float()                # float32 in any model dtype
    u = W_U[:, task.answer] - W_U[:, task.foil]                    # [d, N]
    bias = b_U[task.answer] - b_U[task.foil]                       # [N]
    b_ln = getattr(model.ln_final, "b", None)
    if b_ln is not None:                                           # LayerNorm's bias term
        bias = bias + b_ln.float() @ u
    return u.T, bias


def final_norm_scale(model, resid_final: torch.Tensor) -> torch.Tensor:
    """The final norm's scale ``[N, 1]`` for final residuals ``[N, d]`` (its own
    ``ln_final.hook_scale``), e.g. of a patched run, to freeze it as :func:`dla` does."""
    seen = {}
    handle = model.ln_final.hook_scale.register_forward_hook(lambda mod, args, out: seen.setdefault("s", out))
    try:
        with torch.inference_mode():
            model.ln_final(resid_final[:, None, :])
    finally:
        handle.remove()
    return seen["s"][:, 0]


def head_direct_effects(model, z_last: torch.Tensor, resid_final: torch.Tensor, task) -> torch.Tensor:
    """Each head's direct effect on ``logit(answer) − logit(foil)`` ``[N, L, H]``, as in
    :func:`dla`'s ``heads`` view but for any run: ``z_last`` ``[N, L, H, d_head]`` (every
    layer's ``hook_z`` at the last position) and that run's final residual ``[N, d]`` (whose
    final-norm scale is frozen)."""
    u, _ = _direction(model, task)                                       # [N, d]
    scale = final_norm_scale(model, resid_final)                         # [N, 1]
    with torch.inference_mode():
        res = torch.einsum("nlhe,lhed->nlhd", z_last, model.W_O)          # [N, L, H, d]
        return (_frozen_norm(model, res, scale[:, :, None, None]) * u[:, None, None, :]).sum(-1)


def vector_direct_effect(model, vec_last: torch.Tensor, resid_final: torch.Tensor, task) -> torch.Tensor:
    """The direct effect ``[N]`` of a residual-stream vector at the last position ``[N, d]``
    (an MLP's or attention layer's output) on ``logit(answer) − logit(foil)``, final-norm scale
    frozen at that run's value."""
    u, _ = _direction(model, task)
    scale = final_norm_scale(model, resid_final)
    with torch.inference_mode():
        return (_frozen_norm(model, vec_last, scale) * u).sum(-1)


def dla(model: HookedTransformer, task) -> dict[str, pd.DataFrame]:
    """``{"accumulated", "layers", "heads", "check"}`` DataFrames; see the module docstring.

    ``check`` has, per prompt, the model's logit difference, the sum of the ``layers``
    components plus the bias term, the sum of their absolute values (``component_mass``) and
    the absolute difference (float rounding only; :func:`check_tolerance`).
    """
    L, H = model.cfg.n_layers, model.cfg.n_heads
    u, bias = _direction(model, task)
    out_acc, out_layers, out_heads, checks = [], [], [], []
    with torch.inference_mode():
        for run, tokens in (("clean", task.clean), ("corrupt", task.corrupt)):
            logits, cache = _cache(model, tokens)
            scale = cache["ln_final.hook_scale"][:, -1]                  # [N, 1]
            proj = lambda x, scale=scale: (_frozen_norm(model, x[:, -1], scale) * u).sum(-1)  # noqa: E731  [N]
            for layer in range(L):
                for site, depth in (("pre", layer), ("mid", layer + 0.5)):
                    if f"blocks.{layer}.hook_resid_{site}" not in cache.cache_dict:
                        continue                      # parallel attention + MLP: no mid point
                    v = proj(cache[f"blocks.{layer}.hook_resid_{site}"]) + bias
                    out_acc += _rows(v, run, point=f"{layer}_{site}", depth=depth)
            final = proj(cache[f"blocks.{L - 1}.hook_resid_post"]) + bias
            out_acc += _rows(final, run, point="final_post", depth=float(L))
            if run != "clean":
                continue
            embed = cache["hook_embed"] + (cache["hook_pos_embed"] if "hook_pos_embed" in cache.cache_dict else 0)
            total = proj(embed)
            mass = total.abs()                                           # sum of |components|
            out_layers += _rows(proj(embed), run, layer=-1, component="embed")
            for layer in range(L):
                a, m = proj(cache[f"blocks.{layer}.hook_attn_out"]), proj(cache[f"blocks.{layer}.hook_mlp_out"])
                total = total + a + m
                mass = mass + a.abs() + m.abs()
                out_layers += _rows(a, run, layer=layer, component="attn")
                out_layers += _rows(m, run, layer=layer, component="mlp")
                z = cache[f"blocks.{layer}.attn.hook_z"][:, -1]              # [N, H, dh]
                res = torch.einsum("nhe,hed->nhd", z.float(), model.W_O[layer].float())   # [N, H, d]
                hv = (_frozen_norm(model, res, scale[:, :, None]) * u[:, None, :]).sum(-1)   # [N, H]
                for h in range(H):
                    out_heads += _rows(hv[:, h], run, layer=layer, head=h)
            out_layers += _rows(bias, run, layer=L, component="unembed_bias")
            actual = logits.gather(1, task.answer[:, None])[:, 0] - logits.gather(1, task.foil[:, None])[:, 0]
            checks = pd.DataFrame({"prompt_id": np.arange(task.n_prompts),
                                   "logit_diff": actual.float().cpu().numpy(),
                                   "sum_of_components": (total + bias).float().cpu().numpy(),
                                   "component_mass": mass.float().cpu().numpy()})
    checks["abs_error"] = (checks["logit_diff"] - checks["sum_of_components"]).abs()
    worst = float(checks["abs_error"].max())
    scale = checks["logit_diff"].abs().max() if model.cfg.dtype in (torch.float32, torch.float64) \
        else checks["component_mass"].max()
    if worst > check_tolerance(model) * max(1.0, float(scale)):
        raise ReplabError(f"DLA components do not sum to the logit difference (error {worst:.3g}); "
                          "this model's final norm is not supported")
    return {"accumulated": pd.DataFrame(out_acc), "layers": pd.DataFrame(out_layers),
            "heads": pd.DataFrame(out_heads), "check": checks}


def check_tolerance(model) -> float:
    """Allowed |sum of components − logit difference|: in float32, 1e-3 × max(1, |logit
    difference|); in bfloat16 / float16, where the model's own residual stream is rounded at
    every addition while the components are summed in float32, 0.02 × max(1, sum of
    |components|) (the size of the rounding scales with the components, not with their sum;
    measured errors: docs/models.md). An unsupported norm is off by the order of the
    components themselves."""
    return 1e-3 if model.cfg.dtype in (torch.float32, torch.float64) else 0.02


def _rows(values: torch.Tensor, run: str, **cols) -> list[dict]:
    return [{"prompt_id": i, "run": run, **cols, "logit_diff": float(v)}
            for i, v in enumerate(values.float().tolist())]


def top_heads(heads: pd.DataFrame, n: int = 6) -> pd.DataFrame:
    """Mean DLA per head, the ``n`` most positive and ``n`` most negative."""
    mean = heads.groupby(["layer", "head"], as_index=False)["logit_diff"].mean()
    mean = mean.sort_values("logit_diff", ascending=False)
    pos = mean.head(n)
    neg = mean.iloc[len(pos):].tail(n).iloc[::-1]          # never a head twice
    return pd.concat([pos.assign(sign="positive"), neg.assign(sign="negative")], ignore_index=True)

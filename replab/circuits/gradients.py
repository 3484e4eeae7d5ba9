"""Gradient norms of the target's negative log-likelihood on the Hugging Face model (W1 step 4).

The TransformerLens model replab analyses has processed weights (norms folded, layouts
changed), so its parameter names and values are not the ones an editor (PEFT, a LoRA
trainer) sees. Gradients are therefore taken on the plain Hugging Face model
(:func:`replab.models.load_hf_model`), and every name is exactly one of
``hf_model.named_parameters()`` (e.g. ``model.layers.18.mlp.down_proj.weight``).

The loss is the teacher-forced negative log-likelihood of the target: ``−log p(t₁ | prompt)``
for ``first_token`` scoring, ``−Σ_k log p(t_k | prompt, t_<k)`` for ``sum_logprob``, computed
in the model's own dtype by one ordinary ``loss.backward()``. (In float32, SmolLM2's
gradients are reproducible only to about 1e-4 relative: the same gradient summed in another
order, or computed in float64, differs by that much; ``bench/bench_heads.py`` measures it.)

Which parameters: every trainable 2-D weight inside a decoder block's attention or MLP
module (found by name: ``.<layer>.(self_attn|attn|attention).`` / ``.(mlp|feed_forward|ffn).``).
For Llama-style names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) a query head's slices
are also given: its rows of ``q_proj`` and columns of ``o_proj`` (per query head), and its KV
head's rows of ``k_proj`` and ``v_proj`` (per KV head, shared by the query heads of the group).
"""

from __future__ import annotations

import re

import torch

from replab.errors import ReplabError

_ATTN = re.compile(r"\.(\d+)\.(self_attn|attn|attention|self_attention)\.")
_MLP = re.compile(r"\.(\d+)\.(mlp|feed_forward|ffn)\.")


def hf_model_for(model):
    """The Hugging Face model behind a TransformerLens model loaded by :func:`replab.load_model`
    (the embedded default, or a local HF directory). ReplabError for the random ``tiny`` model."""
    from replab.models import load_hf_model
    from replab.models.embedded import is_default

    ident = getattr(model, "replab_identity", None)
    if ident is None or ident.name == "tiny":
        raise ReplabError("gradient norms need the model's Hugging Face weights; the random 'tiny' model has "
                          "none (use a local HF directory, e.g. the tiny HF test model, or the default model)")
    hf = load_hf_model(None if is_default(ident.name) else ident.source)
    hf.eval()
    return hf


def block_parameters(hf_model) -> dict[str, dict]:
    """``{name: {"layer": l, "block": "attn"|"mlp", "shape": [...]}}`` for every trainable 2-D weight
    of the attention and MLP modules of the decoder blocks."""
    out = {}
    for name, p in hf_model.named_parameters():
        if not p.requires_grad or p.ndim != 2:
            continue
        for block, rx in (("attn", _ATTN), ("mlp", _MLP)):
            m = rx.search(name)
            if m:
                out[name] = {"layer": int(m.group(1)), "block": block, "shape": list(p.shape)}
                break
    if not out:
        raise ReplabError("found no attention/MLP weight matrices in the Hugging Face model's named_parameters()")
    return out


def nll(hf_model, prompt_ids: list[int], target_ids: list[int], scoring: str = "first_token") -> torch.Tensor:
    """The target's negative log-likelihood (a scalar with a graph) under ``scoring``."""
    targets = target_ids if scoring == "sum_logprob" else target_ids[:1]
    ids = torch.tensor([list(prompt_ids) + list(targets[:-1])])
    logits = hf_model(input_ids=ids).logits[0]                         # [T + k - 1, V], the model's dtype
    T = len(prompt_ids)
    logp = torch.log_softmax(logits[T - 1:T - 1 + len(targets)], dim=-1)
    return -logp[torch.arange(len(targets)), torch.tensor(targets)].sum()


def gradient_norms(hf_model, prompt_ids: list[int], target_ids: list[int], scoring: str = "first_token"):
    """``(grad_norms, grads, loss)``: the L2 norm of d NLL / d W for every block weight
    (:func:`block_parameters`), the gradients themselves (for head slices) and the loss."""
    params = block_parameters(hf_model)
    named = dict(hf_model.named_parameters())
    hf_model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            loss = nll(hf_model, prompt_ids, target_ids, scoring)
            loss.backward()           # the plain computation (autograd.grad on a subset orders sums differently)
        out, gd = {}, {}
        for name in params:
            g = named[name].grad
            g = torch.zeros_like(named[name]) if g is None else g.detach()   # kept after zero_grad(set_to_none)
            gd[name] = g
            out[name] = float(g.norm())
    finally:
        hf_model.zero_grad(set_to_none=True)
    return out, gd, float(loss.detach())


def _llama_names(params: dict, layer: int) -> dict[str, str]:
    found = {}
    for name, info in params.items():
        if info["layer"] != layer:
            continue
        for key in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            if f".{key}." in name:
                found[key] = name
    return found


def component_parameters(params: dict, kind: str, layer: int) -> list[str]:
    """Exact parameter names of a component: a head's layer's attention matrices, or an MLP's
    matrices (LoRA edits whole matrices; a head is a slice of them, see :func:`head_slices`)."""
    block = "attn" if kind == "head" else "mlp"
    names = [n for n, info in params.items() if info["layer"] == layer and info["block"] == block]
    if not names:
        raise ReplabError(f"no {block} parameters for layer {layer} in the Hugging Face model")
    return names


def head_slices(params: dict, grads: dict, layer: int, head: int, n_heads: int, n_kv: int,
                d_head: int) -> dict:
    """Per-head gradient slices of a Llama-style layer: ``{param: {"rows"|"cols": [a, b],
    "per": "query head"|"KV head", "grad_norm": float}}``; empty for other layouts."""
    names = _llama_names(params, layer)
    if not {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(names):
        return {}
    kv = head // (n_heads // n_kv)
    q, k = (head * d_head, (head + 1) * d_head), (kv * d_head, (kv + 1) * d_head)
    spec = {"q_proj": ("rows", q, "query head"), "k_proj": ("rows", k, "KV head"),
            "v_proj": ("rows", k, "KV head"), "o_proj": ("cols", q, "query head")}
    out = {}
    for key, (axis, (a, b), per) in spec.items():
        g = grads[names[key]]
        part = g[a:b] if axis == "rows" else g[:, a:b]
        out[names[key]] = {axis: [a, b], "per": per, "grad_norm": float(part.double().norm())}
    return out

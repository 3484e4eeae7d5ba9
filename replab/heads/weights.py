"""Per-head weights with grouped-query attention made explicit, and the norm conventions.

TransformerLens stores a GQA layer's keys and values once per **KV head** (``attn._W_K``,
``attn._W_V``: ``[n_kv_heads, d_model, d_head]``) and expands them with
``repeat_interleave`` when used, so query head ``h`` reads KV head
``h // (n_heads // n_kv_heads)`` (:func:`replab.hooks.kv_head_of`). Everything here returns
per-KV-head tensors and the ``kv_of`` map, so callers never expand by accident.

**Norms.** replab loads models with the norms' weights folded into the next linear map
(TransformerLens ``fold_ln``; the tiny test model is unfolded and keeps them in its norm
modules). What is left of a norm is its data-dependent scale (1/RMS, or centring and 1/std
for LayerNorm). The circuits on the embeddings treat it like this:

* **input side** (a head reading a token): the token's embedding goes through the block's
  own ``ln1`` module, exactly as if the residual stream held only that embedding
  (:func:`normed_embeddings`). At layer 0 this *is* what the head reads.
* **output side** (a head writing into the logits): the head's output goes through the
  final norm's *linear* part only (its weight if unfolded, centring for LayerNorm;
  :func:`final_linear`), then ``W_U``. The final scale depends on the whole residual
  stream at the read-out position, so it is left out. It multiplies a whole row of an OV
  matrix by one positive number, so it changes no rank within a row: copy and next-item
  scores do not depend on it.

Biases are left out of both circuits (TransformerLens's ``OV`` / ``QK`` convention);
Llama-family models such as SmolLM2 have no attention biases.
"""

from __future__ import annotations

import torch


def n_kv_heads(model) -> int:
    cfg = model.cfg
    return int(cfg.n_key_value_heads or cfg.n_heads)


def kv_of(model) -> torch.Tensor:
    """``[n_heads]`` long: the KV head each query head reads (repeat_interleave layout)."""
    group = model.cfg.n_heads // n_kv_heads(model)
    return torch.arange(model.cfg.n_heads) // group


def _kv_param(attn, name: str) -> torch.Tensor:
    raw = getattr(attn, f"_{name}", None)
    return raw if raw is not None else getattr(attn, name)


@torch.no_grad()
def layer_weights(model, layer: int) -> dict[str, torch.Tensor]:
    """One layer's attention weights, detached float32.

    ``W_Q`` ``[H, d, dh]``, ``W_O`` ``[H, dh, d]`` per query head; ``W_K``, ``W_V``
    ``[H_kv, d, dh]`` per KV head; ``b_Q`` ``[H, dh]``, ``b_K`` ``[H_kv, dh]``.
    """
    attn = model.blocks[layer].attn
    f = lambda t: t.detach().float()  # noqa: E731
    return {"W_Q": f(attn.W_Q), "W_O": f(attn.W_O), "W_K": f(_kv_param(attn, "W_K")),
            "W_V": f(_kv_param(attn, "W_V")), "b_Q": f(attn.b_Q), "b_K": f(_kv_param(attn, "b_K"))}


@torch.no_grad()
def all_weights(model) -> dict[str, torch.Tensor]:
    """Every layer stacked: ``W_Q`` ``[L, H, d, dh]``, ``W_O`` ``[L, H, dh, d]``, ``W_K``/``W_V``
    ``[L, H_kv, d, dh]``."""
    per = [layer_weights(model, layer) for layer in range(model.cfg.n_layers)]
    return {k: torch.stack([p[k] for p in per]) for k in ("W_Q", "W_O", "W_K", "W_V")}


@torch.no_grad()
def normed_embeddings(model, layer: int, ids) -> torch.Tensor:
    """``[n, d]``: the embeddings of token ``ids`` through block ``layer``'s ``ln1`` (the
    input a head of that layer reads when the residual stream holds only the embedding)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    e = model.W_E[ids].detach().float()
    return model.blocks[layer].ln1(e[None])[0].float()


@torch.no_grad()
def normed_positions(model, layer: int, n_pos: int) -> torch.Tensor:
    """``[n_pos, d]``: learned positional embeddings through ``ln1`` (models with ``W_pos``)."""
    p = model.W_pos[:n_pos].detach().float()
    return model.blocks[layer].ln1(p[None])[0].float()


@torch.no_grad()
def final_linear(model, x: torch.Tensor) -> torch.Tensor:
    """The linear part of the final norm applied to residual vectors ``x`` ``[..., d]``:
    centring for LayerNorm types, then the norm weight when it is not folded into ``W_U``."""
    ln = getattr(model, "ln_final", None)
    norm = str(getattr(model.cfg, "normalization_type", "") or "")
    if norm.startswith("LN"):
        x = x - x.mean(-1, keepdim=True)
    w = getattr(ln, "w", None) if ln is not None else None
    return x * w.detach().float() if w is not None else x


def unembed_columns(model, ids) -> torch.Tensor:
    """``[d, n]``: the columns of ``W_U`` for token ``ids`` (float32)."""
    return model.W_U[:, torch.as_tensor(ids, dtype=torch.long)].detach().float()

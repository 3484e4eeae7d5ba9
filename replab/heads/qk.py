"""QK circuits on the embeddings: which token attends to which, and (learned) positional QK.

For query head ``h`` of layer ``l`` and a token set ``S`` the QK circuit is the ``|S| × |S|``
matrix of pre-softmax attention scores

    A[q, k] = (ln1(W_E[q]) W_Q[h]) · R(δ) · (ln1(W_E[k]) W_K[kv(h)]) / attn_scale

(row: the query token; column: the key token), **per query head** (``W_K`` is the KV head's,
shared by its group; ``W_Q`` is the query head's own). ``ln1`` as in
:mod:`replab.heads.weights`; no biases.

**Rotary models** (SmolLM2): queries and keys are rotated by their positions, so the score
depends on the relative offset ``δ`` = query position − key position. ``offset=δ`` applies
the model's own rotation (``attn.apply_rotary``: the query at position δ, the key at 0).
``δ = 0`` (the default) is the same-position score, where the rotations cancel; there is
no position-only QK circuit to draw, because a rotary model has no positional embedding
(position enters only as this rotation of content vectors): compare offsets instead.

**Learned absolute positions** (GPT-2-like, ``W_pos``): :func:`positional_qk` gives the
``n_pos × n_pos`` score between position embeddings (through ``ln1``), query position ×
key position, causal (upper triangle NaN). The token circuit then ignores position.

At layer 0 these are exactly the scores the model computes (the residual holds only the
embedding; a test checks them against ``hook_attn_scores``). At later layers they are the
direct-path part of the circuit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from replab.errors import ReplabError
from replab.heads.tokensets import TokenSet
from replab.heads.weights import kv_of, layer_weights, normed_embeddings, normed_positions


def is_rotary(model) -> bool:
    return getattr(model.cfg, "positional_embedding_type", "") == "rotary"


def has_learned_positions(model) -> bool:
    return getattr(model.cfg, "positional_embedding_type", "") in ("standard", "shortformer")


def _scale(model, layer: int) -> float:
    return float(model.blocks[layer].attn.attn_scale)


@torch.no_grad()
def qk_matrices(model, tokens: TokenSet, layers=None, offset: int = 0) -> dict[int, torch.Tensor]:
    """``{layer: [n_heads, n, n]}`` QK circuits on ``tokens`` (rows: query; columns: key)."""
    if offset < 0:
        raise ReplabError(f"offset {offset} is negative: a query attends only to earlier keys")
    if offset and not is_rotary(model):
        raise ReplabError("offset applies to rotary models only; this model's token QK circuit "
                          "does not depend on position")
    layers = range(model.cfg.n_layers) if layers is None else layers
    kv = kv_of(model)
    out = {}
    for layer in layers:
        w = layer_weights(model, layer)
        x = normed_embeddings(model, layer, tokens.ids)                  # [n, d]
        q = torch.einsum("nd,hde->nhe", x, w["W_Q"])                     # [n, H, dh]
        k = torch.einsum("nd,kde->nke", x, w["W_K"])[:, kv]              # [n, H, dh]
        if is_rotary(model):
            attn = model.blocks[layer].attn
            q = attn.apply_rotary(q[:, None], past_kv_pos_offset=offset)[:, 0].float()
            k = attn.apply_rotary(k[:, None], past_kv_pos_offset=0)[:, 0].float()
        out[layer] = torch.einsum("qhe,khe->hqk", q, k) / _scale(model, layer)
    return out


@torch.no_grad()
def positional_qk(model, layer: int, n_pos: int | None = None) -> torch.Tensor:
    """``[n_heads, n_pos, n_pos]`` scores between learned position embeddings (query × key,
    NaN above the diagonal). ReplabError for models without learned positions."""
    if not has_learned_positions(model):
        kind = getattr(model.cfg, "positional_embedding_type", "?")
        raise ReplabError(f"this model has {kind} positions, not learned position embeddings: there "
                          "is no positional QK circuit (for rotary models compare --offset values)")
    n_pos = min(int(n_pos or 32), model.cfg.n_ctx)
    w = layer_weights(model, layer)
    p = normed_positions(model, layer, n_pos)
    q = torch.einsum("nd,hde->hne", p, w["W_Q"])
    k = torch.einsum("nd,kde->kne", p, w["W_K"])[kv_of(model)]
    s = torch.einsum("hqe,hke->hqk", q, k) / _scale(model, layer)
    return s.masked_fill(torch.ones(n_pos, n_pos).triu(1).bool(), float("nan"))


def qk_table(model, tokens: TokenSet, layers=None, offset: int = 0) -> pd.DataFrame:
    """One row per query head: ``layer, head, kv_head, offset, self_top`` (fraction of query
    tokens whose highest-scoring key is the same token), ``previous_item_top`` (… is the item
    before it in the sequence; NaN for unordered sets) and ``self_minus_mean`` (mean diagonal
    score minus the mean off-diagonal score)."""
    mats = qk_matrices(model, tokens, layers, offset)
    n = len(tokens)
    prev = [-1] * n
    for i, j in enumerate(tokens.next_index):
        if j >= 0:
            prev[j] = i
    prev_t = torch.as_tensor(prev)
    has = prev_t >= 0
    kv = kv_of(model)
    eye = torch.eye(n, dtype=torch.bool)
    rows = []
    for layer, m in mats.items():
        top = m.argmax(-1)                                               # [H, n]
        self_top = (top == torch.arange(n)).float().mean(-1)
        prev_top = ((top[:, has] == prev_t[has]).float().mean(-1) if bool(has.any())
                    else torch.full((m.shape[0],), float("nan")))
        diag = m[:, eye].mean(-1) - m[:, ~eye].mean(-1)
        for h in range(m.shape[0]):
            rows.append({"layer": layer, "head": h, "kv_head": int(kv[h]), "offset": offset,
                         "self_top": float(self_top[h]), "previous_item_top": float(prev_top[h]),
                         "self_minus_mean": float(diag[h]), "n_tokens": n})
    return pd.DataFrame(rows)


def matrix_frame(m: torch.Tensor, row_labels: list[str], col_labels: list[str]) -> pd.DataFrame:
    """A labelled DataFrame of one ``[n_rows, n_cols]`` circuit matrix (for figures and CSV)."""
    return pd.DataFrame(np.asarray(m, dtype=np.float64), index=row_labels, columns=col_labels)

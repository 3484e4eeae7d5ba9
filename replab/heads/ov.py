"""OV circuits on the embeddings: what a head writes into the logits when it attends to a token.

For query head ``h`` of layer ``l`` and a token set ``S`` the OV circuit is the ``|S| × |S|``
matrix

    M[s, t] = ln1(W_E[s]) · W_V[kv(h)] · W_O[h] · F · W_U[:, t]

(row: the attended source token ``s``; column: the logit of token ``t``; ``F`` the final
norm's linear part; norms as :mod:`replab.heads.weights` states). It is **per query head**:
the value map ``W_V`` belongs to the head's KV head and is shared by its group, but ``W_O``
is the query head's own.

Scores per head:

* ``copy``: the fraction of source tokens whose own logit is the largest in their row (the
  head, attending to " Monday", raises " Monday" most among the set);
* ``next_item``: the fraction of source tokens (with a successor) whose *following* item's
  logit is the largest in their row (" Monday" → " Tuesday"); NaN for unordered sets;
* ``eigen_copy``: Elhage et al.'s copying score of the full-vocabulary circuit
  ``W_E W_V W_O F W_U``: Σλ / Σ|λ| over its eigenvalues (computed on the ``d_head × d_head``
  factor; raw embeddings, no ``ln1`` scale), set-independent, in [-1, 1].
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from replab.heads.tokensets import TokenSet
from replab.heads.weights import final_linear, kv_of, layer_weights, normed_embeddings, unembed_columns


@torch.no_grad()
def ov_matrix(model, layer: int, head: int, tokens: TokenSet) -> torch.Tensor:
    """``[n, n]`` OV circuit of query head ``head`` of ``layer`` restricted to ``tokens``
    (rows: attended token; columns: logit of each token)."""
    return ov_matrices(model, tokens, layers=[layer])[layer][head]


@torch.no_grad()
def ov_matrices(model, tokens: TokenSet, layers=None) -> dict[int, torch.Tensor]:
    """``{layer: [n_heads, n, n]}``: every query head's OV circuit on ``tokens``."""
    layers = range(model.cfg.n_layers) if layers is None else layers
    cols = unembed_columns(model, tokens.ids)                       # [d, n]
    kv = kv_of(model)
    out = {}
    for layer in layers:
        w = layer_weights(model, layer)
        x = normed_embeddings(model, layer, tokens.ids)              # [n, d]
        v = torch.einsum("nd,kde->kne", x, w["W_V"])[kv]             # [H, n, dh] (KV head of each query head)
        o = torch.einsum("hne,hed->hnd", v, w["W_O"])                # [H, n, d]
        out[layer] = final_linear(model, o) @ cols                   # [H, n, n]
    return out


@torch.no_grad()
def eigen_copy_scores(model, layers=None) -> torch.Tensor:
    """``[L, H]`` Elhage copying score Σλ/Σ|λ| of ``W_E W_V W_O F W_U`` per query head.

    The nonzero eigenvalues of ``(W_E W_V)(W_O F W_U)`` are those of the ``d_head × d_head``
    matrix ``(W_O F W_U)(W_E W_V)``, so the vocabulary-sized matrix is never formed.
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    G = model.W_U.detach().float() @ model.W_E.detach().float()       # [d, d]: W_U W_E
    kv = kv_of(model)
    out = torch.zeros(len(layers), model.cfg.n_heads)
    for i, layer in enumerate(layers):
        w = layer_weights(model, layer)
        small = final_linear(model, w["W_O"]) @ G @ w["W_V"][kv]         # [H, dh, dh]
        lam = torch.linalg.eigvals(small.double())
        out[i] = (lam.sum(-1).real / lam.abs().sum(-1)).float()
    return out


def row_scores(m: torch.Tensor, next_index: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Copy and next-item scores of OV matrices ``m`` ``[..., n, n]``: ``([...], [...])``."""
    top = m.argmax(-1)                                               # [..., n]
    n = m.shape[-1]
    copy = (top == torch.arange(n)).float().mean(-1).numpy()
    nxt = torch.as_tensor(next_index)
    has = nxt >= 0
    if not bool(has.any()):
        return copy, np.full(copy.shape, np.nan)
    nexts = (top[..., has] == nxt[has]).float().mean(-1).numpy()
    return copy, nexts


def mean_ranks(m: torch.Tensor, next_index: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean rank (1 = top of its row) of each row's own token and of its next item, ``[...]``
    each; a tie-free companion of the copy and next-item scores (chance: (n + 1) / 2)."""
    n = m.shape[-1]
    ranks = m.argsort(-1, descending=True).argsort(-1) + 1           # [..., n, n]: rank of each column
    own = ranks.diagonal(dim1=-2, dim2=-1).float().mean(-1).numpy()
    nxt = torch.as_tensor(next_index)
    has = nxt >= 0
    if not bool(has.any()):
        return own, np.full(own.shape, np.nan)
    rows = torch.arange(n)[has]
    return own, ranks[..., rows, nxt[has]].float().mean(-1).numpy()


def ov_table(model, tokens: TokenSet, layers=None, eigen: bool = True) -> pd.DataFrame:
    """Tidy table, one row per query head: ``layer, head, kv_head, copy, next_item,
    copy_mean_rank, next_item_mean_rank, eigen_copy, n_tokens, n_next_pairs``."""
    mats = ov_matrices(model, tokens, layers)
    eig = eigen_copy_scores(model, list(mats)) if eigen else None
    kv = kv_of(model)
    rows = []
    for i, (layer, m) in enumerate(mats.items()):
        copy, nxt = row_scores(m, tokens.next_index)
        copy_rank, next_rank = mean_ranks(m, tokens.next_index)
        for h in range(m.shape[0]):
            rows.append({"layer": layer, "head": h, "kv_head": int(kv[h]), "copy": float(copy[h]),
                         "next_item": float(nxt[h]), "copy_mean_rank": float(copy_rank[h]),
                         "next_item_mean_rank": float(next_rank[h]),
                         "eigen_copy": float(eig[i, h]) if eig is not None else float("nan"),
                         "n_tokens": len(tokens), "n_next_pairs": int(sum(j >= 0 for j in tokens.next_index))})
    return pd.DataFrame(rows)

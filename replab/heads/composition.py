"""Q-, K- and V-composition scores between heads (Elhage et al., A Mathematical Framework).

For a sender head A in layer ``l_A`` and a receiver head B in a later layer ``l_B`` (row-vector
convention, as TransformerLens: ``W_OV = W_V W_O``, ``W_QK = W_Q W_Kᵀ``, all ``d × d``):

* Q-composition: ‖W_OV^A W_QK^B‖_F / (‖W_OV^A‖_F ‖W_QK^B‖_F) (A's output is B's query input);
* K-composition: ‖W_OV^A (W_QK^B)ᵀ‖_F / (…) (A's output is B's key input);
* V-composition: ‖W_OV^A W_OV^B‖_F / (‖W_OV^A‖_F ‖W_OV^B‖_F).

Weights are TransformerLens's processed ones (norm weights folded into ``W_Q``/``W_K``/``W_V``;
the norms' data-dependent scales are left out, as in TransformerLens).

**Grouped-query attention.** Every score is per **query head** on both sides: a query head's
``W_OV`` is ``W_V`` of its KV head times its own ``W_O``, and its ``W_QK`` is its own ``W_Q``
times its KV head's ``W_K``; query head ``h`` reads KV head ``h // (n_heads / n_kv_heads)``
(``repeat_interleave``, which TransformerLens's expanded ``W_K`` / ``W_V`` properties also
use, so its ``all_composition_scores`` is right for GQA and agrees within 1e-4, tested).
Heads of one group share ``W_K`` and ``W_V``, so their K- and V-side scores are correlated,
but they are not equal (``W_Q`` and ``W_O`` differ). Tiling the KV heads (``h % n_kv``)
instead would pair query heads with the wrong keys and values (a test shows it changes
the scores).

**Speed.** With thin QR factorisations ``W_V^A = U_A R_A`` and ``W_K^B = U'_B R'_B``
(orthonormal ``U``), ‖W_V^A W_O^A W_Q^B W_K^Bᵀ‖ = ‖A B‖ with ``A = R_A W_O^A`` (``dh × d``) and
``B = W_Q^B R'_Bᵀ`` (``d × dh``), and ‖A B‖²_F = ⟨AᵀA, B Bᵀ⟩ (a sum over ``d × d`` entries).
So one ``[L·H, d(d+1)/2] @ [d(d+1)/2, L·H]`` matrix product (upper triangles of the per-head
Gram matrices, float32) gives every pair: about 7 times fewer operations than forming each
pair's ``dh × dh`` product, and no ``d × d`` product matrix per pair.

**Baseline.** The score of random matrices of the same factored shapes (i.i.d. Gaussian
factors ``d × dh`` and ``dh × d``; the score does not depend on their scale), ``n_random``
seeded samples per mode: its mean and 95th percentile are reported next to the scores.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from replab.errors import ReplabError
from replab.heads.weights import all_weights, kv_of

MODES = ("q", "k", "v")


def parse_modes(mode) -> list[str]:
    """``"q"``, ``"q,k"``, ``"all"`` (or a list) -> a list of modes; ReplabError if unknown."""
    items = mode if isinstance(mode, (list, tuple)) else str(mode).lower().replace(" ", "").split(",")
    if items == ["all"]:
        return list(MODES)
    bad = [m for m in items if m not in MODES]
    if bad or not items:
        raise ReplabError(f"unknown composition mode {bad[0] if bad else mode!r} (q, k, v or all)")
    return list(dict.fromkeys(items))


def _triu(g: torch.Tensor) -> torch.Tensor:
    """``[n, d, d]`` symmetric -> ``[n, d(d+1)/2]`` upper triangles, off-diagonal entries times √2,
    so that the dot product of two rows is ⟨G, H⟩ = Σ_ij G_ij H_ij."""
    d = g.shape[-1]
    iu = torch.triu_indices(d, d)
    return g[:, iu[0], iu[1]] * torch.where(iu[0] == iu[1], 1.0, 2.0 ** 0.5)


def _gram(outer: torch.Tensor, inner: torch.Tensor, left: bool) -> torch.Tensor:
    """Per-head ``d × d`` Gram matrices ``[n, d, d]``: ``outerᵀ · inner · outer`` for a sender
    (``left``; e.g. W_Oᵀ (W_VᵀW_V) W_O = W_OVᵀ W_OV), else ``outer · inner · outerᵀ`` (e.g.
    W_Q (W_KᵀW_K) W_Qᵀ = W_QK W_QKᵀ). ``inner``: ``[n, dh, dh]``."""
    if left:                                                         # outer = W_O [n, dh, d]
        return outer.transpose(-1, -2) @ inner @ outer
    return outer @ inner @ outer.transpose(-1, -2)                   # outer [n, d, dh]


@torch.no_grad()
def grams(model, which: str, layers=None, layers_per_step: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(triangles [L·H, d(d+1)/2] float32, squared Frobenius norms [L·H] float64)`` of each
    query head's matrix (of ``layers``, default all) in the role ``which``: ``ov_left`` (W_OV, as
    a sender: G = W_OVᵀ W_OV), ``q_right`` (W_QK = W_Q W_Kᵀ: G = W_QK W_QKᵀ), ``k_right`` ((W_QK)ᵀ = W_K W_Qᵀ) or
    ``v_right`` (W_OV as a receiver). ‖A B‖²_F = ⟨AᵀA, B Bᵀ⟩ for every sender A, receiver B."""
    w = all_weights(model)
    if layers is not None:
        w = {k: v[list(layers)] for k, v in w.items()}
    kv = kv_of(model)
    W_Q, W_O = w["W_Q"], w["W_O"]                                    # [L, H, d, dh], [L, H, dh, d]
    W_K, W_V = w["W_K"][:, kv], w["W_V"][:, kv]                      # expanded per query head
    gramian = lambda x: x.transpose(-1, -2) @ x                      # noqa: E731  [.., dh, dh]
    outer, inner, left = {
        "ov_left": (W_O, gramian(W_V), True),                        # (W_V W_O)ᵀ(W_V W_O)
        "q_right": (W_Q, gramian(W_K), False),                       # W_Q W_Kᵀ W_K W_Qᵀ
        "k_right": (W_K, gramian(W_Q), False),                       # W_K W_Qᵀ W_Q W_Kᵀ
        "v_right": (W_V, W_O @ W_O.transpose(-1, -2), False),        # W_V W_O W_Oᵀ W_Vᵀ
    }[which]
    L, H = W_Q.shape[:2]
    tri = []
    for a in range(0, L, layers_per_step):
        o, i = outer[a:a + layers_per_step].flatten(0, 1), inner[a:a + layers_per_step].flatten(0, 1)
        tri.append(_triu(_gram(o, i, left)))
    # ‖M‖² = tr(G), from the small factors in float64: tr(inner · outer-gram)
    od, idd = outer.double(), inner.double()
    og = od @ od.transpose(-1, -2) if left else od.transpose(-1, -2) @ od   # [L, H, dh, dh]
    sq = (idd * og.transpose(-1, -2)).sum((-1, -2)).reshape(-1)
    return torch.cat(tri), sq


@torch.no_grad()
def composition_scores(model, mode: str = "q", left: tuple | None = None) -> torch.Tensor:
    """``[L, H, L, H]`` scores (sender layer, sender head, receiver layer, receiver head), zero
    where the receiver is not in a later layer (TransformerLens's layout). Per query head.

    ``left``: the senders' :func:`grams` (``"ov_left"``), shared between modes."""
    (mode,) = parse_modes(mode)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    scores = pair_scores(grams(model, "ov_left") if left is None else left,
                         grams(model, f"{mode}_right")).reshape(L, H, L, H)
    later = (torch.arange(L)[:, None, None, None] < torch.arange(L)[None, None, :, None])
    return torch.where(later, scores, torch.zeros((), dtype=scores.dtype)).float()


def pair_scores(left: tuple, right: tuple) -> torch.Tensor:
    """``[n_senders, n_receivers]`` float64 scores from :func:`grams` of senders (``ov_left``)
    and receivers (``<mode>_right``): sqrt(⟨G_A, H_B⟩ / (‖A‖² ‖B‖²))."""
    (ga, na2), (hb, nb2) = left, right
    sq = (ga @ hb.T).double().clamp_min(0)                            # squared numerators
    return (sq / na2[:, None] / nb2[None, :]).sqrt()


def random_baseline(d_model: int, d_head: int, n_random: int = 200, seed: int = 0) -> dict:
    """Composition scores of random factored matrices of the model's shapes: ``{mean, std,
    p95, n, seed}``. Sender ``V O`` and receiver ``X Y`` with i.i.d. Gaussian ``d × dh`` /
    ``dh × d`` factors (every mode's receiver has this shape, so one baseline serves all)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    out = []
    for start in range(0, n_random, 16):
        n = min(16, n_random - start)
        v, o, x, y = r(n, d_model, d_head), r(n, d_head, d_model), r(n, d_model, d_head), r(n, d_head, d_model)
        send = _gram(o, v.transpose(-1, -2) @ v, left=True)            # (V O)ᵀ(V O)   [n, d, d]
        recv = _gram(x, y @ y.transpose(-1, -2), left=False)           # (X Y)(X Y)ᵀ   [n, d, d]
        sq = (send * recv).sum((-1, -2))
        tr = lambda t: t.diagonal(dim1=-2, dim2=-1).sum(-1)           # noqa: E731
        out.append((sq / tr(send) / tr(recv)).sqrt())
    s = torch.cat(out).numpy()
    return {"mean": float(s.mean()), "std": float(s.std(ddof=1)), "p95": float(np.quantile(s, 0.95)),
            "n": n_random, "seed": seed}


def composition_table(model, modes="all", n_random: int = 200, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Tidy table of every (sender, later receiver) query-head pair per mode, and the baselines.

    Columns: ``mode, sender_layer, sender_head, sender_kv_head, receiver_layer, receiver_head,
    receiver_kv_head, score, baseline_mean, above_baseline`` (score − baseline mean).
    Returns ``(table, {mode: baseline dict})``.
    """
    left = grams(model, "ov_left")
    kv = kv_of(model).numpy()
    cfg = model.cfg
    tables, baselines = [], {}
    L, H = cfg.n_layers, cfg.n_heads
    la, ha, lb, hb = np.meshgrid(np.arange(L), np.arange(H), np.arange(L), np.arange(H), indexing="ij")
    keep = (la < lb).reshape(-1)
    base = random_baseline(cfg.d_model, cfg.d_head, n_random, seed)
    for mode in parse_modes(modes):
        s = composition_scores(model, mode, left).numpy().reshape(-1)[keep]
        baselines[mode] = base
        tables.append(pd.DataFrame({
            "mode": mode, "sender_layer": la.reshape(-1)[keep], "sender_head": ha.reshape(-1)[keep],
            "sender_kv_head": kv[ha.reshape(-1)[keep]], "receiver_layer": lb.reshape(-1)[keep],
            "receiver_head": hb.reshape(-1)[keep], "receiver_kv_head": kv[hb.reshape(-1)[keep]],
            "score": s.astype(np.float64), "baseline_mean": base["mean"],
            "above_baseline": s.astype(np.float64) - base["mean"]}))
    return pd.concat(tables, ignore_index=True), baselines


def top_pairs(table: pd.DataFrame, k: int = 20) -> pd.DataFrame:
    """The ``k`` highest-scoring pairs of each mode."""
    return (table.sort_values("score", ascending=False).groupby("mode", sort=False).head(k)
            .reset_index(drop=True))

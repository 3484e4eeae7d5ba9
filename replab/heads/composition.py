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

**Speed.** The ``d × d`` matrices are never formed. With thin QR factorisations
``W_V^A = U_A R_A`` and ``W_K^B = U'_B R'_B`` (orthonormal ``U``),
‖W_V^A W_O^A W_Q^B W_K^Bᵀ‖ = ‖R_A W_O^A W_Q^B R'_Bᵀ‖, a ``d_head × d_head`` product, so all
pairs of a sender layer are one ``[H·dh, d] @ [d, (later heads)·dh]`` matrix product.

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


def _r_factor(w: torch.Tensor) -> torch.Tensor:
    """``R`` of the thin QR of ``w`` ``[..., d, dh]``: ``[..., dh, dh]`` with ‖w X‖ = ‖R X‖."""
    return torch.linalg.qr(w.double(), mode="r").R


@torch.no_grad()
def factors(model) -> dict[str, torch.Tensor]:
    """Reduced factors per query head, float64, each equal to its ``d × d`` matrix up to an
    isometry (so every product norm is preserved): ``ov_left`` ``[L, H, dh, d]`` for W_OV as
    a sender (``R_V W_O``); ``q_right``, ``k_right``, ``v_right`` ``[L, H, d, dh]`` for W_QK,
    (W_QK)ᵀ and W_OV as receivers (``W_Q R_Kᵀ``, ``W_K R_Qᵀ``, ``W_V R_Oᵀ``)."""
    w = all_weights(model)
    kv = kv_of(model)
    W_Q, W_O = w["W_Q"].double(), w["W_O"].double()                  # [L, H, d, dh], [L, H, dh, d]
    W_K, W_V = w["W_K"].double()[:, kv], w["W_V"].double()[:, kv]      # expanded per query head
    R_V, R_K, R_Q = _r_factor(W_V), _r_factor(W_K), _r_factor(W_Q)
    R_O = _r_factor(W_O.transpose(-1, -2))                            # W_Oᵀ = U R_O -> W_O = R_Oᵀ Uᵀ
    return {
        # ‖W_V W_O X‖ = ‖R_V W_O X‖ (left factor of W_OV for any right factor X)
        "ov_left": R_V @ W_O,                                         # [L, H, dh, d]
        # W_QK = W_Q W_Kᵀ; ‖Y W_Q W_Kᵀ‖ = ‖Y W_Q R_Kᵀ‖
        "q_right": W_Q @ R_K.transpose(-1, -2),                       # [L, H, d, dh]
        # (W_QK)ᵀ = W_K W_Qᵀ; ‖Y W_K W_Qᵀ‖ = ‖Y W_K R_Qᵀ‖
        "k_right": W_K @ R_Q.transpose(-1, -2),
        # W_OV = W_V W_O = W_V R_Oᵀ Uᵀ; ‖Y W_V W_O‖ = ‖Y W_V R_Oᵀ‖
        "v_right": W_V @ R_O.transpose(-1, -2),
    }


def _norms(f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.flatten(-2).norm(dim=-1) for k, v in f.items()}       # [L, H] Frobenius norms


@torch.no_grad()
def composition_scores(model, mode: str = "q", f: dict | None = None) -> torch.Tensor:
    """``[L, H, L, H]`` scores (sender layer, sender head, receiver layer, receiver head), zero
    where the receiver is not in a later layer (TransformerLens's layout). Per query head."""
    (mode,) = parse_modes(mode)
    f = factors(model) if f is None else f
    n = _norms(f)
    left = f["ov_left"]                                               # [L, H, dh, d]
    right = f[f"{mode}_right"]                                        # [L, H, d, dh]
    L, H, dh, d = left.shape
    out = torch.zeros(L, H, L, H, dtype=torch.float64)
    for la in range(L - 1):
        a = left[la].reshape(H * dh, d)                               # [H·dh, d]
        b = right[la + 1:].permute(2, 0, 1, 3).reshape(d, -1)          # [d, (L-la-1)·H·dh]
        prod = (a @ b).reshape(H, dh, L - la - 1, H, dh)
        num = prod.pow(2).sum(dim=(1, 4)).sqrt()                      # [H, L', H]
        out[la, :, la + 1:] = num / n["ov_left"][la][:, None, None] / n[f"{mode}_right"][la + 1:][None]
    return out.float()


def random_baseline(d_model: int, d_head: int, mode: str = "q", n_random: int = 200,
                    seed: int = 0) -> dict:
    """Composition scores of random factored matrices of the model's shapes: ``{mean, std,
    p95, n}``. Factors are i.i.d. Gaussian (``d × dh`` and ``dh × d``)."""
    (mode,) = parse_modes(mode)
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    scores = []
    for _ in range(n_random):
        ov = r(d_model, d_head) @ r(d_head, d_model)
        other = r(d_model, d_head) @ r(d_head, d_model)               # a W_QK, its transpose or a W_OV
        scores.append(float((ov @ other).norm() / ov.norm() / other.norm()))
    s = np.asarray(scores)
    return {"mean": float(s.mean()), "std": float(s.std(ddof=1)), "p95": float(np.quantile(s, 0.95)),
            "n": n_random, "seed": seed}


def composition_table(model, modes="all", n_random: int = 200, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Tidy table of every (sender, later receiver) query-head pair per mode, and the baselines.

    Columns: ``mode, sender_layer, sender_head, sender_kv_head, receiver_layer, receiver_head,
    receiver_kv_head, score, baseline_mean, above_baseline`` (score − baseline mean).
    Returns ``(table, {mode: baseline dict})``.
    """
    f = factors(model)
    kv = kv_of(model).numpy()
    cfg = model.cfg
    tables, baselines = [], {}
    L, H = cfg.n_layers, cfg.n_heads
    la, ha, lb, hb = np.meshgrid(np.arange(L), np.arange(H), np.arange(L), np.arange(H), indexing="ij")
    keep = (la < lb).reshape(-1)
    for mode in parse_modes(modes):
        s = composition_scores(model, mode, f).numpy().reshape(-1)[keep]
        base = random_baseline(cfg.d_model, cfg.d_head, mode, n_random, seed)
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

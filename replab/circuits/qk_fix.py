"""The QK fix of AtP* (Kramár et al. 2024): exact attention patterns for query and key edges.

A first-order estimate through the attention softmax fails where the softmax saturates. For an
edge ``u -> v`` into a query input (head ``h``) or a key input (KV head ``g``), the pattern is
recomputed exactly from ``x_v + Δ_u`` (the block's own norm, the head's projection and bias,
rotary, ``1/attn_scale``, soft-cap, causal mask, softmax), and only the rest of the network is
linearised: ``Σ (pattern' − pattern) · ∂M/∂pattern`` over the query heads that read ``v``.
:func:`qk_fixed_estimates` also returns how far its recomputation at ``Δ = 0`` is from the
model's own ``hook_pattern`` (the run stops above :data:`QK_TOL`).
"""

from __future__ import annotations

import numpy as np
import torch

from replab.circuits.graph import EdgeGraph

#: Largest allowed difference between the recomputed and the model's attention pattern.
QK_TOL = 1e-4


def _qk_offsets(graph: EdgeGraph) -> dict:
    """Flat edge offsets of each layer's q and k receivers: ``{layer: (q_start, k_start, up)}``."""
    offsets = np.concatenate([[0], np.cumsum(graph.upstream)])
    h, k = graph.n_heads, graph.n_kv_heads
    out = {}
    for layer in range(graph.n_layers):
        r0 = layer * (h + 2 * k + 1)
        out[layer] = (int(offsets[r0]), int(offsets[r0 + h]), int(graph.upstream[r0]))
    return out


def _scores_fn(model, layer: int):
    """Attention pattern of one query head from rotated q ``[B, T, dh]`` and k ``[B, T, dh]``."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    attn = model.blocks[layer].attn

    def pattern(q, k):
        s = q @ k.transpose(-1, -2) / attn.attn_scale
        s = apply_softcap(s, model.cfg.attn_scores_soft_cap)
        s = attn.apply_causal_mask(s[:, None], 0, None)[:, 0]
        return torch.softmax(s, dim=-1)
    return pattern


def _project(model, layer: int, xn: torch.Tensor, which: str) -> torch.Tensor:
    """Rotated queries ``[B, T, H, dh]`` or keys ``[B, T, K, dh]`` of normalised inputs ``[B, T, d]``."""
    attn = model.blocks[layer].attn
    if which == "q":
        w, b = attn.W_Q, attn.b_Q
    else:
        w = getattr(attn, "_W_K", attn.W_K)
        b = getattr(attn, "_b_K", attn.b_K)
    out = torch.einsum("btd,hde->bthe", xn, w) + b
    if model.cfg.positional_embedding_type == "rotary":
        out = attn.apply_rotary(out, 0, None)
    return out


@torch.inference_mode()
def qk_fixed_estimates(model, graph: EdgeGraph, delta: torch.Tensor, passes: list[dict],
                       chunk_floats: int = 2 ** 23) -> tuple[np.ndarray, float]:
    """QK-fixed estimates of every q and k edge for each gradient set in ``passes``.

    Args:
        delta: sender output differences ``[N, T, S, d_model]`` (corrupt − clean, graph order).
        passes: backward passes; ``passes[0]["acts"]`` holds the clean ``resid_pre`` per layer
            ``[N, T, d]`` and ``("pattern", layer)`` ``[N, H, T, T]``; every pass's ``"grads"``
            holds ``("pattern", layer)``, the metric's gradient at the pattern.
        chunk_floats: bound on the senders' perturbed inputs computed at once.
    Returns:
        ``([n_passes, n_edges] estimates (other edges 0), max |recomputed − hook_pattern|)``.
    """
    cfg = model.cfg
    n, t = delta.shape[:2]
    h, kv = graph.n_heads, graph.n_kv_heads
    group = h // kv
    offsets = _qk_offsets(graph)
    out = np.zeros((len(passes), graph.n_edges))
    worst = 0.0
    for layer in range(graph.n_layers):
        x = passes[0]["acts"]["resid_pre"][layer]                       # [n, T, d] clean input
        ln = model.blocks[layer].ln1
        pattern_fn = _scores_fn(model, layer)
        xn = ln(x)
        q0, k0 = _project(model, layer, xn, "q"), _project(model, layer, xn, "k")
        pat = passes[0]["acts"][("pattern", layer)]                    # [n, H, T, T]
        for hq in range(h):
            re = pattern_fn(q0[:, :, hq], k0[:, :, hq // group])
            worst = max(worst, float((re - pat[:, hq]).abs().max()))
        grads = torch.stack([p["grads"][("pattern", layer)] for p in passes])   # [G, n, H, T, T]
        q_start, k_start, up = offsets[layer]
        step = max(1, chunk_floats // (n * t * cfg.d_model))
        for s0 in range(0, up, step):
            s1 = min(up, s0 + step)
            xs = (x[:, :, None] + delta[:, :, s0:s1]).permute(2, 0, 1, 3).reshape(-1, t, cfg.d_model)
            xsn = ln(xs)
            m = s1 - s0
            qs = _project(model, layer, xsn, "q").reshape(m, n, t, h, -1)
            ks = _project(model, layer, xsn, "k").reshape(m, n, t, kv, -1)
            for hq in range(h):               # q edges into head hq: new queries, clean keys
                g = hq // group
                new = pattern_fn(qs[:, :, :, hq].reshape(m * n, t, -1),
                                 k0[:, :, g].repeat(m, 1, 1)).reshape(m, n, t, t)
                dp = new - pat[None, :, hq]
                est = torch.einsum("snij,gnij->gs", dp, grads[:, :, hq])
                out[:, q_start + hq * up + s0:q_start + hq * up + s1] = est.double().cpu().numpy()
            for g in range(kv):               # k edges into KV head g: new keys, clean queries
                est = 0
                for hq in range(g * group, (g + 1) * group):
                    new = pattern_fn(q0[:, :, hq].repeat(m, 1, 1),
                                     ks[:, :, :, g].reshape(m * n, t, -1)).reshape(m, n, t, t)
                    dp = new - pat[None, :, hq]
                    est = est + torch.einsum("snij,gnij->gs", dp, grads[:, :, hq])
                out[:, k_start + g * up + s0:k_start + g * up + s1] = est.double().cpu().numpy()
    return out, worst


def qk_edge_mask(graph: EdgeGraph) -> np.ndarray:
    """Bool ``[n_edges]``: edges into a query or key input (the ones the QK fix changes)."""
    kinds = np.array([r[0] for r in graph.receivers])
    return np.isin(kinds[graph.edge_receiver], ("q", "k"))

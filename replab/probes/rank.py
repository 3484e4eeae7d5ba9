"""Low rank: how many directions does a label need?

* :func:`fit_lowrank` - batched reduced-rank multinomial logistic regression.
* :func:`smallest_rank` - the smallest rank whose accuracy is within ``epsilon`` of full rank.
* :func:`cluster_directions` - hierarchical clustering of class directions by cosine
  distance, with the dendrogram and a largest-gap cut (used when the answer is high-rank:
  which classes share a feature?).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


def fit_lowrank(z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, lam: torch.Tensor,
                rank: int, init, max_iter: int = 200, info: dict | None = None):
    """Fit ``P`` rank-``k`` multinomial logistic problems sharing ``z``.

    ``W_p = A_p @ B_p`` (``A [d, k]``, ``B [k, K]``) minimises
    ``mean CE(z W_p + b_p) + lam_p / 2 ||W_p||^2`` over the masked rows, by L-BFGS
    started from the rank-``k`` truncated SVD of the full-rank solution ``init``.

    Args:
        z: ``[n, d]``; y: ``[P, n]`` labels; mask: ``[P, n]`` training rows; lam: ``[P]``.
        rank: ``k``.
        init: ``(W [P, d, K], b [P, K])`` full-rank solutions.
        info: if given, receives ``n_iter`` (L-BFGS iterations taken).

    Returns:
        ``(W [P, d, K], b [P, K])`` with ``rank(W_p - mean over classes) <= k``.
    """
    w0, b0 = init
    P, d, K = w0.shape
    wc = w0 - w0.mean(2, keepdim=True)
    u, s, vh = torch.linalg.svd(wc, full_matrices=False)          # [P,d,K], [P,K], [P,K,K]
    k = min(rank, K)
    root = s[:, :k].sqrt()
    A0 = u[:, :, :k] * root[:, None, :]
    B0 = root[:, :, None] * vh[:, :k, :]
    sizes = [A0.numel(), B0.numel(), b0.numel()]
    theta = torch.cat([A0.reshape(-1), B0.reshape(-1), b0.float().reshape(-1)]).requires_grad_(True)

    def unpack(t):
        a, bb, c = torch.split(t, sizes)
        return a.view(P, d, k), bb.view(P, k, K), c.view(P, K)

    maskf = mask.float()
    n_p = maskf.sum(1).clamp_min(1)
    yl = y.long().clamp_min(0)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        A, B, b = unpack(theta)
        h = torch.einsum("nd,pdk->pnk", z, A)                      # [P, n, k]
        logits = h @ B + b[:, None, :]                             # [P, n, K]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, K), yl.reshape(-1),
                                               reduction="none").view(P, -1)
        W = A @ B
        loss = ((ce * maskf).sum(1) / n_p + 0.5 * lam * W.pow(2).sum((1, 2))).sum()
        loss.backward()
        return loss

    opt.step(closure)
    if info is not None:
        info["n_iter"] = int(opt.state[theta].get("n_iter", 0))
    A, B, b = unpack(theta.detach())
    return (A @ B).detach(), b.detach()


def smallest_rank(records: pd.DataFrame, epsilon: float = 0.02,
                  metric: str = "balanced_accuracy") -> pd.DataFrame:
    """Per layer: the smallest low rank within ``epsilon`` of the full-rank logistic probe.

    Args:
        records: sweep records with ``kind`` in {"logistic", "lowrank"}.
        epsilon: tolerance in accuracy units (0.02 = 2 points).

    Returns:
        DataFrame ``layer, full, smallest_rank, rank_accuracy`` (``smallest_rank`` is
        NaN when no tried rank gets within ``epsilon``).
    """
    out = []
    full = records[records["kind"] == "logistic"].set_index("layer")[metric]
    low = records[records["kind"] == "lowrank"]
    for layer, g in low.groupby("layer"):
        if layer not in full.index:
            continue
        g = g.sort_values("rank")
        ok = g[g[metric] >= full[layer] - epsilon]
        r = int(ok["rank"].iloc[0]) if len(ok) else np.nan
        out.append({"layer": int(layer), "full": float(full[layer]), "smallest_rank": r,
                    "rank_accuracy": dict(zip(g["rank"].astype(int), g[metric].round(4), strict=True))})
    return pd.DataFrame(out)


def cluster_directions(directions: np.ndarray, classes) -> dict:
    """Hierarchical clustering (average link, cosine distance) of class directions ``[K, d]``.

    The full dendrogram is reported, and one cut: between the two consecutive merges with
    the largest gap in distance (the most pronounced level of grouping; a heuristic - read
    the merge distances too).

    Returns:
        ``{"clusters": {class: id}, "n_clusters": int, "cut_distance": float | None,
        "dendrogram": {"order": [class, ...] (leaf order), "merges": [{"a": [classes],
        "b": [classes], "distance": cosine distance}, ...] (in merge order)}}``.
    """
    from scipy.cluster.hierarchy import leaves_list, linkage

    classes = [str(c) for c in classes]
    K = len(classes)
    if K < 3:
        return {"clusters": {c: i for i, c in enumerate(classes)}, "n_clusters": K,
                "cut_distance": None, "dendrogram": {"order": classes, "merges": []}}
    Z = linkage(np.asarray(directions, dtype=np.float64), method="average", metric="cosine")
    members = {i: [classes[i]] for i in range(K)}
    merges = []
    for i, (a, b, dist, _) in enumerate(Z):
        merges.append({"a": members[int(a)], "b": members[int(b)], "distance": round(float(dist), 4)})
        members[K + i] = members[int(a)] + members[int(b)]
    heights = Z[:, 2]
    gaps = np.diff(heights)                    # gap between merge i and merge i + 1
    cut = int(np.argmax(gaps))                 # keep merges 0..cut
    group = {c: c for c in classes}
    for m in merges[:cut + 1]:
        root = group[m["a"][0]]
        for c in m["a"] + m["b"]:
            group[c] = root
    remap: dict[str, int] = {}
    clusters = {c: remap.setdefault(group[c], len(remap)) for c in classes}
    return {"clusters": clusters, "n_clusters": len(remap),
            "cut_distance": round(float((heights[cut] + heights[cut + 1]) / 2), 4),
            "dendrogram": {"order": [classes[i] for i in leaves_list(Z)], "merges": merges}}

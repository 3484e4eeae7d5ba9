"""Vectorised lens statistics for every (prompt, point, position) cell.

:func:`lens_arrays` is the engine behind :func:`replab.lenses.table.lens_table`:

1. **Prefix sharing.** In a causal model the residual at position ``t`` depends only on
   tokens ``0..t``, so cells whose token prefixes are equal have equal residuals at every
   point. Cells are mapped to unique prefixes (``Today it is`` is decoded once for all
   seven ``Today it is <day> ...`` prompts): 420 -> 236 decodes on ``next_day``,
   744 -> 498 on ``fact_recall``. Prompts whose every prefix occurs in an earlier prompt
   are not even run.
2. **Batched forwards without padding.** The remaining prompts run in batches of equal
   token length (:func:`length_batches`), so each cell is exactly what a one-prompt
   forward gives, for any model and tokenizer (no attention masks or padding side).
3. **Batched decoding.** For each point, ``MAX_ROWS`` unique cells at a time go through
   the lens (one ``[rows, d_model] x [d_model, vocab]`` matmul) and are reduced in torch
   (:func:`cell_stats`: top-k, entropy, KL to the final point); target probability and
   rank are per (cell, target), gathered from the same log-probabilities.

Everything is returned as numpy arrays, one row per cell in (prompt, point, position)
order; :func:`replab.lenses.table.table_from_arrays` turns them into the DataFrame.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from replab.errors import ReplabError
from replab.lenses.decoders import Decoder

#: unique cells decoded together per point: bounds memory at ~5 x rows x vocab floats
#: (25 MB each for SmolLM2). 128 and 256 took the same time on next_day (24-25 CPU-s).
MAX_ROWS = 128
#: cells (tokens) per group of prompts whose residuals are held at once (all points)
MAX_CELLS = 2048


def length_batches(lengths: list[int], max_rows: int | None = MAX_ROWS,
                   max_batch: int | None = None) -> list[list[int]]:
    """Indices grouped by equal length (no padding needed), in batches of at most
    ``max_batch`` items and ``max_rows`` cells (``len(batch) * length``), at least one item."""
    groups = defaultdict(list)
    for i, n in enumerate(lengths):
        groups[n].append(i)
    out = []
    for n, idx in sorted(groups.items()):
        size = len(idx) if max_rows is None else max(1, max_rows // max(n, 1))
        size = size if max_batch is None else min(size, max_batch)
        out += [idx[s:s + size] for s in range(0, len(idx), size)]
    return out


def prefix_index(ids: list[list[int]]) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Unique token prefixes of ``ids``.

    Returns ``(cell_u, first)``: ``cell_u[j][t]`` is the prefix id of ``ids[j][:t + 1]``;
    ``first[u] = (j, t)`` is the first cell with prefix ``u``.
    """
    index: dict[tuple[int, int], int] = {}
    cell_u, first = [], []
    for j, x in enumerate(ids):
        us, parent = [], -1
        for t, tok in enumerate(x):
            key = (parent, int(tok))  # a prefix = (its own prefix, last token): O(1) keys
            u = index.get(key)
            if u is None:
                u = index[key] = len(first)
                first.append((j, t))
            us.append(u)
            parent = u
        cell_u.append(np.asarray(us, dtype=np.int64))
    return cell_u, first


@torch.no_grad()
def unique_residuals(decoder: Decoder, ids: list[list[int]], first: list[tuple[int, int]],
                     max_rows: int = MAX_ROWS) -> torch.Tensor:
    """``resid [n_points, n_unique, d_model]`` of every unique prefix (its last position)."""
    owned = defaultdict(list)  # prompt -> [(u, t)] of the prefixes it is first to contain
    for u, (j, t) in enumerate(first):
        owned[j].append((u, t))
    owners = sorted(owned)
    resid = None
    for batch in length_batches([len(ids[j]) for j in owners], max_rows):
        js = [owners[b] for b in batch]
        r = decoder.residuals(torch.tensor([ids[j] for j in js]))  # [n_points, b, pos, d]
        if resid is None:
            resid = r.new_empty(r.shape[0], len(first), r.shape[-1])
        rows = [(row, u, t) for row, j in enumerate(js) for u, t in owned[j]]
        row_i, u_i, t_i = (torch.tensor(c) for c in zip(*rows, strict=True))
        resid[:, u_i] = r[:, row_i, t_i]
    return resid


@torch.no_grad()
def cell_stats(logp: torch.Tensor, final_p: torch.Tensor, final_neg_entropy: torch.Tensor,
               k: int = 5) -> dict[str, torch.Tensor]:
    """Per-cell statistics of one point's lens distribution.

    Args:
        logp: ``[n, d_vocab]`` lens log-probabilities of ``n`` cells.
        final_p: ``[n, d_vocab]`` probabilities of the final point (the model) at the same cells.
        final_neg_entropy: ``[n]`` ``sum(p_final * log p_final)``.

    Returns:
        ``top_i, top_p [n, k]``; ``entropy, kl [n]`` in nats (``kl = KL(p_final || p_lens)``,
        clamped at 0).
    """
    entropy = -torch.linalg.vecdot(logp.exp(), logp)
    kl = (final_neg_entropy - torch.linalg.vecdot(final_p, logp)).clamp_min(0)
    top_lp, top_i = logp.topk(k, dim=-1)
    return {"top_i": top_i, "top_p": top_lp.exp(), "entropy": entropy, "kl": kl}


@torch.no_grad()
def lens_arrays(decoder: Decoder, ids: list[list[int]], targets: list[int | None], k: int = 5,
                max_rows: int = MAX_ROWS, max_cells: int = MAX_CELLS,
                bar=None) -> dict[str, np.ndarray]:
    """Per-cell arrays for token-id lists ``ids``, rows in (prompt, point, position) order.

    Returns numpy arrays over ``n_rows = n_points * sum(len(x) for x in ids)``:
    ``prompt_id, point_index, position, token_id, target_id`` (-1: none), ``top_i, top_p
    [n_rows, k]``, ``entropy, kl, target_prob`` (NaN without target), ``target_rank``
    (0 = top-1; -1 without target). ``bar.advance(n)`` (optional) is called in prompts.
    """
    if any(len(x) == 0 for x in ids):
        raise ReplabError(f"prompt {[len(x) for x in ids].index(0)} has no tokens")
    parts, start = [], 0
    while start < len(ids):  # groups of prompts bound the residuals held in memory
        stop, cells = start, 0
        while stop < len(ids) and (stop == start or cells + len(ids[stop]) <= max_cells):
            cells += len(ids[stop])
            stop += 1
        part = _group_arrays(decoder, ids[start:stop], targets[start:stop], k, max_rows, bar)
        part["prompt_id"] += start
        parts.append(part)
        start = stop
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _log_probs(decoder: Decoder, resid: torch.Tensor, idx: list[int], s: int, e: int):
    """``[len(idx), e - s, d_vocab]`` log-probs of unique cells ``s:e`` at points ``idx``."""
    out = decoder.decode_points(resid[idx, s:e], idx).float()
    out -= out.logsumexp(-1, keepdim=True)  # log-softmax in place: one buffer fewer
    return out


def _each_point(decoder: Decoder, resid: torch.Tensor, s: int, e: int, final: torch.Tensor,
                max_rows: int):
    """Yields ``(point index, log-probs [e - s, d_vocab])`` for every point; the final point
    is ``final`` (already computed). Few cells: several points share one matmul."""
    last = resid.shape[0] - 1
    step = max(1, max_rows // (e - s))
    for i0 in range(0, last, step):
        idx = list(range(i0, min(i0 + step, last)))
        yield from zip(idx, _log_probs(decoder, resid, idx, s, e), strict=True)
    yield last, final


def _group_arrays(decoder: Decoder, ids, targets, k: int, max_rows: int,
                  bar=None) -> dict[str, np.ndarray]:
    n_points = len(decoder.points)
    cell_u, first = prefix_index(ids)
    resid = unique_residuals(decoder, ids, first, max_rows)     # [n_points, n_u, d]
    n_u = len(first)
    # the cells: (prompt, position) pairs, prompt-major
    sizes = np.array([len(x) for x in ids])
    c_prompt = np.repeat(np.arange(len(ids)), sizes)
    c_u = np.concatenate(cell_u)
    c_tgt = np.repeat([-1 if t is None else int(t) for t in targets], sizes)
    with_tgt = np.flatnonzero(c_tgt >= 0)
    u_out = {"top_i": np.zeros((n_points, n_u, k), np.int64),
             "top_p": np.zeros((n_points, n_u, k), np.float32),
             "entropy": np.zeros((n_points, n_u), np.float32),
             "kl": np.zeros((n_points, n_u), np.float32)}
    t_prob = np.full((n_points, len(c_u)), np.nan, np.float32)
    t_rank = np.full((n_points, len(c_u)), -1, np.int64)
    for s in range(0, n_u, max_rows):
        e = min(s + max_rows, n_u)
        final = _log_probs(decoder, resid, [n_points - 1], s, e)[0]
        if k > final.shape[-1]:
            raise ReplabError(f"top-k ({k}) is larger than the vocabulary ({final.shape[-1]})")
        final_p = final.exp()
        neg_h = torch.linalg.vecdot(final_p, final)
        sel = with_tgt[(c_u[with_tgt] >= s) & (c_u[with_tgt] < e)]  # cells with a target here
        for i, logp in _each_point(decoder, resid, s, e, final, max_rows):
            st = cell_stats(logp, final_p, neg_h, k)
            for key in u_out:
                u_out[key][i, s:e] = st[key].cpu().numpy()
            for q in range(0, len(sel), max_rows):  # bounded [rows, vocab] comparisons
                cells = sel[q:q + max_rows]
                rows = torch.from_numpy(c_u[cells] - s)
                t_logp = logp[rows, torch.from_numpy(c_tgt[cells])]
                t_rank[i, cells] = (logp[rows] > t_logp.unsqueeze(-1)).sum(-1).cpu().numpy()
                t_prob[i, cells] = t_logp.exp().cpu().numpy()
            if bar is not None:  # in prompts: this group's share of the decoding done
                bar.advance(len(ids) * (e - s) / (n_u * n_points))
    # rows: for each prompt, for each point, its cells in position order
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    row_cell = np.concatenate([off + np.tile(np.arange(n), n_points)
                               for off, n in zip(offsets, sizes, strict=True)])
    row_point = np.concatenate([np.repeat(np.arange(n_points), n) for n in sizes])
    row_u = c_u[row_cell]
    out = {key: v[row_point, row_u] for key, v in u_out.items()}
    out.update({
        "prompt_id": c_prompt[row_cell], "point_index": row_point,
        "position": row_cell - offsets[c_prompt[row_cell]],
        "token_id": np.concatenate([np.asarray(x, np.int64) for x in ids])[row_cell],
        "target_id": c_tgt[row_cell],
        "target_prob": t_prob[row_point, row_cell], "target_rank": t_rank[row_point, row_cell],
    })
    return out

"""Inspect SAE latents: store encodings, top-activating examples, logit effects.

* :func:`encode_store` — stream an activation store's rows at the SAE's hook through the
  encoder in chunks: per-latent sums for chosen row groups and the top rows per latent,
  without ever holding ``[rows, d_sae]`` in memory.
* :func:`top_examples` — the top-activating store rows of given latents, with the prompt
  text and the token at the stored position highlighted as ``«token»``.
* :func:`logit_effects` — each latent's direct effect on the logits, ``decoder_row @ W_U``
  (the model's unembedding; SmolLM2's final-norm weight is folded into ``W_U``): top and
  bottom tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from replab.errors import ReplabError
from replab.features.sae.splice import decoder_rows, sae_encode
from replab.prompts import token_ids

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

OPEN, CLOSE = "«", "»"


@torch.no_grad()
def encode_store(sae, acts, groups: dict[str, np.ndarray] | None = None, top_n: int = 5,
                 keep: np.ndarray | None = None, chunk: int = 2048) -> dict:
    """Encode ``acts [rows, d_in]`` (e.g. a memory-mapped store tensor) chunk by chunk.

    Args:
        keep: boolean mask [rows]; other rows are skipped (row numbers stay store rows).
        groups: ``{name: boolean mask [rows]}``; per-latent sums over each group's rows.
        top_n: keep the ``top_n`` rows with the largest activation per latent.

    Returns:
        ``{"sums": {name: [d_sae]}, "counts": {name: n_rows}, "freq": [d_sae] (fraction of
        kept rows where the latent fires), "top_val": [top_n, d_sae], "top_row": [top_n, d_sae]}``
        (numpy; ``top_row`` is -1 where fewer rows exist).
    """

    n = len(acts)
    keep = np.ones(n, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    d_sae = int(sae.cfg.d_sae)
    groups = groups or {}
    sums = {k: torch.zeros(d_sae, dtype=torch.float64) for k in groups}
    fires = torch.zeros(d_sae, dtype=torch.float64)
    k = max(1, min(top_n, n))
    top_val = torch.full((k, d_sae), -float("inf"))
    top_row = torch.full((k, d_sae), -1, dtype=torch.long)
    for s in range(0, n, chunk):
        x = torch.from_numpy(np.array(acts[s:s + chunk], dtype=np.float32))
        z = sae_encode(sae, x).float().cpu()
        kept = torch.as_tensor(keep[s:s + chunk])
        z[~kept] = 0
        fires += (z != 0).double().sum(0)
        for name, mask in groups.items():
            m = torch.as_tensor(np.asarray(mask[s:s + chunk], dtype=bool))
            if m.any():
                sums[name] += z[m].double().sum(0)
        rows = torch.arange(s, s + len(z)).unsqueeze(1).expand(-1, d_sae)
        vals = torch.cat([top_val, z.masked_fill(~kept[:, None], -float("inf"))])
        idx = torch.cat([top_row, rows])
        best = vals.topk(k, dim=0)
        top_val, top_row = best.values, idx.gather(0, best.indices)
    return {"sums": {k_: v.cpu().numpy() for k_, v in sums.items()},
            "counts": {name: int(np.asarray(m, dtype=bool).sum()) for name, m in groups.items()},
            "freq": (fires / max(int(keep.sum()), 1)).cpu().numpy(), "top_val": top_val.cpu().numpy(),
            "top_row": top_row.cpu().numpy()}


def highlight(tokenizer, prompt: str, position: int, prepend_bos: bool = False) -> str:
    """``prompt`` with the token at ``position`` wrapped as ``«token»``."""

    try:
        ids = token_ids(tokenizer, prompt, prepend_bos=prepend_bos)
    except ReplabError:
        return prompt
    if not 0 <= position < len(ids):
        return prompt
    before = tokenizer.decode(ids[:position])
    tok = tokenizer.decode(ids[position:position + 1])
    after = tokenizer.decode(ids[position + 1:])
    return f"{before}{OPEN}{tok}{CLOSE}{after}"


def top_examples(encoded: dict, index: pd.DataFrame, latents, tokenizer=None,
                 prepend_bos: bool = False, extra_columns=()) -> pd.DataFrame:
    """Top-activating store rows of ``latents`` (from :func:`encode_store`).

    Returns one row per (latent, rank) with activation > 0: ``latent, rank, row,
    activation, example_id, position, token, text`` (``text`` = prompt with ``«token»``
    highlighted when a tokenizer is given and the index has a ``prompt`` column) plus
    ``extra_columns`` of the index (e.g. the label).
    """
    out = []
    for lat in latents:
        for rank in range(encoded["top_val"].shape[0]):
            val, row = float(encoded["top_val"][rank, lat]), int(encoded["top_row"][rank, lat])
            if row < 0 or not val > 0:  # also skips -inf (rows outside ``keep``)
                continue
            rec = index.iloc[row]
            text = str(rec.get("prompt", ""))
            if tokenizer is not None and "prompt" in index.columns and "position" in index.columns:
                text = highlight(tokenizer, text, int(rec["position"]), prepend_bos)
            item = {"latent": int(lat), "rank": rank, "row": row, "activation": val,
                    "example_id": rec.get("example_id"), "position": rec.get("position"),
                    "token": rec.get("token"), "text": text}
            item.update({c: rec.get(c) for c in extra_columns if c in index.columns})
            out.append(item)
    cols = ["latent", "rank", "row", "activation", "example_id", "position", "token", "text",
            *[c for c in extra_columns if c in index.columns]]
    return pd.DataFrame(out, columns=cols)


@torch.no_grad()
def logit_effects(sae, model: HookedTransformer, latents, n_tokens: int = 10) -> pd.DataFrame:
    """Direct logit effect of each latent's decoder row: ``row @ W_U``, top and bottom tokens.

    Returns one row per (latent, side, rank): ``latent, side ("top" | "bottom"), rank,
    token_id, token, effect`` (logit change per unit of latent activation).
    """

    rows = decoder_rows(sae)
    w_u = model.W_U.detach().float().cpu()
    if w_u.shape[0] != rows.shape[1]:
        raise ReplabError(f"logit effects need a residual-stream SAE: decoder width {rows.shape[1]} "
                          f"!= d_model {w_u.shape[0]}")
    tok = model.tokenizer
    out = []
    lat = torch.as_tensor(list(latents), dtype=torch.long)
    if len(lat) == 0:
        return pd.DataFrame(columns=["latent", "side", "rank", "token_id", "token", "effect"])
    eff = rows[lat] @ w_u
    n = min(n_tokens, eff.shape[1])
    for side, largest in (("top", True), ("bottom", False)):
        vals, ids = eff.topk(n, dim=1, largest=largest)
        for i, latent in enumerate(lat.tolist()):
            for r in range(n):
                tid = int(ids[i, r])
                out.append({"latent": latent, "side": side, "rank": r, "token_id": tid,
                            "token": tok.decode([tid]) if tok is not None else str(tid),
                            "effect": float(vals[i, r])})
    return pd.DataFrame(out)

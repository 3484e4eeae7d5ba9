"""Tidy lens tables: one row per (prompt, point, position).

Columns of :func:`lens_table`: ``prompt_id, lens, layer, site, depth, point, hook,
position, token, top_tokens, top_probs, top1, top1_prob, target, target_prob,
target_rank, entropy, kl_to_final`` (+ ``answer``/``template``/... when given a
prompt set). Probabilities are softmax of the lens logits; ``target_rank`` is 0 for
top-1; ``entropy`` and ``kl_to_final`` (``KL(p_final || p_lens)``) are in nats.
"""

from __future__ import annotations

import pandas as pd
import torch

from replab.errors import ReplabError
from replab.lenses.decoders import Decoder


def target_id(tokenizer, target: str | None) -> int | None:
    """First token id of ``target`` (leading space is kept, as in answers)."""
    if target is None:
        return None
    from replab.prompts import answer_ids

    return answer_ids(tokenizer, target)[0]


def _decode(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


@torch.no_grad()
def prompt_rows(decoder: Decoder, tokenizer, ids: list[int], target: int | None = None,
                k: int = 5, prompt_id: int = 0) -> list[dict]:
    """Rows for one prompt's token ids (see module docstring)."""
    if not ids:
        raise ReplabError(f"prompt {prompt_id} has no tokens")
    tokens = torch.tensor([ids])
    logits = decoder.logits(tokens)[:, 0]                   # [n_points, pos, vocab]
    logp = logits.log_softmax(-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)                           # [n_points, pos]
    final = logp[-1]
    kl = (final.exp() * (final - logp)).sum(-1)             # [n_points, pos]
    top_p, top_i = p.topk(k, dim=-1)                        # [n_points, pos, k]
    if target is not None:
        t_logit = logits[..., target]
        t_prob = p[..., target]
        t_rank = (logits > t_logit.unsqueeze(-1)).sum(-1)
    input_tokens = _decode(tokenizer, ids)
    rows = []
    for i, pt in enumerate(decoder.points):
        for pos in range(len(ids)):
            toks = _decode(tokenizer, top_i[i, pos].tolist())
            probs = [round(v, 6) for v in top_p[i, pos].tolist()]
            rows.append({
                "prompt_id": prompt_id, "lens": decoder.name, "layer": pt.layer, "site": pt.site,
                "depth": pt.depth, "point": pt.label, "hook": pt.hook, "position": pos,
                "token": input_tokens[pos], "top_tokens": toks, "top_probs": probs,
                "top1": toks[0], "top1_prob": probs[0],
                "target": None if target is None else tokenizer.decode([target]),
                "target_prob": None if target is None else float(t_prob[i, pos]),
                "target_rank": None if target is None else int(t_rank[i, pos]),
                "entropy": float(entropy[i, pos]), "kl_to_final": max(0.0, float(kl[i, pos])),
            })
    return rows


def lens_table(decoder: Decoder, tokenizer, prompts: list[str], targets: list[str | None] | None = None,
               k: int = 5, prepend_bos: bool = False, extra: pd.DataFrame | None = None,
               progress: bool = False) -> pd.DataFrame:
    """Decode every prompt at every point and position; see the module docstring.

    Args:
        targets: one target string per prompt (or None); its first token is tracked.
        extra: per-prompt columns (e.g. answer, template) joined on ``prompt_id``.
    """
    from replab._progress import progress_bar
    from replab.prompts import token_ids

    targets = targets if targets is not None else [None] * len(prompts)
    if len(targets) != len(prompts):
        raise ReplabError("need one target per prompt")
    rows = []
    with progress_bar(len(prompts), f"{decoder.name} lens", "prompt", enabled=progress) as bar:
        for j, (prompt, tgt) in enumerate(zip(prompts, targets)):
            ids = token_ids(tokenizer, prompt, prepend_bos)
            rows += prompt_rows(decoder, tokenizer, ids, target_id(tokenizer, tgt), k, j)
            bar.advance(1)
    df = pd.DataFrame(rows)
    if extra is not None:
        df = df.merge(extra.assign(prompt_id=range(len(extra))), on="prompt_id", how="left")
    return df


def first_top1(table: pd.DataFrame) -> pd.DataFrame:
    """Per prompt, at the last position: the first point where the target is top-1.

    Returns one row per prompt: ``prompt_id, target, first_top1_layer, first_top1_point,
    stable_top1_layer`` (first point from which the target stays top-1 through the
    final point), ``final_rank`` and ``final_prob``. Layers are ``depth`` values
    (``l + 0.5`` for mid points); NaN when the target is never top-1.
    """
    if table["target_rank"].isna().all():
        raise ReplabError("no target: pass --target (or use a prompt set with answers)")
    last = table[table["position"] == table.groupby("prompt_id")["position"].transform("max")]
    out = []
    for pid, g in last.sort_values("depth").groupby("prompt_id", sort=True):
        ranks = g["target_rank"].to_numpy()
        depth = g["depth"].to_numpy()
        top = ranks == 0
        first = depth[top.argmax()] if top.any() else float("nan")
        stable = float("nan")
        if top[-1]:
            j = len(top) - 1
            while j > 0 and top[j - 1]:
                j -= 1
            stable = depth[j]
        out.append({"prompt_id": pid, "target": g["target"].iloc[0],
                    "first_top1_layer": first,
                    "first_top1_point": g["point"].iloc[top.argmax()] if top.any() else None,
                    "stable_top1_layer": stable,
                    "final_rank": int(ranks[-1]), "final_prob": float(g["target_prob"].iloc[-1])})
    return pd.DataFrame(out)

"""Tidy lens tables: one row per (prompt, point, position).

Columns of :func:`lens_table`: ``prompt_id, lens, layer, site, depth, point, hook,
position, token, top_tokens, top_probs, top1, top1_prob, target, target_prob,
target_rank, entropy, kl_to_final`` (+ ``answer``/``template``/... when given a
prompt set). Probabilities are softmax of the lens logits; ``target_rank`` is 0 for
top-1 (nullable ``Int64`` when some prompt has no target); ``entropy`` and
``kl_to_final`` (``KL(p_final || p_lens)``) are in nats. Rows are ordered by prompt,
then point (depth), then position.

The numbers come from :func:`replab.lenses.cells.lens_arrays` (vectorised: shared
prefixes decoded once, batched forwards, batched decoding); this module only names
them. Token strings are decoded once per distinct id.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from replab._progress import progress_bar
from replab.errors import ReplabError
from replab.lenses.cells import MAX_ROWS, lens_arrays
from replab.lenses.decoders import Decoder
from replab.prompts import answer_ids, token_ids


def target_id(tokenizer, target: str | None) -> int | None:
    """First token id of ``target`` (leading space is kept, as in answers)."""
    if target is None:
        return None

    return answer_ids(tokenizer, target)[0]


def _decoded(tokenizer, ids: np.ndarray) -> np.ndarray:
    """Object array of token strings, one ``tokenizer.decode`` per distinct id."""
    uniq, inv = np.unique(ids, return_inverse=True)
    strings = np.array([tokenizer.decode([int(i)]) for i in uniq], dtype=object)
    return strings[inv.reshape(ids.shape)]


def table_from_arrays(arrays: dict[str, np.ndarray], decoder: Decoder, tokenizer) -> pd.DataFrame:
    """The tidy table (module docstring) from :func:`lens_arrays` output."""
    pts = decoder.points
    pi = arrays["point_index"]
    top_tokens = _decoded(tokenizer, arrays["top_i"])
    top_probs = np.round(arrays["top_p"].astype(np.float64), 6)
    has = arrays["target_id"] >= 0
    target = np.full(len(pi), None, dtype=object)
    if has.any():
        target[has] = _decoded(tokenizer, arrays["target_id"][has])
    rank = pd.array(np.where(has, arrays["target_rank"], 0), dtype="Int64")
    rank[~has] = pd.NA
    df = pd.DataFrame({
        "prompt_id": arrays["prompt_id"], "lens": decoder.name,
        "layer": np.array([p.layer for p in pts])[pi],
        "site": np.array([p.site for p in pts], dtype=object)[pi],
        "depth": np.array([p.depth for p in pts])[pi],
        "point": np.array([p.label for p in pts], dtype=object)[pi],
        "hook": np.array([p.hook for p in pts], dtype=object)[pi],
        "position": arrays["position"], "token": _decoded(tokenizer, arrays["token_id"]),
        "top_tokens": top_tokens.tolist(), "top_probs": top_probs.tolist(),
        "top1": top_tokens[:, 0], "top1_prob": top_probs[:, 0],
        "target": target,
        "target_prob": np.where(has, arrays["target_prob"].astype(np.float64), np.nan),
        "target_rank": rank if not has.all() else rank.astype("int64"),
        "entropy": arrays["entropy"].astype(np.float64),
        "kl_to_final": arrays["kl"].astype(np.float64),
    })
    return df


def lens_table(decoder: Decoder, tokenizer, prompts: list[str],
               targets: list[str | None] | None = None, k: int = 5, prepend_bos: bool = False,
               extra: pd.DataFrame | None = None,
               progress: bool = False, max_rows: int = MAX_ROWS) -> pd.DataFrame:
    """Decode every prompt at every point and position; see the module docstring.

    Args:
        targets: one target string per prompt (or None); its first token is tracked.
        extra: per-prompt columns (e.g. answer, template) joined on ``prompt_id``.
        max_rows: unique cells decoded together per point (bounds memory; see
            :mod:`replab.lenses.cells`).
    """

    targets = targets if targets is not None else [None] * len(prompts)
    if len(targets) != len(prompts):
        raise ReplabError("need one target per prompt")
    if not prompts:
        raise ReplabError("no prompts to decode")
    if k < 1:
        raise ReplabError(f"top-k must be at least 1, got {k}")
    ids = [token_ids(tokenizer, p, prepend_bos) for p in prompts]
    for j, x in enumerate(ids):
        if not x:
            raise ReplabError(f"prompt {j} has no tokens")
    tids = [target_id(tokenizer, t) for t in targets]
    with progress_bar(len(prompts), f"{decoder.name} lens", "prompt", enabled=progress) as bar:
        arrays = lens_arrays(decoder, ids, tids, k, max_rows=max_rows, bar=bar)
    df = table_from_arrays(arrays, decoder, tokenizer)
    if extra is not None:
        df = df.merge(extra.assign(prompt_id=range(len(extra))), on="prompt_id", how="left")
    return df


def first_top1(table: pd.DataFrame) -> pd.DataFrame:
    """Per prompt, at the last position: the first point where the target is top-1.

    Returns one row per prompt that has a target: ``prompt_id, target, first_top1_layer,
    first_top1_point, stable_top1_layer`` (first point from which the target stays top-1
    through the final point), ``ever_top1``, ``final_rank`` and ``final_prob``. Layers
    are ``depth`` values (``l + 0.5`` for mid points); NaN when the target is never top-1.
    """
    if table["target_rank"].isna().all():
        raise ReplabError("no target: pass --target (or use a prompt set with answers)")
    last = table[(table["position"] == table.groupby("prompt_id")["position"].transform("max"))
                 & table["target_rank"].notna()]
    ranks = last.pivot(index="prompt_id", columns="depth", values="target_rank")
    depth = ranks.columns.to_numpy(dtype=float)
    top = ranks.to_numpy(dtype=float) == 0                       # [n_prompts, n_points]
    ever = top.any(1)
    first = np.where(ever, depth[top.argmax(1)], np.nan)
    # stable: the last point is top-1 and so is every point from j on
    tail = np.flip(np.cumprod(np.flip(top, 1), 1), 1).astype(bool)  # top-1 from here to the end
    stable = np.where(tail[:, -1], depth[tail.argmax(1)], np.nan)
    labels = last.drop_duplicates("depth").set_index("depth")["point"].reindex(depth).to_numpy()
    fin = last[last["depth"] == depth[-1]].set_index("prompt_id").reindex(ranks.index)
    return pd.DataFrame({
        "prompt_id": ranks.index.to_numpy(), "target": fin["target"].to_numpy(),
        "first_top1_layer": first,
        "first_top1_point": np.where(ever, labels[top.argmax(1)], None),
        "stable_top1_layer": stable, "ever_top1": ever,
        "final_rank": fin["target_rank"].to_numpy(dtype=np.int64),
        "final_prob": fin["target_prob"].to_numpy(dtype=np.float64),
    })

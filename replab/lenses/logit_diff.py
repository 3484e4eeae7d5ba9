"""Logit-difference curves by layer (W2 step 3 of docs/workflows.md), for the logit and tuned lens.

For each prompt with an answer and a foil (``corrupt_answer``, else ``foils[0]``), at the
last position:

* :func:`logit_diff_curve` (logit lens): ``cache.accumulated_resid(incl_mid=True,
  apply_ln=True, pos_slice=-1)`` (each point normalised by the model's own final norm,
  with its own statistics) projected onto ``W_U[:, answer] - W_U[:, foil]`` (+ the bias
  difference), at every ``resid_pre`` and ``resid_mid`` point and the final point.
* :func:`decoder_logit_diff_curve` (any :class:`~replab.lenses.decoders.Decoder`; used for
  the tuned lens): ``logits_l[answer] - logits_l[foil]`` of the decoder's own logits at
  each of its points. For the tuned lens that is the translator output ``h + A_l h + b_l``
  of the residual entering block ``l`` (HF ``hidden_states[l]``), through the model's final
  norm, projected onto ``W_U[answer] - W_U[foil]`` (+ the bias difference), at the
  ``resid_pre`` points ``0..n_layers-1``; the final point is the model's own logits.

At the final point both equal the model's own logit difference. Output: tidy DataFrame
``prompt_id, which ("clean" | "corrupt"), point, depth, logit_diff``; the corrupt rows use
the corrupt prompt with the same answer/foil direction, so clean and corrupt curves end at
opposite signs when the model is right.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from replab._progress import progress_bar
from replab.errors import ReplabError
from replab.lenses.cells import length_batches
from replab.prompts import answer_ids, token_ids

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def _depth(label: str, n_layers: int) -> float:
    if label == "final_post":
        return float(n_layers)
    layer, site = label.split("_")
    return int(layer) + (0.5 if site == "mid" else 0.0)


@torch.no_grad()
def logit_diff_batch(model: HookedTransformer, tokens: torch.Tensor, answers: torch.Tensor,
                     foils: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """``tokens [batch, pos]`` (equal lengths), ``answers, foils [batch]`` ->
    ``(labels, logit_diff [n_points, batch])`` at the last position."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
    stack, labels = cache.accumulated_resid(incl_mid=True, apply_ln=True, pos_slice=-1,
                                            return_labels=True)  # [n_points, batch, d_model]
    direction = model.W_U[:, answers] - model.W_U[:, foils]      # [d_model, batch]
    bias = model.b_U[answers] - model.b_U[foils]                 # [batch]
    return labels, torch.einsum("nbd,db->nb", stack, direction) + bias


def pair_items(tokenizer, rows: pd.DataFrame, prepend_bos: bool = False) -> list[tuple]:
    """``(prompt_id, which, token ids, answer id, foil id)`` for every clean prompt with an
    answer and a foil (first tokens, different) and its corrupt partner, if any."""

    items = []
    for pid, row in enumerate(rows.itertuples(index=False)):
        foil = row.corrupt_answer if isinstance(row.corrupt_answer, str) else (
            row.foils[0] if row.foils is not None and len(row.foils) else None)
        if not isinstance(row.answer, str) or not isinstance(foil, str):
            continue
        a, f = answer_ids(tokenizer, row.answer)[0], answer_ids(tokenizer, foil)[0]
        if a == f:
            continue
        items.append((pid, "clean", token_ids(tokenizer, row.prompt, prepend_bos), a, f))
        if isinstance(row.corrupt_prompt, str):
            items.append((pid, "corrupt", token_ids(tokenizer, row.corrupt_prompt, prepend_bos), a, f))
    if not items:
        raise ReplabError("no prompt has both an answer and a foil (corrupt_answer or foils)")
    return items


def _curve(items: list[tuple], batch_fn, progress: bool, batch_size: int) -> pd.DataFrame:
    """Run ``batch_fn(tokens, answers, foils) -> (points, depths, diff [n_points, batch])``
    over ``items`` in equal-length batches; the tidy curve DataFrame."""

    diffs: list = [None] * len(items)
    with progress_bar(len(items), "logit-diff curve", "prompt", enabled=progress) as bar:
        for batch in length_batches([len(it[2]) for it in items], max_rows=None,
                                    max_batch=batch_size):
            tokens = torch.tensor([items[j][2] for j in batch])
            points, depths, diff = batch_fn(tokens, torch.tensor([items[j][3] for j in batch]),
                                            torch.tensor([items[j][4] for j in batch]))
            for col, j in enumerate(batch):
                diffs[j] = diff[:, col].tolist()
            bar.advance(len(batch))
    n = len(points)
    return pd.DataFrame({
        "prompt_id": np.repeat([it[0] for it in items], n),
        "which": np.repeat([it[1] for it in items], n),
        "point": list(points) * len(items), "depth": list(depths) * len(items),
        "logit_diff": np.concatenate(diffs),
    })


def logit_diff_curve(model: HookedTransformer, tokenizer, rows: pd.DataFrame, prepend_bos: bool = False,
                     progress: bool = False, batch_size: int = 32) -> pd.DataFrame:
    """Logit-lens curves for a prompt set's ``rows`` (needs answer + foil per row) from the
    TransformerLens accumulated residual, incl. mid-layer points. Prompts of equal token
    length run in one batched forward (no padding)."""
    def batch_fn(tokens, answers, foils):
        labels, diff = logit_diff_batch(model, tokens, answers, foils)
        return ([lab.replace("_post", "") for lab in labels],
                [_depth(lab, model.cfg.n_layers) for lab in labels], diff)

    return _curve(pair_items(tokenizer, rows, prepend_bos), batch_fn, progress, batch_size)


def decoder_logit_diff_curve(decoder, tokenizer, rows: pd.DataFrame, prepend_bos: bool = False,
                             progress: bool = False, batch_size: int = 32) -> pd.DataFrame:
    """The same curve from ``decoder``'s own logits at each of its points (the tuned lens:
    translator, final norm, unembedding; see the module docstring)."""
    @torch.no_grad()
    def batch_fn(tokens, answers, foils):
        last = decoder.residuals(tokens)[:, :, -1]                  # [n_points, batch, d]
        logits = decoder.decode_points(last, list(range(len(decoder.points)))).float()
        cols = torch.arange(len(answers))
        diff = logits[:, cols, answers] - logits[:, cols, foils]    # [n_points, batch]
        return ([p.label for p in decoder.points], [p.depth for p in decoder.points], diff)

    return _curve(pair_items(tokenizer, rows, prepend_bos), batch_fn, progress, batch_size)


def summarize_curve(curve: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation of the logit difference per (which, point)."""
    g = curve.groupby(["which", "depth", "point"], sort=True)["logit_diff"]
    return g.agg(["mean", "std", "count"]).reset_index()

"""Logit-difference curve from the accumulated residual stream (WORKFLOWS W2 step 3).

For each prompt with an answer and a foil (``corrupt_answer``, else ``foils[0]``):
``cache.accumulated_resid(incl_mid=True, apply_ln=True, pos_slice=-1)`` (each point
normalised by the model's own final norm, with its own statistics: the logit lens) is
projected onto ``W_U[:, answer] - W_U[:, foil]`` (+ the bias difference). At the final
point this equals the model's own logit difference.

Output: tidy DataFrame ``prompt_id, which ("clean" | "corrupt"), point, depth,
logit_diff``; the corrupt rows use the corrupt prompt with the same answer/foil
direction, so clean and corrupt curves end at opposite signs when the model is right.
"""

from __future__ import annotations

import pandas as pd
import torch

from replab.errors import ReplabError


def _depth(label: str, n_layers: int) -> float:
    if label == "final_post":
        return float(n_layers)
    layer, site = label.split("_")
    return int(layer) + (0.5 if site == "mid" else 0.0)


@torch.no_grad()
def logit_diff_points(model, ids: list[int], answer: int, foil: int) -> tuple[list[str], torch.Tensor]:
    """``(labels, logit_diff [n_points])`` for one prompt at its last position."""
    tokens = torch.tensor([ids])
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
    stack, labels = cache.accumulated_resid(incl_mid=True, apply_ln=True, pos_slice=-1,
                                            return_labels=True)  # [n_points, 1, d_model]
    direction = model.W_U[:, answer] - model.W_U[:, foil]
    bias = model.b_U[answer] - model.b_U[foil]
    return labels, stack[:, 0] @ direction + bias


def logit_diff_curve(model, tokenizer, rows: pd.DataFrame, prepend_bos: bool = False,
                     progress: bool = False) -> pd.DataFrame:
    """Logit-difference curves for a prompt set's ``rows`` (needs answer + foil per row)."""
    from replab._progress import progress_bar
    from replab.prompts import answer_ids, token_ids

    out = []
    usable = 0
    with progress_bar(len(rows), "logit-diff curve", "prompt", enabled=progress) as bar:
        for pid, row in enumerate(rows.itertuples(index=False)):
            bar.advance(1)
            foil = row.corrupt_answer if isinstance(row.corrupt_answer, str) else (
                row.foils[0] if row.foils is not None and len(row.foils) else None)
            if not isinstance(row.answer, str) or not isinstance(foil, str):
                continue
            a, f = answer_ids(tokenizer, row.answer)[0], answer_ids(tokenizer, foil)[0]
            if a == f:
                continue
            usable += 1
            prompts = [("clean", row.prompt)]
            if isinstance(row.corrupt_prompt, str):
                prompts.append(("corrupt", row.corrupt_prompt))
            for which, text in prompts:
                labels, diff = logit_diff_points(model, token_ids(tokenizer, text, prepend_bos), a, f)
                for label, v in zip(labels, diff.tolist()):
                    out.append({"prompt_id": pid, "which": which, "point": label.replace("_post", ""),
                                "depth": _depth(label, model.cfg.n_layers), "logit_diff": v})
    if not usable:
        raise ReplabError("no prompt has both an answer and a foil (corrupt_answer or foils)")
    return pd.DataFrame(out)


def summarize_curve(curve: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation of the logit difference per (which, point)."""
    g = curve.groupby(["which", "depth", "point"], sort=True)["logit_diff"]
    return g.agg(["mean", "std", "count"]).reset_index()

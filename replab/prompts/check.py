"""Does the model know the answers? Score a PromptSet with a TransformerLens model.

Prompts are tokenized with :func:`replab.prompts.tokens.token_ids` (``prepend_bos =
model.cfg.default_prepend_bos``), right-padded into ``[batch, max_len]`` and run in one
forward per batch; logits are read at each row's last real position (causal attention
makes right padding harmless).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from replab.errors import ReplabError
from replab.prompts.schema import PromptSet, _is_missing
from replab.prompts.tokens import answer_ids, token_ids

SCORINGS = ("first_token", "sum_logprob")
_COLUMNS = ["prompt_idx", "prompt", "answer", "n_answer_tokens", "top1", "answer_logit",
            "answer_prob", "answer_logprob", "answer_rank", "best_foil", "margin", "known"]


def _model_device(model):
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return getattr(getattr(model, "cfg", None), "device", "cpu")


def score_prompts(model, ps: PromptSet, scoring: str = "first_token", batch_size: int = 32,
                  progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """One row per prompt with the answer's logit, probability, log-prob and rank.

    Columns: prompt_idx, prompt, answer, n_answer_tokens, top1 (decoded top token),
    answer_logit, answer_prob, answer_logprob, answer_rank (0 = top-1 over the full vocab,
    first answer token), best_foil, margin (answer logit - max foil logit, NaN without foils),
    known (answer beats every foil when foils exist, else answer is top-1), then the label
    columns. ``scoring="sum_logprob"`` makes answer_logprob/answer_prob the teacher-forced
    sum over all answer tokens (logit, rank and margin stay first-token). Rows without an
    answer get NaN and known=False. ``progress(done, total)`` is called after each batch.
    """
    import torch

    if scoring not in SCORINGS:
        raise ReplabError(f"unknown scoring {scoring!r} (choose from {', '.join(SCORINGS)})")
    if batch_size < 1:
        raise ReplabError("batch_size must be >= 1")
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ReplabError("the model has no tokenizer attached")
    bos = bool(getattr(model.cfg, "default_prepend_bos", False))
    n_ctx = getattr(model.cfg, "n_ctx", None)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    rows = ps.rows
    prompts = list(rows["prompt"])
    answers = [None if _is_missing(a) else a for a in rows["answer"]]
    ans_ids: list[list[int] | None] = [None if a is None else answer_ids(tok, a) for a in answers]
    foils = [list(fs) if isinstance(fs, (list, tuple)) else [] for fs in rows["foils"]]
    foil_ids = [[answer_ids(tok, f)[0] for f in fs] for fs in foils]
    seqs, last = [], []
    for i, (p, a) in enumerate(zip(prompts, ans_ids, strict=True)):
        ids = token_ids(tok, p, bos)
        last.append(len(ids) - 1)
        if scoring == "sum_logprob" and a is not None:
            ids = ids + a[:-1]
        if n_ctx is not None and len(ids) > n_ctx:
            raise ReplabError(f"{ps.source or ps.name}: row {i + 1} has {len(ids)} tokens, more than the "
                              f"model's context of {n_ctx} (prompt {p[:40]!r}...)")
        seqs.append(ids)

    n = len(prompts)
    res = {k: [math.nan] * n for k in ("answer_logit", "answer_prob", "answer_logprob", "margin")}
    top1, rank, best_foil = [None] * n, [math.nan] * n, [None] * n
    known = [False] * n
    order = sorted(range(n), key=lambda i: len(seqs[i]))  # less padding per batch
    device = _model_device(model)
    done = 0
    with torch.inference_mode():
        for b0 in range(0, n, batch_size):
            idx = order[b0:b0 + batch_size]
            width = max(len(seqs[i]) for i in idx)
            batch = torch.full((len(idx), width), pad, dtype=torch.long)
            for r, i in enumerate(idx):
                batch[r, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
            logits = _needed_logits(model, batch.to(device), idx, last, ans_ids, scoring)
            for r, i in enumerate(idx):
                lg = logits[(r, last[i])]
                top1[i] = tok.decode([int(lg.argmax())])
                a = ans_ids[i]
                if a is None:
                    continue
                lp = torch.log_softmax(lg, -1)
                a0 = a[0]
                res["answer_logit"][i] = float(lg[a0])
                rank[i] = int((lg > lg[a0]).sum())
                logprob = float(lp[a0])
                if scoring == "sum_logprob":
                    for j in range(1, len(a)):
                        logprob += float(torch.log_softmax(logits[(r, last[i] + j)], -1)[a[j]])
                res["answer_logprob"][i] = logprob
                res["answer_prob"][i] = math.exp(logprob)
                fids = foil_ids[i]
                if fids:
                    fl = lg[fids]
                    k = int(fl.argmax())
                    best_foil[i] = foils[i][k]
                    res["margin"][i] = float(lg[a0] - fl[k])
                    known[i] = bool(res["margin"][i] > 0)
                else:
                    known[i] = rank[i] == 0
            done += len(idx)
            if progress is not None:
                progress(done, n)

    out = pd.DataFrame({
        "prompt_idx": np.arange(n),
        "prompt": prompts,
        "answer": pd.Series(answers, dtype=object),
        "n_answer_tokens": [0 if a is None else len(a) for a in ans_ids],
        "top1": top1,
        "answer_logit": res["answer_logit"],
        "answer_prob": res["answer_prob"],
        "answer_logprob": res["answer_logprob"],
        "answer_rank": pd.array([None if math.isnan(x) else int(x) for x in rank], dtype="Int64"),
        "best_foil": best_foil,
        "margin": res["margin"],
        "known": known,
    })
    for c in ps.label_columns:
        out[c] = pd.Series(list(rows[c]), dtype=object)
    return out


def _needed_logits(model, tokens, idx, last, ans_ids, scoring) -> dict:
    """Logits only at the positions scoring reads: ``{(batch_row, position): [d_vocab]}``.

    Runs the blocks (``stop_at_layer=n_layers`` skips the final norm and unembedding),
    then applies the model's own final norm and unembedding to the needed rows only.
    """
    resid = model(tokens, stop_at_layer=model.cfg.n_layers)
    keys = []
    for r, i in enumerate(idx):
        n_extra = len(ans_ids[i]) - 1 if scoring == "sum_logprob" and ans_ids[i] else 0
        keys.extend((r, last[i] + j) for j in range(n_extra + 1))
    rr = [k[0] for k in keys]
    pp = [k[1] for k in keys]
    picked = resid[rr, pp][:, None, :]
    logits = model.unembed(model.ln_final(picked))[:, 0].float().cpu()
    return dict(zip(keys, logits, strict=True))


def check_dataset(model, ps: PromptSet, scoring: str = "first_token",
                  batch_size: int = 32, progress=None) -> tuple[pd.DataFrame, dict]:
    """Score every prompt and summarise: ``(scores, summary)``.

    summary keys: name, n_prompts, n_with_answer, accuracy (top-1 over the vocab),
    candidate_accuracy (answer beats all foils, over rows with foils), known_fraction,
    median_rank, n_multi_token_answers, scoring, warnings (list of one-line strings).
    """
    scores = score_prompts(model, ps, scoring=scoring, batch_size=batch_size, progress=progress)
    has = scores["answer"].notna()
    sub = scores[has]
    with_foils = sub[sub["margin"].notna()]
    n_multi = int((sub["n_answer_tokens"] > 1).sum())

    def frac(x):
        return float(x.mean()) if len(x) else None

    warnings = []
    if n_multi:
        how = "scored by their first token" if scoring == "first_token" else \
            "log-probs summed over all tokens; rank and margin use the first token"
        warnings.append(f"{n_multi} answers are multi-token; {how}")
    if (~has).sum():
        warnings.append(f"{int((~has).sum())} prompts have no answer (controls); they count as not known")
    acc = frac(sub["answer_rank"] == 0)
    if acc is not None and acc < 0.2:
        warnings.append(f"top-1 accuracy is only {acc:.2f}; the model may not know this task")
    summary = {
        "name": ps.name,
        "n_prompts": int(len(scores)),
        "n_with_answer": int(has.sum()),
        "accuracy": acc,
        "candidate_accuracy": frac(with_foils["margin"] > 0),
        "known_fraction": frac(sub["known"].astype(bool)),
        "median_rank": float(sub["answer_rank"].astype(float).median()) if len(sub) else None,
        "n_multi_token_answers": n_multi,
        "scoring": scoring,
        "warnings": warnings,
    }
    return scores, summary


def known_only(ps: PromptSet, scores: pd.DataFrame) -> PromptSet:
    """The rows of ``ps`` whose score row has ``known=True`` (matched by ``prompt_idx``)."""
    if len(scores) != len(ps) or list(scores["prompt"]) != list(ps.rows["prompt"]):
        raise ReplabError("scores do not belong to this prompt set (different prompts)")
    mask = np.zeros(len(ps), dtype=bool)
    mask[scores.loc[scores["known"].astype(bool), "prompt_idx"].to_numpy(dtype=int)] = True
    return ps.subset(mask)

"""Head detectors: previous-token, duplicate-token, induction, beginning-of-sequence, positional, copying.

Every score is **per query head** (attention patterns and ``W_O`` are per query head; under
grouped-query attention the heads of a group share keys and values but not queries).

Inputs: by default seeded random sequences of whole-word tokens (:func:`random_texts`):
``n_seqs`` sequences of ``half`` tokens, each repeated once (so token ``i`` of the second
half recurs ``half`` positions back), plus, for the positional detector, as many fresh
sequences without repeats. With texts (``--text FILE``: one text per line), the pattern
detectors run on those texts, and scores are the mean over texts (as TransformerLens does
for a list). Texts are tokenized by ``model.to_tokens`` exactly as TransformerLens's
``detect_head`` does (a BOS only where the model prepends one; SmolLM2 does not).

Pattern scores (``A`` a head's ``[T, T]`` attention pattern on one sequence):

* ``previous``, ``duplicate``, ``induction``: TransformerLens's ``detect_head`` definition
  (``error_measure="mul"``): Σ A ⊙ P / Σ A with its detection pattern ``P`` (previous
  token; an earlier copy of the current token; the token after an earlier copy of the
  current token). Equal to ``detect_head`` within 1e-4 (tested). Rows without any target
  (the first half of a repeated sequence, for induction) count in the denominator, so a
  perfect head scores below 1: the run's summary gives ``ideal``, the score of a head that
  puts all its attention on the targets wherever there are any (about 0.5 for induction
  on sequences repeated once).
* ``bos``: mean attention to position 0 over destination positions 1…T−1 (position 0 can
  attend only to itself). SmolLM2 has no BOS token, so this is attention to the first
  token: the "attention sink".
* ``positional``: how little the pattern depends on content: 1 − the mean total-variation
  distance, over destination rows 1…T−1 and sequences, between a sequence's pattern row
  and the mean row over sequences. 1 = the same pattern whatever the tokens. Run on
  sequences without repeats (repeats would make induction look positional); with texts,
  on their first ``min length`` tokens (causal attention: a prefix's pattern depends only
  on the prefix). Previous-token and BOS heads are positional in this sense too.
* ``copying``: the OV copy score (:mod:`replab.heads.ov`) on a token set (default
  ``words``): the fraction of tokens whose own logit is the highest in the set when the
  head attends to them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from replab.errors import ReplabError
from replab.heads.ov import ov_matrices, row_scores
from replab.heads.tokensets import resolve, word_tokens

DETECTORS = ("previous", "duplicate", "induction", "bos", "positional", "copying")
PATTERN_DETECTORS = ("previous", "duplicate", "induction", "bos", "positional")
TL_NAMES = {"previous": "previous_token_head", "duplicate": "duplicate_token_head",
            "induction": "induction_head"}


def parse_detectors(spec) -> list[str]:
    """``"previous,induction"`` / ``"all"`` / a list -> detector names; ReplabError if unknown."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).replace(" ", "").split(",")
    items = [s for s in items if s]
    if items == ["all"]:
        return list(DETECTORS)
    bad = [d for d in items if d not in DETECTORS]
    if bad or not items:
        raise ReplabError(f"unknown detector {bad[0] if bad else spec!r} (known: {', '.join(DETECTORS)}, all)")
    return list(dict.fromkeys(items))


def random_texts(tokenizer, n_seqs: int = 10, half: int = 25, seed: int = 0, repeat: bool = True,
                 words: list[int] | None = None) -> list[str]:
    """``n_seqs`` texts of ``half`` random whole-word tokens (each text repeated once when
    ``repeat``; tokens distinct within a text), chosen so that each text tokenizes back to
    exactly those tokens (needed to give TransformerLens the same input as strings)."""

    if n_seqs < 1 or half < 2:
        raise ReplabError("need at least 1 sequence of at least 2 tokens")
    pool = np.asarray(words if words is not None else word_tokens(tokenizer, max(1024, 4 * half), seed=seed + 1))
    rng = np.random.default_rng(seed)
    texts = []
    while len(texts) < n_seqs:
        for _ in range(100):
            ids = [int(t) for t in rng.choice(pool, size=half, replace=False)]
            ids = ids + ids if repeat else ids
            text = tokenizer.decode(ids)
            if list(tokenizer(text, add_special_tokens=False)["input_ids"]) == ids:
                texts.append(text)
                break
        else:   # pragma: no cover - whole-word tokens always round-trip in practice
            raise ReplabError("could not draw random token sequences that round-trip through the tokenizer")
    return texts


def read_texts(path) -> list[str]:
    """Non-empty lines of a UTF-8 text file; ReplabError if there are none."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ReplabError(f"text file {str(path)!r} does not exist")
    lines = [line.rstrip("\n") for line in p.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise ReplabError(f"{path} has no non-empty lines")
    return lines


def tokenize(model, texts: list[str]) -> list[torch.Tensor]:
    """``[T]`` token ids per text, exactly as ``model.to_tokens(text)`` (TransformerLens)."""
    out = []
    for i, text in enumerate(texts):
        toks = model.to_tokens(text)[0].cpu()
        if not 1 < len(toks) < model.cfg.n_ctx:
            raise ReplabError(f"text {i + 1} has {len(toks)} tokens; detectors need 2 to "
                              f"{model.cfg.n_ctx - 1}")
        out.append(toks)
    return out


@torch.no_grad()
def attention_patterns(model, tokens: list[torch.Tensor], batch_tokens: int = 4096):
    """Yield ``(index, pattern [L, H, T, T])`` for each token sequence (equal lengths batched)."""
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)}
    by_len: dict[int, list[int]] = {}
    for i, t in enumerate(tokens):
        by_len.setdefault(len(t), []).append(i)
    for length, idx in by_len.items():
        step = max(1, batch_tokens // length)
        for s in range(0, len(idx), step):
            part = idx[s:s + step]
            batch = torch.stack([tokens[i] for i in part]).to(model.cfg.device)
            _, cache = model.run_with_cache(batch, names_filter=lambda n: n in names, return_type=None)
            pats = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)],
                               dim=1).float().cpu()                   # [B, L, H, T, T]
            for j, i in enumerate(part):
                yield i, pats[j]


def detection_pattern(tokens: torch.Tensor, detector: str) -> torch.Tensor:
    """TransformerLens's ``[T, T]`` detection pattern for ``previous`` / ``duplicate`` / ``induction``."""
    t = tokens.cpu()
    n = len(t)
    if detector == "previous":
        return torch.diag(torch.ones(n - 1), -1)
    dup = (t[:, None] == t[None, :]).float()
    dup.fill_diagonal_(0)
    dup = torch.tril(dup)
    if detector == "duplicate":
        return dup
    if detector == "induction":
        shifted = torch.zeros_like(dup)
        shifted[:, 1:] = dup[:, :-1]                                  # target: the token after a copy
        return torch.tril(shifted)
    raise ReplabError(f"{detector} has no detection pattern")


def pattern_scores(pattern: torch.Tensor, tokens: torch.Tensor, detector: str) -> torch.Tensor:
    """``[L, H]`` score of one sequence's patterns ``[L, H, T, T]`` (see the module docstring)."""
    if detector in TL_NAMES:
        det = detection_pattern(tokens, detector)
        return (pattern * det).sum((-1, -2)) / pattern.sum((-1, -2))
    if detector == "bos":
        return pattern[..., 1:, 0].mean(-1)
    raise ReplabError(f"{detector} is not a per-sequence pattern detector")


def ideal_score(tokens: torch.Tensor, detector: str) -> float:
    """The score of a head that attends only to the targets in every row that has one."""
    det = detection_pattern(tokens, detector)
    return float((det.sum(-1) > 0).float().mean())


def positional_scores(patterns: list[torch.Tensor]) -> torch.Tensor:
    """``[L, H]``: 1 − mean TV distance of each sequence's rows 1…T−1 from the mean pattern.
    ``patterns``: ``[L, H, T, T]`` per sequence, all of one length (≥ 2 sequences)."""
    if len(patterns) < 2:
        raise ReplabError("the positional detector needs at least 2 sequences (texts)")
    stack = torch.stack([p[..., 1:, :] for p in patterns])            # [S, L, H, T-1, T]
    mean = stack.mean(0, keepdim=True)
    tv = 0.5 * (stack - mean).abs().sum(-1)                           # [S, L, H, T-1]
    return 1.0 - tv.mean(dim=(0, -1))


def detect(model, detectors="all", texts: list[str] | None = None, n_seqs: int = 10, half: int = 25,
           seed: int = 0, tokens_spec: str = "words", progress=None) -> tuple[pd.DataFrame, dict]:
    """Run the detectors; return ``(table, summary)``.

    ``table``: one row per (layer, query head, detector): ``layer, head, detector, score``.
    ``summary``: inputs (texts or the random-sequence settings), ``ideal`` scores, the token
    set of the copying detector. ``progress``: optional ``advance(n)`` per sequence.
    """
    dets = parse_detectors(detectors)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    scores: dict[str, torch.Tensor] = {}
    summary: dict = {"detectors": dets, "per": "query head", "seed": seed}
    tok = model.tokenizer
    if texts is None:
        main = random_texts(tok, n_seqs, half, seed, repeat=True)
        summary["inputs"] = {"kind": "random_repeated", "n_seqs": n_seqs, "half": half, "seed": seed,
                             "texts": main}
    else:
        main = list(texts)
        summary["inputs"] = {"kind": "texts", "n_texts": len(main)}
    pat_dets = [d for d in dets if d in PATTERN_DETECTORS and d != "positional"]
    if pat_dets:
        toks = tokenize(model, main)
        acc = {d: torch.zeros(L, H) for d in pat_dets}
        ideal = {d: 0.0 for d in pat_dets if d in TL_NAMES}
        for i, pat in attention_patterns(model, toks):
            for d in pat_dets:
                acc[d] += pattern_scores(pat, toks[i], d)
            for d in ideal:
                ideal[d] += ideal_score(toks[i], d)
            if progress is not None:
                progress(1)
        scores.update({d: acc[d] / len(toks) for d in pat_dets})
        summary["ideal"] = {d: v / len(toks) for d, v in ideal.items()}
        summary["n_tokens"] = sorted({len(t) for t in toks})
    if "positional" in dets:
        if texts is None:
            pos_texts = random_texts(tok, n_seqs, 2 * half, seed + 7919, repeat=False)
            ptoks = tokenize(model, pos_texts)
        else:
            ptoks = tokenize(model, main)
            n_min = min(len(t) for t in ptoks)
            ptoks = [t[:n_min] for t in ptoks]
        pats = [p for _, p in attention_patterns(model, ptoks)]
        scores["positional"] = positional_scores(pats)
        summary["positional_inputs"] = {"n_seqs": len(ptoks), "n_tokens": len(ptoks[0]),
                                        "kind": "random_distinct" if texts is None else "text_prefixes"}
        if progress is not None:
            progress(len(ptoks))
    if "copying" in dets:

        ts = resolve(tokens_spec, tok)
        mats = ov_matrices(model, ts)
        scores["copying"] = torch.stack([torch.as_tensor(row_scores(mats[layer], ts.next_index)[0])
                                         for layer in range(L)]).float()
        summary["copying_tokens"] = {"name": ts.name, "n": len(ts), "dropped": ts.dropped}
    rows = []
    for d in dets:
        s = scores[d]
        for layer in range(L):
            for h in range(H):
                rows.append({"layer": layer, "head": h, "detector": d, "score": float(s[layer, h])})
    return pd.DataFrame(rows, columns=["layer", "head", "detector", "score"]), summary


def tl_crosscheck(model, texts: list[str], table: pd.DataFrame) -> dict:
    """Max |replab − TransformerLens ``detect_head``| per detector on the same texts.

    Runs ``transformer_lens.head_detector.detect_head(model, texts, name)`` (one forward per
    text) for previous / duplicate / induction and compares with ``table``'s scores.
    """
    from transformer_lens.head_detector import detect_head

    out = {}
    for det, name in TL_NAMES.items():
        sub = table[table["detector"] == det]
        if sub.empty:
            continue
        ref = detect_head(model, list(texts), name).float()
        mine = torch.tensor(sub.pivot(index="layer", columns="head", values="score").values).float()
        out[det] = float((ref - mine).abs().max())
    return out


def top_heads(table: pd.DataFrame, k: int = 3) -> dict[str, list[dict]]:
    """The ``k`` highest-scoring heads of each detector: ``{detector: [{head, score}]}``."""
    out = {}
    for det, sub in table.groupby("detector", sort=False):
        best = sub.sort_values("score", ascending=False).head(k)
        out[det] = [{"head": f"L{int(r.layer)}H{int(r.head)}", "score": round(float(r.score), 4)}
                    for r in best.itertuples()]
    return out

"""A small sequence-continuation task for edge-level circuits: ``sequence_edges[:TYPES]``.

"January, February, March, April," -> " May", corrupted by the same number of items started
half a cycle later ("July, August, September, October," -> " November"): answer and foil trade
places between the two runs, as in ``next_day``, so the logit difference is signed.

Rows come from the builtin ``sequence_types`` prompt set (its ``months``, ``weekdays`` and other
types, default ``months``). Each clean prompt is paired with the row half-way round the rows of
the same type and number of items (ordered by start); a pair is dropped when the corrupt answer
is one of the clean items or equals the clean answer, or when the token lengths differ, and every
pair of one task shares one token length (the most common).

This builder exists so the edge work has a sequence task of its own; the circuits issue's fuller
sequence task (``sequences``, several corruptions) supersedes it where both exist.
"""

from __future__ import annotations

from collections import Counter

import pandas as pd

from replab.errors import ReplabError
from replab.patching.task import PatchTask, task_from_rows

DEFAULT_TYPES = ("months",)


def build_sequence_edges_task(tokenizer, types=DEFAULT_TYPES, limit: int | None = None, prepend_bos: bool = False,
                              dataset: str = "sequence_types", n_items: int | None = None) -> PatchTask:
    """The task of the module docstring (``[n_pairs, T]`` clean/corrupt tokens)."""
    from replab.prompts import load_prompts, token_ids

    rows = load_prompts(dataset, tokenizer, prepend_bos=prepend_bos).rows
    known = sorted(set(rows["seq_type"].dropna()))
    bad = [t for t in types if t not in known]
    if bad:
        raise ReplabError(f"unknown sequence type {bad[0]!r} (known: {', '.join(known)})")
    pairs = []
    for seq_type in types:
        sub = rows[rows["seq_type"] == seq_type]
        for k, group in sub.groupby("n_items"):
            if n_items is not None and int(k) != int(n_items):
                continue
            group = group.reset_index(drop=True)
            starts = list(group["start"])
            for i, row in group.iterrows():
                items = [s.strip() for s in str(row.prompt).rstrip().rstrip(",").split(",")]
                j = (i + len(group) // 2) % len(group)
                cand = group.iloc[j]
                if str(cand.answer).strip() in items or cand.answer == row.answer or starts[j] == starts[i]:
                    continue
                pairs.append({"prompt": row.prompt, "answer": row.answer, "corrupt_prompt": cand.prompt,
                              "corrupt_answer": cand.answer, "foils": [cand.answer], "template": f"{seq_type}",
                              "seq_type": seq_type, "n_items": int(k)})
    if not pairs:
        raise ReplabError(f"no sequence pairs for types {', '.join(types)}")
    df = pd.DataFrame(pairs)
    df["n_tok"] = [len(token_ids(tokenizer, p, prepend_bos)) for p in df["prompt"]]
    df["n_tok_corrupt"] = [len(token_ids(tokenizer, p, prepend_bos)) for p in df["corrupt_prompt"]]
    df = df[df["n_tok"] == df["n_tok_corrupt"]]
    if df.empty:
        raise ReplabError("no sequence pair has clean and corrupt prompts of the same token length")
    length = Counter(df["n_tok"]).most_common(1)[0][0]
    df = df[df["n_tok"] == length].reset_index(drop=True)
    if limit is not None:
        df = df.head(limit)
    meta = {"dataset": dataset, "types": list(types), "n_tokens": int(length), "corruption": "shift half a cycle",
            "labels": {"seq_type": list(df["seq_type"])}}
    return task_from_rows(df, tokenizer, f"sequence_edges:{','.join(types)}", prepend_bos, meta)


def sequence_edges_builder(tokenizer, spec, template, limit, prepend_bos, classes, dataset) -> PatchTask:
    """:func:`~replab.patching.catalog.register_task` builder: ``spec`` = comma list of types;
    ``template`` = the number of items shown."""
    types = tuple(t.strip() for t in (spec or "").split(",") if t.strip()) or DEFAULT_TYPES
    n_items = None
    if template is not None:
        try:
            n_items = int(template)
        except ValueError:
            raise ReplabError(f"for sequence_edges --template is the number of items shown, not {template!r}") \
                from None
    return build_sequence_edges_task(tokenizer, types, limit, prepend_bos, dataset or "sequence_types", n_items)

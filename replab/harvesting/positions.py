"""Position rules: which token positions of each prompt a harvest stores.

Rules (one per harvest):

* ``last`` - the prompt's last token (the default);
* ``all`` - every token;
* ``0,-1`` - explicit indices (negative counts from the end);
* ``SPAN_last`` / ``SPAN_first`` / ``SPAN`` - the last, first, or every token of
  the text in column ``SPAN`` of the dataset, located in the prompt (its last
  occurrence), e.g. ``entity_last`` for the superset grid's person names.
"""

from __future__ import annotations

import re

import pandas as pd

from replab.errors import ReplabError

HELP = ("use last, all, an index list like 0,-1, or SPAN_last / SPAN_first / SPAN where SPAN "
        "is a text column of the dataset (e.g. entity_last)")


def select_positions(rule: str, rows: pd.DataFrame, lengths: list[int], tokenizer,
                     prepend_bos: bool) -> list[list[int]]:
    """For every prompt, the sorted token positions that ``rule`` selects.

    Args:
        rule: a position rule (module docstring).
        rows: the dataset's rows (a ``PromptSet.rows``).
        lengths: token length of each prompt (BOS included when prepended).
    """
    rule = (rule or "last").strip()
    if rule == "last":
        return [[n - 1] for n in lengths]
    if rule == "all":
        return [list(range(n)) for n in lengths]
    if re.fullmatch(r"-?\d+(\s*,\s*-?\d+)*", rule):
        wanted = [int(x) for x in rule.split(",")]
        out = []
        for i, n in enumerate(lengths):
            pos = sorted({p + n if p < 0 else p for p in wanted})
            if pos[0] < 0 or pos[-1] >= n:
                raise ReplabError(f"position rule {rule!r} is out of range for prompt {i} "
                                  f"({n} tokens)")
            out.append(pos)
        return out
    return _span_positions(rule, rows, tokenizer, prepend_bos)


def _span_positions(rule: str, rows: pd.DataFrame, tokenizer, prepend_bos: bool):
    from replab.prompts import span_token_positions

    column, which = rule, "all"
    for suffix in ("_last", "_first"):
        if rule.endswith(suffix):
            column, which = rule[: -len(suffix)], suffix[1:]
    if column not in rows.columns:
        raise ReplabError(f"unknown position rule {rule!r}: no column {column!r}; {HELP}")
    out = []
    for i, (prompt, span) in enumerate(zip(rows["prompt"], rows[column], strict=True)):
        if not isinstance(span, str) or not span:
            raise ReplabError(f"prompt {i} has no {column!r} text for position rule {rule!r}")
        pos = span_token_positions(tokenizer, prompt, span, prepend_bos=prepend_bos)
        out.append({"last": pos[-1:], "first": pos[:1]}.get(which, pos))
    return out

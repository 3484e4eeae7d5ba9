"""Prompt sets: builtin datasets, user files, tokenization convention and model checks.

>>> from replab.prompts import load_prompts
>>> ps = load_prompts("next_day", tokenizer)   # doctest: +SKIP
>>> ps.rows[["prompt", "answer", "corrupt_prompt"]].head()   # doctest: +SKIP
"""

from replab.prompts.check import check_dataset, known_only, score_prompts
from replab.prompts.registry import datasets_dir, list_datasets, load_prompts
from replab.prompts.schema import STANDARD_COLUMNS, PromptSet
from replab.prompts.tokens import answer_ids, check_pairs, span_token_positions, token_ids

__all__ = [
    "STANDARD_COLUMNS",
    "PromptSet",
    "answer_ids",
    "check_dataset",
    "check_pairs",
    "datasets_dir",
    "known_only",
    "list_datasets",
    "load_prompts",
    "score_prompts",
    "span_token_positions",
    "token_ids",
]

"""Builders expand a dataset spec's ``params`` into raw prompt rows.

Each builder is ``fn(params: dict, tokenizer, prepend_bos: bool) -> list[dict]`` and
is deterministic (seeded, sorted). :data:`BUILDERS` maps the spec's ``builder`` name
to ``(fn, needs_tokenizer)``; the ``rows`` builder (a sibling JSONL file) is handled
by :mod:`replab.prompts.registry`.
"""

from __future__ import annotations

from collections.abc import Callable

from replab.prompts.builders.facts import build_facts
from replab.prompts.builders.next_day import build_next_day
from replab.prompts.builders.sequences import build_sequences
from replab.prompts.builders.superset import build_superset, superset_meta

Builder = Callable[..., list]

#: builder name -> (function, needs_tokenizer)
BUILDERS: dict[str, tuple[Builder, bool]] = {
    "sequences": (build_sequences, True),
    "next_day": (build_next_day, False),
    "superset": (build_superset, True),
    "facts": (build_facts, True),
}

#: builder name -> fn(params) -> extra PromptSet.meta entries derived from the params
BUILDER_META: dict[str, Callable[[dict], dict]] = {
    "superset": superset_meta,
}

__all__ = ["BUILDERS", "BUILDER_META", "build_facts", "build_next_day", "build_sequences", "build_superset"]

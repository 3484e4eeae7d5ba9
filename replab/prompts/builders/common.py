"""Helpers shared by the builders."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from replab.errors import ReplabError
from replab.prompts.tokens import answer_ids, token_ids


def require(params: dict, key: str, builder: str) -> Any:
    """``params[key]`` or a ReplabError naming the builder and the missing key."""
    if not isinstance(params, dict) or key not in params:
        raise ReplabError(f"dataset spec for builder '{builder}' lacks params.{key}")
    return params[key]


def rng_for(seed: int, *salt: Any) -> random.Random:
    """A private, deterministic RNG (independent of PYTHONHASHSEED)."""
    return random.Random(f"{seed}|" + "|".join(map(str, salt)))


def first_id(tokenizer, text: str) -> int:
    """Id of the first token of ``text`` (answer convention, no BOS)."""
    return answer_ids(tokenizer, text)[0]


def prompt_len(tokenizer, text: str, prepend_bos: bool = False) -> int:
    """Token length of a prompt under replab's convention."""
    return len(token_ids(tokenizer, text, prepend_bos))


def distinct_foils(tokenizer, answer: str | None, foils: Sequence[str]) -> list[str]:
    """Foils in order, dropping duplicates and any whose first token equals the answer's
    (or an earlier foil's) first token, so first-token scoring can tell them apart."""
    seen: set = set()
    if answer is not None and tokenizer is not None:
        seen.add(first_id(tokenizer, answer))
    out: list[str] = []
    for f in foils:
        if f == answer or f in out:
            continue
        if tokenizer is not None:
            fid = first_id(tokenizer, f)
            if fid in seen:
                continue
            seen.add(fid)
        out.append(f)
    return out

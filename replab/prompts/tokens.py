"""replab's tokenization convention, and the clean/corrupt pair-length check.

* prompts are tokenized with ``add_special_tokens=False``; a BOS token is prepended
  only when ``prepend_bos`` is true (replab uses False for SmolLM2, whose BOS is the
  chat token ``<|im_start|>``);
* answers carry their leading space (``" Paris"``) and are tokenized on their own
  (no BOS); multi-token answers are scored by their first token unless told otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from replab.errors import ReplabError

if TYPE_CHECKING:  # pragma: no cover
    from replab.prompts.schema import PromptSet


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_ids(tokenizer, text: str, prepend_bos: bool = False) -> list[int]:
    """Token ids of a prompt: ``([bos] if prepend_bos else []) + tokenizer(text, add_special_tokens=False)``."""
    ids = _encode(tokenizer, text)
    if prepend_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ReplabError("prepend_bos=True but the tokenizer has no bos_token_id")
        ids = [int(bos)] + ids
    return ids


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of an answer string (with its leading space, no BOS); ReplabError if it has no tokens."""
    if answer is None or answer == "":
        raise ReplabError("answer is empty: it has no tokens")
    ids = _encode(tokenizer, answer)
    if not ids:
        raise ReplabError(f"answer {answer!r} tokenizes to no tokens")
    return ids


def first_token_str(tokenizer, text: str) -> str:
    """The decoded first token of ``text`` (e.g. ``" Pablo"`` for ``" Pablo Picasso"``)."""
    return tokenizer.decode(answer_ids(tokenizer, text)[:1])


def span_token_positions(tokenizer, text: str, substring: str, prepend_bos: bool = False) -> list[int]:
    """Positions (indices into ``token_ids(tokenizer, text, prepend_bos)``) of the tokens that
    overlap the LAST occurrence of ``substring`` in ``text``. ReplabError if it does not occur."""
    if not substring:
        raise ReplabError("span substring is empty")
    start = text.rfind(substring)
    if start < 0:
        raise ReplabError(f"{substring!r} does not occur in prompt {text!r}")
    end = start + len(substring)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    shift = 1 if prepend_bos else 0
    pos = [i + shift for i, (a, b) in enumerate(offsets) if a < end and b > start]
    if not pos:  # zero-width offsets (rare): fall back to the tokens that touch the span
        pos = [i + shift for i, (a, b) in enumerate(offsets) if start <= a <= end]
    if not pos:
        raise ReplabError(f"no token overlaps {substring!r} in prompt {text!r}")
    return pos


def check_pairs(ps: PromptSet, tokenizer, prepend_bos: bool = False) -> None:
    """Raise ReplabError naming the first row (1-based) whose clean and corrupt prompts differ in token length."""
    rows = ps.rows
    for i, (clean, corrupt) in enumerate(zip(rows["prompt"], rows["corrupt_prompt"], strict=True)):
        if corrupt is None or not isinstance(corrupt, str):  # None / NaN: no pair
            continue
        n_c = len(token_ids(tokenizer, clean, prepend_bos))
        n_x = len(token_ids(tokenizer, corrupt, prepend_bos))
        if n_c != n_x:
            raise ReplabError(
                f"{ps.name}: row {i + 1} clean/corrupt prompts differ in token length "
                f"({n_c} vs {n_x}): {clean!r} vs {corrupt!r}")

"""Token sets for OV / QK circuits and the copying detector: builtin sequences or a file.

Builtin sets:

* ``digits``: 0 … 9 (not cyclic: 9 has no next item);
* ``months``: January … December (cyclic: December → January);
* ``weekdays``: Monday … Sunday (cyclic);
* ``words``: a seeded sample of whole-word vocabulary tokens (a leading space and at
  least three ASCII letters; no order, so no next-item score). The copying detector uses it.

A FILE gives one item per line, in sequence order (blank lines and ``#`` comments are
skipped; not cyclic unless told).

**Tokens.** An item is one token in the circuits, so each item is resolved to a single
token id: the leading-space form first (``" Monday"``, how a word appears mid-sentence),
else the bare form (``"1"``: SmolLM2 splits digits from the space before them, so
``" 1"`` is ``" "`` + ``"1"`` and a digit's token is always the bare one). An item that is
more than one token in both forms (``"10"`` under SmolLM2: ``"1"`` + ``"0"``) is **dropped**
and listed in :attr:`TokenSet.dropped`; using its first token would credit a head with
copying or continuing a fragment (``" Sept"``), not the item. The next-item relation is
taken over the *original* order, so a dropped item also removes the two pairs it was part of.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from replab.errors import ReplabError

DIGITS = [str(i) for i in range(10)]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
BUILTIN = {"digits": (DIGITS, False), "months": (MONTHS, True), "weekdays": (WEEKDAYS, True)}
SET_NAMES = (*BUILTIN, "words")


@dataclass
class TokenSet:
    """Items resolved to single tokens.

    ``items``: the kept items (as written); ``ids``: their token ids ``[n]``; ``tokens``:
    the decoded tokens (with their leading space); ``next_index[i]``: index (into the kept
    items) of the item that follows item ``i`` in the sequence, or -1; ``dropped``: items
    that are not one token, with their tokenization.
    """

    name: str
    items: list[str]
    ids: list[int]
    tokens: list[str]
    next_index: list[int]
    cyclic: bool = False
    ordered: bool = True
    dropped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def describe(self) -> dict:
        return {"name": self.name, "n": len(self.ids), "items": self.items, "tokens": self.tokens,
                "ids": self.ids, "cyclic": self.cyclic, "ordered": self.ordered,
                "n_next_pairs": sum(j >= 0 for j in self.next_index), "dropped": self.dropped}


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def single_token(tokenizer, item: str) -> int | None:
    """The one token of ``item``: leading-space form, else the bare form; None if neither is one token."""
    text = item.strip()
    for form in (" " + text, text):
        ids = _encode(tokenizer, form)
        if len(ids) == 1:
            return int(ids[0])
    return None


_WORDS: dict[tuple, list[int]] = {}


def word_tokens(tokenizer, n: int = 512, seed: int = 0, min_letters: int = 3) -> list[int]:
    """A seeded sample of ``n`` whole-word tokens (``" abc"``: a space, then ≥ ``min_letters``
    ASCII letters) that round-trip through the tokenizer alone. Sorted by token id; cached
    per tokenizer (vocabulary size and name) and arguments."""
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), n, seed, min_letters)
    if key not in _WORDS:
        _WORDS[key] = _word_tokens(tokenizer, n, seed, min_letters)
    return list(_WORDS[key])


def _word_tokens(tokenizer, n: int, seed: int, min_letters: int) -> list[int]:
    import numpy as np

    vocab = tokenizer.get_vocab()
    pool = []
    for piece, tid in sorted(vocab.items(), key=lambda kv: kv[1]):
        if piece[:1] in ("\u0120", "\u2581"):        # byte-level BPE "Ġword", sentencepiece "▁word"
            word = piece[1:]
            if len(word) >= min_letters and word.isascii() and word.isalpha():
                pool.append(int(tid))
    rng = np.random.default_rng(seed)
    chosen = []
    for tid in rng.permutation(pool):
        text = tokenizer.decode([int(tid)])
        if text == " " + text[1:] and _encode(tokenizer, text) == [int(tid)]:
            chosen.append(int(tid))
            if len(chosen) == n:
                return sorted(chosen)
    raise ReplabError(f"the tokenizer has only {len(chosen)} whole-word tokens; asked for {n}")


def _read_items(path: Path) -> list[str]:
    if not path.is_file():
        raise ReplabError(f"token set {str(path)!r} is neither a builtin ({', '.join(SET_NAMES)}) "
                          "nor a file")
    items = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [x for x in items if x and not x.startswith("#")]


def resolve(spec: str, tokenizer, cyclic: bool | None = None, n_words: int = 512,
            seed: int = 0) -> TokenSet:
    """A :class:`TokenSet` from a builtin name (``digits``, ``months``, ``weekdays``, ``words``)
    or a file (one item per line). ``cyclic`` overrides the set's own setting (builtins:
    months and weekdays are cyclic; files are not). ReplabError if fewer than 2 items are
    single tokens, or an item repeats a token."""
    if spec == "words":
        ids = word_tokens(tokenizer, n_words, seed)
        toks = [tokenizer.decode([t]) for t in ids]
        return TokenSet("words", [t.strip() for t in toks], ids, toks, [-1] * len(ids),
                        cyclic=False, ordered=False)
    if spec in BUILTIN:
        items, default_cyclic = BUILTIN[spec]
        name = spec
    else:
        items, default_cyclic = _read_items(Path(spec)), False
        name = Path(spec).name
    cyclic = default_cyclic if cyclic is None else bool(cyclic)
    kept, ids, orig, dropped = [], [], [], []
    for i, item in enumerate(items):
        tid = single_token(tokenizer, item)
        if tid is None:
            dropped.append({"item": item, "tokens": [tokenizer.decode([t]) for t in _encode(tokenizer, " " + item)]})
            continue
        if tid in ids:
            raise ReplabError(f"token set {name}: {item!r} is the same token as {kept[ids.index(tid)]!r}")
        kept.append(item), ids.append(tid), orig.append(i)
    if len(ids) < 2:
        raise ReplabError(f"token set {name}: {len(ids)} of {len(items)} items are single tokens; "
                          "need at least 2 (multi-token items are dropped)")
    pos = {o: k for k, o in enumerate(orig)}
    nxt = []
    for o in orig:
        succ = o + 1 if o + 1 < len(items) else (0 if cyclic else None)
        nxt.append(pos.get(succ, -1) if succ is not None else -1)
    return TokenSet(name, kept, ids, [tokenizer.decode([t]) for t in ids], nxt, cyclic=cyclic,
                    dropped=dropped)

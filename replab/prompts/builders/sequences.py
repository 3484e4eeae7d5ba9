"""``sequences``: ordered-sequence continuation ("1, 2, 3," -> " 4") plus a random-word control.

Each sequence type in ``params.types`` has an ordered ``vocab``, a ``step`` (+1, +2, -1 ...)
and ``cyclic`` (months and weekdays wrap around). For every ``n_items`` in ``params.n_items``
and every start point whose shown items, answer and foils stay inside the vocabulary
(any start for cyclic types) one prompt is formed; at most ``max_per_type`` of them are
kept (seeded sample, original order). Answer = next item with a leading space; foils =
the item after next, the repeated last item and the item before the first.

Digit rule: when the tokenizer splits ``" 4"`` into a bare-space token plus ``"4"`` (SmolLM2,
Llama-3 style), the space is moved from the answer to the end of the prompt
(``"1, 2, 3, "`` -> ``"4"``), which is exactly how ``"1, 2, 3, 4"`` itself tokenizes, so the
answer's first token is the digit rather than the space.
"""

from __future__ import annotations

from replab.prompts.builders.common import distinct_foils, require, rng_for
from replab.prompts.tokens import answer_ids


def _space_is_split(tokenizer, item: str) -> bool:
    """True if ``" " + item`` tokenizes to a whitespace-only first token followed by more."""
    if tokenizer is None:
        return False
    ids = answer_ids(tokenizer, " " + item)
    return len(ids) > 1 and tokenizer.decode(ids[:1]).strip() == ""


def _sample(items: list, k: int, rng) -> list:
    if k is None or len(items) <= k:
        return items
    keep = sorted(rng.sample(range(len(items)), k))
    return [items[i] for i in keep]


def build_sequences(params: dict, tokenizer=None, prepend_bos: bool = False) -> list[dict]:
    """Rows for each sequence type and the random-word control.

    Labels: ``seq_type``, ``n_items``, ``start`` (the first shown item), ``last_item`` (the
    last shown item: ``--positions last_item_last`` harvests every type at the token of its
    last item, so digit prompts, which end in a bare space token under SmolLM2, and word
    prompts, which end in ",", are compared at the same kind of position).
    """
    types = require(params, "types", "sequences")
    n_items_list = [int(n) for n in require(params, "n_items", "sequences")]
    sep = params.get("sep", ", ")
    seed = int(params.get("seed", 0))
    max_per_type = params.get("max_per_type")
    rows: list[dict] = []
    for name in types:  # YAML order
        spec = types[name]
        vocab = [str(v) for v in spec["vocab"]]
        step = int(spec.get("step", 1))
        cyclic = bool(spec.get("cyclic", False))
        n_v = len(vocab)
        split = sep.endswith(" ") and any(_space_is_split(tokenizer, v) for v in vocab)
        cands = []
        for n in n_items_list:
            for s in range(n_v):
                idx = [s + k * step for k in range(n + 2)] + [s - step]
                if not cyclic and any(i < 0 or i >= n_v for i in idx[: n + 1]):
                    continue
                cands.append((n, s, idx))
        cands = _sample(cands, max_per_type, rng_for(seed, name))
        for n, _s, idx in cands:
            def item(i, cyclic=cyclic, vocab=vocab, n_v=n_v):
                if cyclic:
                    return vocab[i % n_v]
                return vocab[i] if 0 <= i < n_v else None
            shown = [item(i) for i in idx[:n]]
            answer_item = item(idx[n])
            foil_items = [item(idx[n + 1]), shown[-1], item(idx[n + 2])]
            prompt = sep.join(shown) + sep.rstrip()
            lead = " "
            fmt = "{items}" + sep.rstrip()
            if split:
                prompt, lead, fmt = prompt + " ", "", fmt + " "
            answer = lead + answer_item
            foils = [lead + f for f in foil_items if f is not None and f != answer_item]
            rows.append({
                "prompt": prompt,
                "answer": answer,
                "foils": distinct_foils(tokenizer, answer, foils),
                "corrupt_prompt": None,
                "corrupt_answer": None,
                "template": f"{name}:{fmt}",
                "group": "",
                "seq_type": name,
                "n_items": n,
                "start": shown[0],
                "last_item": shown[-1],
            })
    ctrl = params.get("control")
    if ctrl:
        words = [str(w) for w in ctrl["words"]]
        name = ctrl.get("name", "random_words")
        rng = rng_for(seed, name)
        for k in range(int(ctrl.get("n_prompts", 40))):
            n = n_items_list[k % len(n_items_list)]
            shown = rng.sample(words, n)
            rows.append({
                "prompt": sep.join(shown) + sep.rstrip(),
                "answer": None,
                "foils": [],
                "corrupt_prompt": None,
                "corrupt_answer": None,
                "template": f"{name}:{{items}}{sep.rstrip()}",
                "group": "",
                "seq_type": name,
                "n_items": n,
                "start": shown[0],
                "last_item": shown[-1],
            })
    return rows

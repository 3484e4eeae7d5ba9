"""The sequence-continuation task (W4): "January, February, March," -> " April".

>>> task = build_sequence_task(model.tokenizer, types=("months", "weekdays"))   # doctest: +SKIP

Clean prompts are the ``sequence_types`` prompt set's rows (or a file in its schema) of the
chosen types. Every clean prompt gets a **corrupt** partner of the same type, the same
number of items and the same token length, made by one of three corruptions:

* ``shift`` (default): another start point of the same sequence whose answer is neither
  the clean answer nor one of the clean prompt's items, and (where the vocabulary allows;
  weekdays do not always) whose items do not contain the clean answer ("May, June, July," ->
  " August"). The foil is that corrupt answer, so answer and foil trade places between the
  two runs, as in ``next_day``;
* ``repeat``: the clean prompt's last item repeated ("March, March, March,"); foil = that
  repeated item (what a copying model would say);
* ``random``: items of the same type in a seeded random order that is not a run
  ("June, February, October,"); foil = the item after the answer (the set's first foil).

``shift`` gives a signed logit difference (positive clean, negative corrupt); ``repeat``
and ``random`` are the "other corruption types" of W4's mean ablation (``--mean-over``).
Candidates: answer, foil, then the set's other foils (item after next, repeated last item,
item before the first). All pairs of one task share one layout: the (items shown, token
length) bucket with the most prompts, or ``n_items`` when given; ``limit`` keeps at most that
many pairs, taken round-robin over the types. ``meta["labels"]["seq_type"]`` gives each
prompt's type (results can be split by it).
"""

from __future__ import annotations

from collections import defaultdict

import pandas as pd

from replab.errors import ReplabError
from replab.patching.task import PatchTask, task_from_rows

CORRUPTIONS = ("shift", "repeat", "random")
DEFAULT_TYPES = ("number_words", "months", "weekdays")
CONTROL_TYPES = ("random_words",)


def parse_sequence_spec(spec: str | None) -> tuple[tuple[str, ...], str]:
    """``"months,weekdays/repeat"`` -> ``(("months", "weekdays"), "repeat")``; an empty part
    takes the default (:data:`DEFAULT_TYPES`, ``shift``)."""
    text = (spec or "").strip()
    types_part, _, corruption = text.partition("/")
    types = tuple(t.strip() for t in types_part.split(",") if t.strip()) or DEFAULT_TYPES
    corruption = corruption.strip() or "shift"
    if corruption not in CORRUPTIONS:
        raise ReplabError(f"unknown sequence corruption {corruption!r} (known: {', '.join(CORRUPTIONS)})")
    return types, corruption


def _items(prompt: str) -> tuple[list[str], str]:
    """Shown items and the tail after the last one (``","`` or ``", "``)."""
    body = prompt.rstrip()
    body = body[:-1] if body.endswith(",") else body
    items = [s.strip() for s in body.split(",")]
    return items, prompt[len(", ".join(items)):]


def _is_run(items: list[str], order: dict[str, int]) -> bool:
    idx = [order[i] for i in items]
    steps = {b - a for a, b in zip(idx, idx[1:], strict=False)}
    return len(steps) == 1


def build_sequence_task(tokenizer, types=DEFAULT_TYPES, corruption: str = "shift", n_items: int | None = None,
                        limit: int | None = None, dataset: str = "sequence_types", seed: int = 0,
                        prepend_bos: bool = False) -> PatchTask:
    """Clean/corrupt sequence pairs (see the module docstring).

    Args:
        types: sequence types of the set (``digits``, ``number_words``, ``months``, ...).
        corruption: ``shift``, ``repeat`` or ``random``.
        n_items: keep prompts showing this many items (default: the biggest bucket).
        limit: at most this many pairs (round-robin over the types).
    Returns:
        A :class:`~replab.patching.task.PatchTask` ``[n, T]`` with ``meta`` (types, corruption,
        n_items, labels).
    """
    from replab.prompts import answer_ids, load_prompts, token_ids
    from replab.prompts.builders.common import rng_for

    if corruption not in CORRUPTIONS:
        raise ReplabError(f"unknown sequence corruption {corruption!r} (known: {', '.join(CORRUPTIONS)})")
    ps = load_prompts(dataset, tokenizer, prepend_bos=prepend_bos)
    rows = ps.rows
    if "seq_type" not in rows.columns:
        raise ReplabError(f"{ps.name} is not a sequence set (no seq_type column)")
    known = [t for t in dict.fromkeys(rows["seq_type"].astype(str)) if t not in CONTROL_TYPES]
    for t in types:
        if t not in known:
            raise ReplabError(f"unknown sequence type {t!r} in {ps.name} (known: {', '.join(known)})")
    rows = rows[rows["seq_type"].isin(types) & rows["answer"].map(lambda a: isinstance(a, str) and bool(a))]
    first = lambda text: answer_ids(tokenizer, text)[0]  # noqa: E731
    length = lambda text: len(token_ids(tokenizer, text, prepend_bos))  # noqa: E731

    parsed = []
    for r in rows.itertuples(index=False):
        items, tail = _items(r.prompt)
        lead = " " if r.answer.startswith(" ") else ""
        parsed.append({"row": r, "items": items, "tail": tail, "lead": lead, "answer": r.answer.strip(),
                       "len": length(r.prompt)})
    vocab: dict[str, list[str]] = defaultdict(list)
    for p in parsed:
        for item in [*p["items"], p["answer"]]:
            if item not in vocab[p["row"].seq_type]:
                vocab[p["row"].seq_type].append(item)
    by_key = defaultdict(list)
    for p in parsed:
        by_key[(p["row"].seq_type, len(p["items"]), p["len"])].append(p)

    pairs = []
    for p in parsed:
        r, items = p["row"], p["items"]
        rng = rng_for(seed, corruption, r.prompt)
        foils = [f for f in (list(r.foils) if r.foils is not None else [])]
        if corruption == "shift":
            cands = [q for q in by_key[(r.seq_type, len(items), p["len"])]
                     if first(q["row"].answer) != first(r.answer) and q["answer"] not in items + [p["answer"]]]
            if not cands:
                continue
            # prefer partners whose items do not contain the clean answer (short cyclic
            # vocabularies such as weekdays cannot always avoid it)
            best = [q for q in cands if p["answer"] not in q["items"]] or cands
            q = rng.choice(best)
            pairs.append((p, q["row"].prompt, q["row"].answer, foils))
            continue
        if corruption == "repeat":
            new, foil = [items[-1]] * len(items), p["lead"] + items[-1]
        else:
            order = {v: i for i, v in enumerate(vocab[r.seq_type])}
            pool = [v for v in vocab[r.seq_type] if v != p["answer"]]
            new = None
            for _ in range(50):
                pick = rng.sample(pool, len(items))
                if not _is_run(pick, order) and pick != items:
                    new = pick
                    break
            if new is None:
                continue
            foil = foils[0] if foils else None
        text = ", ".join(new) + p["tail"]
        if foil is None or length(text) != p["len"] or first(foil) == first(r.answer):
            continue
        pairs.append((p, text, None, [foil] + [f for f in foils if f != foil]))
    if not pairs:
        raise ReplabError(f"no {corruption} pairs for sequence types {', '.join(types)}")
    buckets = defaultdict(list)
    for pair in pairs:
        buckets[(len(pair[0]["items"]), pair[0]["len"])].append(pair)
    if n_items is not None:
        keys = [k for k in buckets if k[0] == n_items]
        if not keys:
            have = sorted({k[0] for k in buckets})
            raise ReplabError(f"no sequence pairs with {n_items} items (available: {have})")
    else:
        keys = list(buckets)
    key = max(keys, key=lambda k: (len(buckets[k]), -k[0]))
    chosen = buckets[key]
    by_type = defaultdict(list)
    for pair in chosen:
        by_type[pair[0]["row"].seq_type].append(pair)
    ordered = []
    for j in range(max(len(v) for v in by_type.values())):
        ordered += [by_type[t][j] for t in types if j < len(by_type[t])]
    if limit is not None:
        ordered = ordered[:limit]
    df = pd.DataFrame([{"prompt": p["row"].prompt, "corrupt_prompt": text, "answer": p["row"].answer,
                        "corrupt_answer": cans, "foils": foils, "seq_type": p["row"].seq_type}
                       for p, text, cans, foils in ordered])
    meta = {"dataset": ps.name, "types": list(types), "corruption": corruption, "n_items": int(key[0]),
            "types_kept": sorted(set(df["seq_type"])), "labels": {"seq_type": df["seq_type"].tolist()},
            "content_hash": ps.content_hash()}
    name = f"sequences:{','.join(types)}/{corruption}"
    return task_from_rows(df, tokenizer, name, prepend_bos, meta)

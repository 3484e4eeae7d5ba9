"""``facts``: subject -> object fact recall with same-length corrupted subjects.

``params.relations`` maps a relation name to ``{template, facts: [[subject, object], ...]}``.
Each fact's corrupt prompt uses another subject of the same relation whose full prompt has
the same token length and whose object has a different first token (chosen with a seeded
RNG from the sorted candidates). Facts with no such partner are dropped.
"""

from __future__ import annotations

from replab.errors import ReplabError
from replab.prompts.builders.common import first_id, prompt_len, require, rng_for


def build_facts(params: dict, tokenizer=None, prepend_bos: bool = False) -> list[dict]:
    """Rows with labels ``relation``, ``subject``, ``object``; foils = [corrupt_answer]."""
    if tokenizer is None:
        raise ReplabError("the facts builder needs a tokenizer to pair subjects by token length")
    relations = require(params, "relations", "facts")
    seed = int(params.get("seed", 0))
    rows = []
    for rel in relations:
        spec = relations[rel]
        tmpl = spec["template"]
        facts = [(str(s), str(o)) for s, o in spec["facts"]]
        info = []
        for s, o in facts:
            p = tmpl.format(subject=s)
            info.append((s, o, p, prompt_len(tokenizer, p, prepend_bos), first_id(tokenizer, " " + o)))
        for i, (s, o, p, n, fid) in enumerate(info):
            cands = sorted((c for j, c in enumerate(info) if j != i and c[3] == n and c[4] != fid),
                           key=lambda c: c[0])
            if not cands:
                continue
            cs, co, cp, _, _ = rng_for(seed, rel, s).choice(cands)
            rows.append({
                "prompt": p,
                "answer": " " + o,
                "foils": [" " + co],
                "corrupt_prompt": cp,
                "corrupt_answer": " " + co,
                "template": rel,
                "group": f"{rel}/{s}",
                "relation": rel,
                "subject": s,
                "object": o,
                "corrupt_subject": cs,
            })
    return rows

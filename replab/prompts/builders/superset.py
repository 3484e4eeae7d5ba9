"""``superset``: people -> profession -> super-class (artist, athlete, scientist, ...).

Two kinds of prompt:

* one-name prompts (``params.templates``, e.g. ``"{name} is a famous"``): answer = the
  person's profession word (``" painter"``); foils = the profession words and class words
  of the *other* super-classes (first tokens distinct from the answer's). Corrupt = the same
  template with a person of a different super-class whose full prompt has the same token
  length (seeded choice among sorted candidates; None if there is none).
* odd-one-out prompts (``params.odd_one_out``): two people of one super-class and one of
  another; answer = the first token of the odd name (with its leading space), foils = the
  other two names' first tokens. Corrupt = one of the two same-class names replaced by a
  same-token-length person of the odd one's class, so the odd one changes.

Negative controls (``params.controls``: invented and ambiguous people) run through the
one-name templates with no answer. Labels: ``entity``, ``profession``, ``superclass``,
``control``, ``odd_superclass``.
"""

from __future__ import annotations

from replab.errors import ReplabError
from replab.prompts.builders.common import distinct_foils, first_id, prompt_len, require, rng_for
from replab.prompts.tokens import first_token_str


def _people(params: dict) -> tuple[list[tuple[str, str, str]], dict, dict]:
    """[(name, profession, superclass)], profession -> word, superclass -> class words."""
    people, prof_word, class_words = [], {}, {}
    seen = set()
    for sc, spec in require(params, "superclasses", "superset").items():
        class_words[sc] = list(spec.get("class_words", []))
        for prof, pspec in spec["professions"].items():
            prof_word[prof] = pspec["word"]
            for name in pspec["people"]:
                if name in seen:
                    raise ReplabError(f"superset: {name!r} is listed twice")
                seen.add(name)
                people.append((str(name), prof, sc))
    return people, prof_word, class_words


def superset_meta(params: dict) -> dict:
    """Extra PromptSet.meta entries: ``class_words`` (super-class -> words) and
    ``profession_words`` (profession -> answer word), ``superclass_of`` (profession -> class)."""
    _, prof_word, class_words = _people(params)
    sc_of = {p: sc for sc, spec in params["superclasses"].items() for p in spec["professions"]}
    return {"class_words": class_words, "profession_words": prof_word, "superclass_of": sc_of}


def _row(prompt, answer, foils, corrupt, corrupt_answer, template, group, entity, prof, sc,
         control="", odd_sc=""):
    return {"prompt": prompt, "answer": answer, "foils": foils, "corrupt_prompt": corrupt,
            "corrupt_answer": corrupt_answer, "template": template, "group": group,
            "entity": entity, "profession": prof, "superclass": sc, "control": control,
            "odd_superclass": odd_sc}


def build_superset(params: dict, tokenizer=None, prepend_bos: bool = False) -> list[dict]:
    """Expand the superset spec (see module docstring) into rows."""
    if tokenizer is None:
        raise ReplabError("the superset builder needs a tokenizer (pairs are matched by token length)")
    seed = int(params.get("seed", 0))
    people, prof_word, class_words = _people(params)
    classes = list(class_words)
    rows: list[dict] = []
    for t in require(params, "templates", "superset"):
        tid, text = t["id"], t["text"]
        lens = {name: prompt_len(tokenizer, text.format(name=name), prepend_bos) for name, _, _ in people}
        for name, prof, sc in people:
            answer = prof_word[prof]
            others = [prof_word[p] for n, p, s in people if s != sc]
            others = sorted(set(others), key=others.index)
            others += [w for c in classes if c != sc for w in class_words[c]]
            foils = distinct_foils(tokenizer, answer, others)
            cands = sorted((n, p) for n, p, s in people if s != sc and lens[n] == lens[name])
            corrupt = corrupt_answer = None
            if cands:
                cn, cp = rng_for(seed, tid, name).choice(cands)
                corrupt, corrupt_answer = text.format(name=cn), prof_word[cp]
            rows.append(_row(text.format(name=name), answer, foils, corrupt, corrupt_answer,
                             tid, name, name, prof, sc))
        controls = params.get("controls", {}) or {}
        for kind, sc in (("invented", "none"), ("ambiguous", "ambiguous")):
            for name in controls.get(kind, []) or []:
                rows.append(_row(text.format(name=name), None, [], None, None, tid, name,
                                 name, "", sc, control=kind))
    odd = params.get("odd_one_out")
    if odd:
        rows.extend(_odd_rows(odd, people, classes, tokenizer, prepend_bos, seed))
    return rows


def _odd_rows(spec, people, classes, tokenizer, prepend_bos, seed) -> list[dict]:
    tid, text, n_prompts = spec.get("id", "odd_one_out"), spec["text"], int(spec.get("n_prompts", 100))
    by_class = {c: sorted((n, p) for n, p, s in people if s == c) for c in classes}
    fid = {n: first_id(tokenizer, " " + n) for n, _, _ in people}
    ftok = {n: first_token_str(tokenizer, " " + n) for n, _, _ in people}
    pairs = [(a, b) for a in classes for b in classes if a != b]
    rows, seen = [], set()
    rng = rng_for(seed, tid)
    k = 0
    attempts = 0
    while len(rows) < n_prompts:
        attempts += 1
        if attempts > 50 * n_prompts:
            raise ReplabError(f"superset: could only form {len(rows)} odd-one-out prompts")
        maj, oddc = pairs[k % len(pairs)]
        (m1, _), (m2, _) = rng.sample(by_class[maj], 2)
        o, o_prof = rng.choice(by_class[oddc])
        names = [m1, m2]
        pos = rng.randrange(3)
        names.insert(pos, o)
        if len({fid[n] for n in names}) < 3:
            continue
        prompt = text.format(a=names[0], b=names[1], c=names[2])
        if prompt in seen:
            continue
        n_tok = prompt_len(tokenizer, prompt, prepend_bos)
        # corrupt: replace one majority name by a same-length person of the odd class
        replace = rng.choice([m1, m2])
        keep = m2 if replace == m1 else m1
        cands = []
        for cn, _ in by_class[oddc]:
            if cn == o or fid[cn] in (fid[o], fid[keep]):
                continue
            cnames = [cn if n == replace else n for n in names]
            cprompt = text.format(a=cnames[0], b=cnames[1], c=cnames[2])
            if prompt_len(tokenizer, cprompt, prepend_bos) == n_tok:
                cands.append(cprompt)
        if not cands:
            continue
        seen.add(prompt)
        k += 1
        cprompt = rng.choice(sorted(cands))
        rows.append(_row(prompt, ftok[o], [ftok[m1], ftok[m2]], cprompt, ftok[keep], tid,
                         f"odd{len(rows):03d}", o, o_prof, maj, odd_sc=oddc))
    return rows

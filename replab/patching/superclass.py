"""The super-class task (W3): clean and corrupt prompts differ only in the name.

>>> task = build_superclass_task(model.tokenizer, "artist", "scientist")   # doctest: +SKIP
>>> check_separation(model, task)                                          # doctest: +SKIP
{'clean_positive': 0.93, 'corrupt_negative': 0.87, 'gap': 3.1, ...}

Pairs come from the ``superset`` prompt set (or a file in its schema, e.g. the known-only
JSONL of ``replab datasets check superset --known-only``): the clean prompt names a person
of class A (``"Pablo Picasso is a famous"``), the corrupt prompt a person of class B with the
same template (``"Albert Einstein is a famous"``). A pair is kept only when both prompts have
the same token length, the name covers the same token positions in both, and every token
outside the name is identical. All pairs of one task share one template and one layout
(length and name span), so positions line up: ``meta["positions"]`` maps ``name_first``,
``entity_last`` (the name's last token, the probes' default position) and ``last``.

Candidates, per row: ``[answer, foil, other class-A words..., other class-B words...]``:
the answer is the first token of the clean person's profession word, the foil the corrupt
person's, so ``logit_diff`` and ``margin`` keep their meaning. Class words are the first
tokens of the set's ``class_words`` and profession words of each class, deduplicated (a
token in both classes is dropped). ``PatchTask.class_a`` marks the class-A columns, which
the ``class_mass`` metric reads: log Σ_A p(w) − log Σ_B p(w).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from replab.errors import ReplabError
from replab.patching.task import PatchTask

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

DEFAULT_CLASSES = ("artist", "scientist")


def parse_classes(spec: str | None) -> tuple[str, str]:
    """``"artist,scientist"`` -> ``("artist", "scientist")`` (None: the default pair)."""
    if spec is None or not str(spec).strip():
        return DEFAULT_CLASSES
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if len(parts) != 2 or parts[0] == parts[1]:
        raise ReplabError(f"--classes needs two different super-classes, e.g. artist,scientist; got {spec!r}")
    return parts[0], parts[1]


def _builtin_meta() -> dict:
    from replab.prompts.builders.superset import superset_meta
    from replab.prompts.io import read_yaml
    from replab.prompts.registry import datasets_dir

    return superset_meta((read_yaml(datasets_dir() / "superset.yaml") or {}).get("params") or {})


def _people(rows: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """One-name, non-control rows with a usable entity; and ``{template id: text}``."""
    need = {"entity", "superclass", "template", "prompt", "answer"}
    missing = need - set(rows.columns)
    if missing:
        raise ReplabError(f"the superclass task needs a superset-style prompt set; missing columns {sorted(missing)}")
    control = rows["control"].fillna("").astype(str) if "control" in rows else pd.Series("", index=rows.index)
    keep = ((rows["template"].astype(str) != "odd_one_out") & (control == "")
            & rows["entity"].map(lambda e: isinstance(e, str) and bool(e))
            & rows["answer"].map(lambda a: isinstance(a, str) and bool(a)))
    rows = rows[keep]
    rows = rows[[p.count(e) == 1 for p, e in zip(rows["prompt"], rows["entity"], strict=True)]]
    templates = {}
    for t, p, e in zip(rows["template"], rows["prompt"], rows["entity"], strict=True):
        templates.setdefault(str(t), p.replace(e, "{name}"))
    return rows, templates


def _class_tokens(tokenizer, words: dict[str, list[str]], a: str, b: str) -> dict[str, list[int]]:
    from replab.prompts import answer_ids

    ids = {c: list(dict.fromkeys(answer_ids(tokenizer, w)[0] for w in words[c])) for c in (a, b)}
    shared = set(ids[a]) & set(ids[b])
    return {c: [t for t in ids[c] if t not in shared] for c in (a, b)}


def build_superclass_task(tokenizer, class_a: str = "artist", class_b: str = "scientist",
                          templates: list[str] | None = None, max_pairs: int = 64,
                          partners: int = 3, n_tokens: int | None = None,
                          dataset: str = "superset", seed: int = 0,
                          prepend_bos: bool = False) -> PatchTask:
    """Clean (class A person) / corrupt (class B person) pairs; see the module docstring.

    Args:
        tokenizer: the model's tokenizer (pairs are matched by tokens).
        class_a, class_b: super-classes of the clean and the corrupt person.
        templates: template ids to draw from (default: every one-name template). All pairs
            of the task come from one (template, token layout) bucket: the one with the
            most pairs, or the one of length ``n_tokens``.
        max_pairs: at most this many pairs; partners: class-B partners per class-A person
            (seeded choice among the matching ones), taken round-robin over people.
        dataset: ``superset`` or a file in its schema (e.g. a known-only JSONL).
    Returns:
        A :class:`~replab.patching.task.PatchTask` with ``class_a`` set, ``clean``/``corrupt``
        ``[n, T]``, and ``meta`` (classes, class words, template, positions, people counts).
    """
    from replab.prompts import answer_ids, load_prompts, span_token_positions, token_ids
    from replab.prompts.builders.common import rng_for

    if max_pairs < 1 or partners < 1:
        raise ReplabError("max_pairs and partners must be at least 1")
    ps = load_prompts(dataset, tokenizer, prepend_bos=prepend_bos)
    rows, tmpl_text = _people(ps.rows)
    known = sorted(set(rows["superclass"].astype(str)))
    for c in (class_a, class_b):
        if c not in known:
            raise ReplabError(f"unknown super-class {c!r} in {ps.name} (known: {', '.join(known)})")
    if class_a == class_b:
        raise ReplabError("class A and class B must differ")
    if templates is not None:
        bad = [t for t in templates if t not in tmpl_text]
        if bad:
            raise ReplabError(f"unknown template {bad[0]!r} (one-name templates: {', '.join(tmpl_text)})")
    meta_src = ps.meta if "class_words" in ps.meta else _builtin_meta()
    words = {c: list(meta_src.get("class_words", {}).get(c, [])) for c in (class_a, class_b)}
    for c in (class_a, class_b):
        words[c] += list(dict.fromkeys(rows.loc[rows["superclass"] == c, "answer"]))
    cls_tok = _class_tokens(tokenizer, words, class_a, class_b)

    people = {c: {} for c in (class_a, class_b)}   # class -> {name: answer token}
    for r in rows[rows["superclass"].isin([class_a, class_b])].itertuples(index=False):
        t = answer_ids(tokenizer, r.answer)[0]
        if t in cls_tok[r.superclass]:
            people[r.superclass].setdefault(r.entity, t)
    buckets = defaultdict(list)   # (template, T, start, end) -> [(a, b)]
    for tid, text in tmpl_text.items():
        if templates is not None and tid not in templates:
            continue
        lay = {}
        for c in (class_a, class_b):
            for name in people[c]:
                prompt = text.format(name=name)
                ids = token_ids(tokenizer, prompt, prepend_bos)
                span = span_token_positions(tokenizer, prompt, name, prepend_bos)
                lay[name] = (len(ids), span[0], span[-1], ids)
        for a in sorted(people[class_a]):
            la = lay[a]
            cands = sorted(b for b in people[class_b] if lay[b][:3] == la[:3]
                           and la[3][:la[1]] == lay[b][3][:la[1]] and la[3][la[2] + 1:] == lay[b][3][la[2] + 1:])
            if n_tokens is not None and la[0] != n_tokens:
                continue
            if cands:
                picks = list(cands)
                rng_for(seed, tid, a).shuffle(picks)
                buckets[(tid, *la[:3])].append((a, picks[:partners]))
    if not buckets:
        where = f" of {n_tokens} tokens" if n_tokens is not None else ""
        raise ReplabError(f"no {class_a}/{class_b} prompt pairs{where} with the same template and "
                          "token layout; try other classes or templates")
    order = list(tmpl_text)
    key = max(buckets, key=lambda k: (sum(len(p) for _, p in buckets[k]), len(buckets[k]), -order.index(k[0])))
    tid, n_tok, start, end = key
    text = tmpl_text[tid]
    pairs = []
    for j in range(partners):
        pairs += [(a, ps_[j]) for a, ps_ in buckets[key] if j < len(ps_)]
    pairs = pairs[:max_pairs]

    a_cols, b_cols = cls_tok[class_a], cls_tok[class_b]
    clean, corrupt, ans, foil, cands = [], [], [], [], []
    for a, b in pairs:
        clean.append(token_ids(tokenizer, text.format(name=a), prepend_bos))
        corrupt.append(token_ids(tokenizer, text.format(name=b), prepend_bos))
        ta, tb = people[class_a][a], people[class_b][b]
        ans.append(ta), foil.append(tb)
        cands.append([ta, tb] + [t for t in a_cols if t != ta] + [t for t in b_cols if t != tb])
    mask = [True, False] + [True] * (len(a_cols) - 1) + [False] * (len(b_cols) - 1)
    dec = lambda ids: [tokenizer.decode([t]) for t in ids]  # noqa: E731
    meta = {"dataset": ps.name, "template": tid, "template_text": text, "classes": [class_a, class_b],
            "metric": "class_mass", "class_words": {class_a: dec(a_cols), class_b: dec(b_cols)},
            "positions": {"name_first": int(start), "entity_last": int(end), "last": int(n_tok - 1)},
            "n_people": {class_a: len({a for a, _ in pairs}), class_b: len({b for _, b in pairs})},
            # who each prompt names (people-level bootstrap; survives subset() and swapped())
            "person_of": {text.format(name=n): n for pair in pairs for n in pair},
            "other_layouts": len(buckets) - 1, "content_hash": ps.content_hash()}
    return PatchTask(f"superclass:{class_a},{class_b}/{tid}", torch.tensor(clean), torch.tensor(corrupt),
                     torch.tensor(ans), torch.tensor(foil), torch.tensor(cands),
                     [text.format(name=a) for a, _ in pairs], [text.format(name=b) for _, b in pairs],
                     dec(clean[0]), meta, tuple(mask))


def separation_table(model: HookedTransformer, task: PatchTask, metric: str = "class_mass") -> pd.DataFrame:
    """Per prompt pair: the metric on the clean and on the corrupt prompt (one forward each)."""
    from replab.patching.metrics import FULL_VOCAB, check_metric, metric_values, readout

    check_metric(metric)
    n_layers = model.cfg.n_layers
    out = {}
    with torch.inference_mode():
        finals = {}
        for run, tokens in (("clean", task.clean), ("corrupt", task.corrupt)):
            _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{n_layers - 1}.hook_resid_post",
                                            return_type=None)
            finals[run] = cache[f"blocks.{n_layers - 1}.hook_resid_post"][:, -1]
        rs = {k: readout(model, v, task.candidates, metric in FULL_VOCAB, metric == "kl") for k, v in finals.items()}
        for k, r in rs.items():
            out[k] = metric_values(metric, r, rs["clean"].logp, class_a=task.class_a).cpu().numpy().astype(np.float64)
    return pd.DataFrame({"pair": np.arange(task.n_prompts), "clean_prompt": task.prompts or None,
                         "corrupt_prompt": task.corrupt_prompts or None, f"clean_{metric}": out["clean"],
                         f"corrupt_{metric}": out["corrupt"], "gap": out["clean"] - out["corrupt"]})


def check_separation(model: HookedTransformer, task: PatchTask, metric: str = "class_mass") -> dict:
    """How well the model separates the classes on ``metric`` before any patching.

    Returns ``clean_positive`` (fraction of clean prompts with metric > 0),
    ``corrupt_negative`` (corrupt prompts < 0), ``pair_correct`` (pairs with clean > corrupt),
    ``clean_mean``, ``corrupt_mean``, ``gap`` (mean clean − corrupt, the denominator of every
    normalised effect) and a one-line ``text``.
    """
    t = separation_table(model, task, metric)
    c, x = t[f"clean_{metric}"].to_numpy(), t[f"corrupt_{metric}"].to_numpy()
    res = {"metric": metric, "n_pairs": int(len(t)), "clean_positive": float((c > 0).mean()),
           "corrupt_negative": float((x < 0).mean()), "pair_correct": float((c > x).mean()),
           "clean_mean": float(c.mean()), "corrupt_mean": float(x.mean()), "gap": float((c - x).mean()),
           "gap_sd": float((c - x).std(ddof=1)) if len(t) > 1 else 0.0}
    a, b = task.meta.get("classes", ["A", "B"])
    res["text"] = (f"separation on {metric} ({res['n_pairs']} pairs): {res['clean_positive']:.0%} of {a} "
                   f"prompts > 0, {res['corrupt_negative']:.0%} of {b} prompts < 0, {res['pair_correct']:.0%} "
                   f"of pairs ordered; mean {res['clean_mean']:+.2f} vs {res['corrupt_mean']:+.2f} "
                   f"(gap {res['gap']:.2f})")
    return res

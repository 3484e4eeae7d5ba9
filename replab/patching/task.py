"""Patching tasks: clean/corrupt token pairs with answer and foil tokens.

A :class:`PatchTask` is what every patching, attribution and feature experiment runs on:

* ``clean`` / ``corrupt``: token ids ``[n_prompts, n_tokens]`` (every pair has the same
  length; positions line up across prompts, so position sweeps are meaningful);
* ``answer`` / ``foil``: the first token of the clean answer and of the foil (the corrupt
  answer when the set has one, else the first listed foil), ``[n_prompts]``;
* ``candidates``: ``[n_prompts, n_candidates]`` token ids, answer first, then the foil, then
  the other listed foils. Every result row records the logit of each candidate, so that a
  swing in a foil is never mistaken for an effect on the answer.

Builtin task names select a same-length slice of a builtin prompt set (``next_day`` is the
``today_tomorrow`` template of the next_day set: "Today it is Monday so tomorrow it is"
→ " Tuesday", with the day swapped by +3 in the corrupt prompt). ``superclass`` (or
``superclass:artist,writer``) is the super-class task of
:func:`replab.features.superclass.build_superclass_task`: clean and corrupt prompts differ
only in the person's name (class A vs class B); its candidates carry a class mask
``class_a`` for the ``class_mass`` metric. Any prompt set or user
file with ``corrupt_prompt`` works too, given ``template=`` when its templates differ in
length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from replab.errors import ReplabError

#: Builtin tasks: name -> (dataset, default template or None).
TASKS: dict[str, tuple[str, str | None]] = {
    "next_day": ("next_day", "today_tomorrow"),
    "fact_recall": ("fact_recall", None),
}


@dataclass
class PatchTask:
    """Clean/corrupt token pairs plus answer/foil/candidate tokens (see module docstring)."""

    name: str
    clean: torch.Tensor            # [n, T] long
    corrupt: torch.Tensor          # [n, T] long
    answer: torch.Tensor           # [n] long
    foil: torch.Tensor             # [n] long
    candidates: torch.Tensor       # [n, C] long; column 0 = answer, column 1 = foil
    prompts: list[str] = field(default_factory=list)
    corrupt_prompts: list[str] = field(default_factory=list)
    str_tokens: list[str] = field(default_factory=list)   # tokens of the first clean prompt
    meta: dict = field(default_factory=dict)
    class_a: tuple[bool, ...] | None = None   # [C]: candidate column in class A (else B), class_mass

    def __post_init__(self) -> None:
        if self.clean.ndim != 2 or self.clean.shape != self.corrupt.shape:
            raise ReplabError(f"task {self.name}: clean {tuple(self.clean.shape)} and corrupt "
                              f"{tuple(self.corrupt.shape)} token tensors must both be [n, T]")
        if self.clean.shape[0] == 0:
            raise ReplabError(f"task {self.name}: no prompts")
        if bool((self.answer == self.foil).any()):
            i = int((self.answer == self.foil).nonzero()[0])
            raise ReplabError(f"task {self.name}: prompt {i + 1} has the same answer and foil token")
        if self.class_a is not None:
            self.class_a = tuple(bool(x) for x in self.class_a)
            if len(self.class_a) != self.candidates.shape[1] or all(self.class_a) or not any(self.class_a):
                raise ReplabError(f"task {self.name}: class_a must mark {self.candidates.shape[1]} "
                                  "candidate columns, with at least one in each class")

    @property
    def n_prompts(self) -> int:
        return int(self.clean.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.clean.shape[1])

    def subset(self, idx) -> PatchTask:
        """A task with the prompts ``idx`` (list/array of row numbers)."""
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        pick = lambda xs: [xs[int(i)] for i in idx] if xs else []  # noqa: E731
        return PatchTask(self.name, self.clean[idx], self.corrupt[idx], self.answer[idx],
                         self.foil[idx], self.candidates[idx], pick(self.prompts),
                         pick(self.corrupt_prompts), self.str_tokens, dict(self.meta), self.class_a)

    def swapped(self) -> PatchTask:
        """The same task with clean and corrupt prompts exchanged (answers stay)."""
        return PatchTask(self.name, self.corrupt, self.clean, self.answer, self.foil,
                         self.candidates, self.corrupt_prompts, self.prompts, self.str_tokens,
                         dict(self.meta), self.class_a)

    def describe(self) -> dict:
        return {"name": self.name, "n_prompts": self.n_prompts, "n_tokens": self.n_tokens,
                "n_candidates": int(self.candidates.shape[1]), **self.meta}


def _foil_of(row) -> str | None:
    if isinstance(row.corrupt_answer, str) and row.corrupt_answer:
        return row.corrupt_answer
    foils = row.foils if row.foils is not None else []
    return foils[0] if len(foils) else None


def task_from_rows(rows, tokenizer, name: str = "task", prepend_bos: bool = False,
                   meta: dict | None = None) -> PatchTask:
    """Build a :class:`PatchTask` from prompt-set rows (a DataFrame in replab's schema).

    Every row needs ``prompt``, ``corrupt_prompt``, ``answer`` and a foil (``corrupt_answer``
    or ``foils[0]``); all prompts must have the same token length. ReplabError otherwise.
    """
    from replab.prompts import answer_ids, token_ids

    if len(rows) == 0:
        raise ReplabError(f"task {name}: no prompts")
    clean, corrupt, ans, foil, cands, prompts, cprompts = [], [], [], [], [], [], []
    for i, row in enumerate(rows.itertuples(index=False)):
        where = f"task {name}: row {i + 1}"
        if not isinstance(row.corrupt_prompt, str) or not row.corrupt_prompt:
            raise ReplabError(f"{where} has no corrupt_prompt (patching needs clean/corrupt pairs)")
        f = _foil_of(row)
        if not isinstance(row.answer, str) or not f:
            raise ReplabError(f"{where} needs an answer and a foil (corrupt_answer or foils)")
        c, x = token_ids(tokenizer, row.prompt, prepend_bos), token_ids(tokenizer, row.corrupt_prompt, prepend_bos)
        if len(c) != len(x):
            raise ReplabError(f"{where}: clean and corrupt prompts differ in token length "
                              f"({len(c)} vs {len(x)}): {row.prompt!r} vs {row.corrupt_prompt!r}")
        a = answer_ids(tokenizer, row.answer)[0]
        others = [answer_ids(tokenizer, f)[0]]
        for extra in list(row.foils if row.foils is not None else []):
            others.append(answer_ids(tokenizer, extra)[0])
        others = [t for t in dict.fromkeys(others) if t != a]
        if not others:
            raise ReplabError(f"{where}: the foil has the same first token as the answer")
        clean.append(c), corrupt.append(x), ans.append(a), foil.append(others[0])
        cands.append([a] + others), prompts.append(row.prompt), cprompts.append(row.corrupt_prompt)
    lengths = sorted({len(c) for c in clean})
    if len(lengths) > 1:
        raise ReplabError(f"task {name}: prompts have different token lengths {lengths}; positions "
                          "would not line up (choose one template with --template)")
    width = max(len(c) for c in cands)
    cand = [c + [c[1]] * (width - len(c)) for c in cands]   # pad with the foil (a repeat is harmless)
    toks = [tokenizer.decode([t]) for t in clean[0]]
    return PatchTask(name, torch.tensor(clean), torch.tensor(corrupt), torch.tensor(ans),
                     torch.tensor(foil), torch.tensor(cand), prompts, cprompts, toks, meta or {})


def load_task(name_or_path: str, tokenizer, template: str | None = None, limit: int | None = None,
              prepend_bos: bool = False) -> PatchTask:
    """Load a builtin task (``next_day``, ``fact_recall``, ``superclass[:A,B]``), a builtin
    prompt set, or a user file.

    ``template`` keeps one template's rows (builtin tasks default to a same-length template);
    ``limit`` keeps the first N prompts. Rows without a clean/corrupt pair are dropped.
    """
    from replab.prompts import load_prompts

    if str(name_or_path) == "superclass" or str(name_or_path).startswith("superclass:"):
        from replab.features.superclass import build_superclass_task, parse_classes

        a, b = parse_classes(str(name_or_path).partition(":")[2] or None)
        if limit is not None and limit < 1:
            raise ReplabError("--limit must be at least 1")
        return build_superclass_task(tokenizer, a, b, templates=[template] if template else None,
                                     max_pairs=limit or 64, prepend_bos=prepend_bos)

    dataset, default_template = TASKS.get(str(name_or_path), (str(name_or_path), None))
    ps = load_prompts(dataset, tokenizer, prepend_bos=prepend_bos)
    rows = ps.rows
    rows = rows[[isinstance(c, str) and bool(c) for c in rows["corrupt_prompt"]]]
    if len(rows) == 0:
        raise ReplabError(f"{dataset}: no row has a corrupt_prompt; patching needs clean/corrupt "
                          "pairs (add a corrupt_prompt column of the same token length)")
    template = template or default_template
    if template is not None:
        known = sorted({str(t) for t in rows["template"].dropna()})
        if template not in known:
            raise ReplabError(f"unknown template {template!r} in {dataset} (known: {', '.join(known)})")
        rows = rows[rows["template"] == template]
    if limit is not None:
        if limit < 1:
            raise ReplabError("--limit must be at least 1")
        rows = rows.head(limit)
    name = str(name_or_path) if template is None else f"{ps.name}/{template}"
    meta = {"dataset": ps.name, "template": template, "content_hash": ps.content_hash()}
    return task_from_rows(rows.reset_index(drop=True), tokenizer, name, prepend_bos, meta)

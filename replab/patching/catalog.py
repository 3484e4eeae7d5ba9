"""Named tasks: a registry of task builders, and :func:`load_task`.

Builtin names:

* ``next_day``: the ``today_tomorrow`` template of the next_day set ("Today it is Monday so
  tomorrow it is" → " Tuesday", the corrupt prompt's day shifted by +3);
* ``fact_recall``: subject → object facts with same-length corrupted subjects;
* ``superclass`` / ``superclass:A,B``: people of class A vs class B in one template
  (:mod:`replab.patching.superclass`), with the ``class_mass`` metric;
* ``sequences`` / ``sequences:TYPE,TYPE/CORRUPTION``: sequence continuation (W4; types of the
  ``sequence_types`` set, corruption ``shift``, ``repeat`` or ``random``:
  :mod:`replab.patching.sequences`); ``template`` = the number of items shown.
* ``sequence_edges`` / ``sequence_edges:months,weekdays``: sequence continuation with a
  half-cycle shift corruption (:mod:`replab.patching.sequence_edges_task`).

Any other name is a builtin prompt set or a user file (JSONL/CSV/YAML) with ``corrupt_prompt``.
:func:`register_task` adds a builder under a new name.
"""

from __future__ import annotations

from collections.abc import Callable

from replab.errors import ReplabError
from replab.patching.task import PatchTask, task_from_rows

#: Prompt-set tasks: name -> (dataset, default template or None).
TASKS: dict[str, tuple[str, str | None]] = {
    "next_day": ("next_day", "today_tomorrow"),
    "fact_recall": ("fact_recall", None),
}
#: Builder tasks: name -> ``builder(tokenizer, spec, template, limit, prepend_bos, classes, dataset)``
#: where ``spec`` is the text after ``NAME:``.
BUILDERS: dict[str, Callable[..., PatchTask]] = {}


def register_task(name: str, builder: Callable[..., PatchTask]) -> None:
    """Register a task builder under ``name`` (``load_task("name[:spec]", ...)`` calls it)."""
    BUILDERS[name] = builder


def _superclass(tokenizer, spec, template, limit, prepend_bos, classes, dataset) -> PatchTask:
    from replab.patching.superclass import build_superclass_task, parse_classes

    a, b = parse_classes(classes or spec or None)
    return build_superclass_task(tokenizer, a, b, templates=[template] if template else None,
                                 max_pairs=limit or 64, dataset=dataset or "superset", prepend_bos=prepend_bos)


register_task("superclass", _superclass)


def _sequences(tokenizer, spec, template, limit, prepend_bos, classes, dataset) -> PatchTask:
    from replab.patching.sequences import build_sequence_task, parse_sequence_spec

    types, corruption = parse_sequence_spec(spec)
    n_items = None
    if template is not None:
        try:
            n_items = int(template)
        except ValueError:
            raise ReplabError(f"for the sequences task --template is the number of items shown, not {template!r}") \
                from None
    return build_sequence_task(tokenizer, types, corruption, n_items=n_items, limit=limit,
                               dataset=dataset or "sequence_types", prepend_bos=prepend_bos)


register_task("sequences", _sequences)


def _sequence_edges(tokenizer, spec, template, limit, prepend_bos, classes, dataset) -> PatchTask:
    from replab.patching.sequence_edges_task import sequence_edges_builder

    return sequence_edges_builder(tokenizer, spec, template, limit, prepend_bos, classes, dataset)


register_task("sequence_edges", _sequence_edges)   # months -> next month (replab.patching.sequence_edges_task)


def load_task(name_or_path: str, tokenizer, template: str | None = None, limit: int | None = None,
              prepend_bos: bool = False, classes: str | None = None, dataset: str | None = None) -> PatchTask:
    """Load a named task (module docstring), a builtin prompt set, or a user file.

    Args:
        template: keep one template's rows (builtin tasks default to a same-length template).
        limit: keep the first N prompts (builder tasks: at most N pairs; superclass default 64).
        classes: ``"A,B"`` for the superclass task (else the name's ``:A,B`` suffix).
        dataset: a prompt file to build from: for builder tasks their source set (e.g. a
            known-only superset JSONL), otherwise it replaces ``name_or_path``.
    Rows without a clean/corrupt pair are dropped.
    """
    from replab.prompts import load_prompts

    if limit is not None and limit < 1:
        raise ReplabError(f"the number of prompts (--limit, --pairs) must be at least 1, not {limit}")
    name, _, spec = str(name_or_path).partition(":")
    head, slash, rest = name.partition("/")
    if name not in BUILDERS and slash and head in BUILDERS and not spec:   # "sequences/repeat"
        name, spec = head, "/" + rest
    if name in BUILDERS:
        return BUILDERS[name](tokenizer, spec, template, limit, prepend_bos, classes, dataset)
    source = str(dataset or name_or_path)
    set_name, default_template = TASKS.get(source, (source, None))
    ps = load_prompts(set_name, tokenizer, prepend_bos=prepend_bos)
    rows = ps.rows
    rows = rows[[isinstance(c, str) and bool(c) for c in rows["corrupt_prompt"]]]
    if len(rows) == 0:
        raise ReplabError(f"{set_name}: no row has a corrupt_prompt; patching needs clean/corrupt "
                          "pairs (add a corrupt_prompt column of the same token length)")
    template = template or default_template
    if template is not None:
        known = sorted({str(t) for t in rows["template"].dropna()})
        if template not in known:
            raise ReplabError(f"unknown template {template!r} in {set_name} (known: {', '.join(known)})")
        rows = rows[rows["template"] == template]
    if limit is not None:
        rows = rows.head(limit)
    label = source if template is None else f"{ps.name}/{template}"
    meta = {"dataset": ps.name, "template": template, "content_hash": ps.content_hash()}
    return task_from_rows(rows.reset_index(drop=True), tokenizer, label, prepend_bos, meta)

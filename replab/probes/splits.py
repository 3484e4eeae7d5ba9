"""Rows, labels, grouped folds and control labels for a probe sweep.

* :func:`select_rows` - which index rows a probe sees (default: drop control people and
  odd-one-out rows, see ``docs/probes.md``), plus ``--where`` queries.
* :func:`grouped_folds` - fold id per row; a group (entity, template or any column)
  never straddles train and test.
* :func:`heldout_folds` - doubly held-out folds: test rows share neither template nor
  group with the training rows.
* :func:`control_labels` - Hewitt & Liang control task: each *type* gets a random label,
  drawn so the class distribution over types is unchanged, fixed per type.
* :func:`control_folds` - folds for the control task *and* the task accuracy it is
  compared with: types recur between train and test (same people, other templates), so
  a probe that memorises types can score on the control task.
* :func:`shuffled_labels` - labels permuted across rows (the shuffled-label baseline).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from replab.errors import ReplabError
from replab.store.select import where_mask

SPLIT_ALIASES = {"entity": "group", "template": "template", "token": "token_id"}


def _truthy(values: pd.Series) -> np.ndarray:
    v = values.astype("object")
    return np.array([bool(x) and str(x).lower() not in ("false", "none", "nan", "0", "")
                     for x in v], dtype=bool)


def select_rows(index: pd.DataFrame, label: str, where: str | None = None,
                default_filter: bool = True) -> tuple[np.ndarray, list[str]]:
    """Rows of ``index`` a probe for ``label`` uses, and a list of what was dropped.

    Default filter: rows with a missing label; rows whose ``control`` column is set
    (invented or ambiguous people); rows of the ``odd_one_out`` template (their label
    columns describe the pair, not the person at the position). ``where`` is a pandas
    query applied after it (e.g. ``"template != 'famous'"``).

    Returns:
        ``(rows [m] int array of index positions, notes)``.
    """
    if label not in index.columns:
        raise ReplabError(f"label column {label!r} is not in the store; "
                          f"it has: {', '.join(map(str, index.columns))}")
    keep = index[label].notna().to_numpy() & (index[label].astype(str) != "").to_numpy()
    notes = []
    if default_filter:
        if "control" in index.columns:
            ctl = _truthy(index["control"])
            if ctl.any():
                notes.append(f"dropped {int((ctl & keep).sum())} control rows (control set)")
            keep &= ~ctl
        if "template" in index.columns:
            odd = (index["template"].astype(str) == "odd_one_out").to_numpy()
            if (odd & keep).any():
                notes.append(f"dropped {int((odd & keep).sum())} odd_one_out rows")
            keep &= ~odd
    if where:
        keep &= where_mask(index, where)
        notes.append(f"where {where!r}")
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        raise ReplabError(f"no rows left to probe {label!r} after filtering")
    return rows, notes


#: index columns that are bookkeeping, never a sensible split or label column
_BOOKKEEPING = {"row", "example_id", "position", "n_tokens", "is_last", "split", "prompt", "answer"}


def entity_column(index: pd.DataFrame) -> str | None:
    """The column that names the entity (person) of each row: ``group`` when it has several
    values (the builtin superset; user files with an ``entity`` column since the prompt
    loader fills ``group`` from it), else an ``entity`` column with several values (stores
    harvested before that), else None."""
    for col in ("group", "entity"):
        if col in index.columns and index[col].astype(str).replace("", np.nan).nunique() > 1:
            return col
    return None


def split_column(index: pd.DataFrame, split_by: str) -> str:
    """Column behind ``--split-by`` (``entity`` -> :func:`entity_column`, ``token`` -> ``token_id``)."""
    if split_by == "entity":
        col = entity_column(index) or "group"
    else:
        col = SPLIT_ALIASES.get(split_by, split_by)
    if col not in index.columns:
        raise ReplabError(f"--split-by {split_by!r}: no column {col!r} in the store index; "
                          f"{split_hint(index)}")
    return col


def split_hint(index: pd.DataFrame, exclude=()) -> str:
    """``"choose another with --split-by COLUMN: template, entity, ..."``: the index columns
    (bookkeeping columns aside) with at least 2 distinct values."""
    cands = []
    for col in index.columns:
        if col in _BOOKKEEPING or col in exclude:
            continue
        try:
            n = index[col].astype(str).nunique()
        except TypeError:
            continue
        if n >= 2:
            cands.append(col)
    named = {"group": "entity", "token_id": "token"}
    cands = [named.get(c, c) for c in cands]
    return ("choose another with --split-by COLUMN: " + ", ".join(dict.fromkeys(cands))
            if cands else "no column of this store has at least 2 groups")


def grouped_folds(groups, codes, folds: int, seed: int = 0, column: str = "split",
                  hint: str = "", class_names=None, split_by: str | None = None) -> np.ndarray:
    """Fold id ``[n]`` per row: stratified by class where possible, groups never split.

    Raises ReplabError (naming ``column`` and ending with ``hint``) when there are fewer
    than 2 groups, or when some class can never be tested by a probe that saw it in
    training (all its rows in one fold: a single group, e.g. one row per class under
    ``--split-by row``), which would score that class 0 by construction.
    """
    groups = np.asarray(groups).astype(str)
    codes = np.asarray(codes)
    n_groups = len(np.unique(groups))
    k = min(folds, n_groups)
    tail = f"; {hint}" if hint else ""
    column = repr(column) + (f" (--split-by {split_by})" if split_by and split_by != column else "")
    if k < 2:
        raise ReplabError(f"cross-validation needs at least 2 groups; the split column {column} "
                          f"has {n_groups}{tail}")
    fold = np.full(len(groups), -1)
    try:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = list(splitter.split(np.zeros(len(groups)), codes, groups))
    except ValueError:
        splits = list(GroupKFold(n_splits=k).split(np.zeros(len(groups)), codes, groups))
    for f, (_, test) in enumerate(splits):
        fold[test] = f
    if (np.bincount(fold, minlength=k) == 0).any():
        splits = list(GroupKFold(n_splits=k).split(np.zeros(len(groups)), codes, groups))
        for f, (_, test) in enumerate(splits):
            fold[test] = f
    for c in np.unique(codes):
        if len(np.unique(fold[codes == c])) < 2:
            name = class_names[c] if class_names is not None else c
            n_c = int((codes == c).sum())
            n_g = len(np.unique(groups[codes == c]))
            raise ReplabError(
                f"class {str(name)!r} cannot be scored: its {n_c} row(s) lie in {n_g} group(s) of the "
                f"split column {column}, so a probe tested on them never saw the class in training "
                f"(accuracy 0 by construction); give every class rows in at least 2 groups{tail}")
    return fold


def heldout_folds(fold: np.ndarray, templates) -> tuple[np.ndarray, np.ndarray] | None:
    """Doubly held-out evaluation: template *and* group unseen in training.

    Outer fold ``k`` is paired with template ``t_k`` (cycling through the templates).
    Its test rows are ``fold == k & template == t_k``; its training rows are
    ``fold != k & template != t_k``.

    Returns:
        ``(train [F, n] bool, test [F, n] bool)``, or ``None`` with fewer than 2 templates.
    """
    templates = np.asarray(templates).astype(str)
    names = sorted(np.unique(templates))
    if len(names) < 2:
        return None
    F = int(fold.max()) + 1
    train = np.zeros((F, len(fold)), dtype=bool)
    test = np.zeros((F, len(fold)), dtype=bool)
    for k in range(F):
        t = names[k % len(names)]
        test[k] = (fold == k) & (templates == t)
        train[k] = (fold != k) & (templates != t)
    return train, test


def type_column(index: pd.DataFrame, min_types: int = 20, column: str | None = None) -> str | None:
    """The column that defines a control-task *type*.

    ``column`` when given; else the entity (:func:`entity_column`: ``group``, or ``entity``)
    when it has several values, else the token (``token_id``) when it has at least
    ``min_types`` values; else ``None`` (no sensible type: the control task is skipped and
    the summary says why).
    """
    if column:
        col = (entity_column(index) or "group") if column == "entity" else SPLIT_ALIASES.get(column, column)
        if col not in index.columns:
            raise ReplabError(f"--control-type {column!r}: no column {col!r} in the store index")
        return col
    ent = entity_column(index)
    if ent is not None:
        return ent
    if "token_id" in index.columns and index["token_id"].nunique() >= min_types:
        return "token_id"
    return None


def type_coverage(types, fold: np.ndarray) -> float:
    """Share of rows whose type also occurs in the training part of their fold."""
    types = np.asarray(types).astype(str)
    seen = np.zeros(len(types), dtype=bool)
    for k in np.unique(fold):
        train_types = set(types[fold != k])
        te = np.flatnonzero(fold == k)
        seen[te] = [t in train_types for t in types[te]]
    return float(seen.mean()) if len(types) else 0.0


def control_folds(types, templates, codes, folds: int, seed: int = 0,
                  min_coverage: float = 0.5) -> tuple[np.ndarray, str, float] | None:
    """Folds ``[n]`` on which the control task is learnable: types recur between train and test.

    Hewitt & Liang's control task gives each *type* a random label; a probe can only score
    on it by memorising types, which needs the test types to occur in training. With
    entity-grouped folds no test entity is ever seen, so control accuracy is chance by
    construction. These folds are used for the control task **and** for the task accuracy
    it is compared with (``matched_accuracy``), so selectivity compares like with like.

    * ``template``: folds grouped by template (the same people, other templates), when
      there are >= 2 templates, every class of each test fold also occurs in its training
      folds, and at least ``min_coverage`` of the rows' types recur;
    * ``type-stratified``: otherwise the rows of each type are dealt round-robin over the
      folds (random start, fixed seed), so every type with >= 2 rows is on both sides.

    Returns:
        ``(fold [n], scheme, coverage)`` (coverage: share of rows whose type is seen in
        training, :func:`type_coverage`), or ``None`` when no type recurs at all.
    """
    types = np.asarray(types).astype(str)
    n = len(types)
    if templates is not None:
        templates = np.asarray(templates).astype(str)
        n_t = len(np.unique(templates))
        if n_t >= 2:
            k = min(folds, n_t)
            fold = np.full(n, -1)
            for f, (_, test) in enumerate(GroupKFold(n_splits=k).split(np.zeros(n), codes,
                                                                      templates)):
                fold[test] = f
            cov = type_coverage(types, fold)
            codes = np.asarray(codes)
            classes_ok = all(set(codes[fold == f]) <= set(codes[fold != f]) for f in range(k))
            if cov >= min_coverage and classes_ok:
                return fold, "template", cov
    rng = np.random.default_rng(seed + 2)
    uniq, inv = np.unique(types, return_inverse=True)
    if np.bincount(inv).max() < 2:
        return None
    k = max(2, min(folds, n))
    fold = np.full(n, -1)
    start = rng.integers(0, k, len(uniq))
    for t in range(len(uniq)):
        rows = rng.permutation(np.flatnonzero(inv == t))
        fold[rows] = (start[t] + np.arange(len(rows))) % k
    used = np.unique(fold)
    fold = np.searchsorted(used, fold)             # drop empty folds (tiny inputs)
    if len(used) < 2:
        return None
    return fold, "type-stratified", type_coverage(types, fold)


def control_labels(types, codes, seed: int = 0) -> np.ndarray:
    """Control-task labels ``[n]``: one random label per type, same class distribution.

    Each type (entity, token, ...) takes the majority true label of its rows; those
    per-type labels are permuted across types, so the class distribution over types is
    exactly preserved, and every row of a type gets its type's control label.
    """
    types = np.asarray(types).astype(str)
    uniq, inv = np.unique(types, return_inverse=True)
    per_type = np.array([np.bincount(codes[inv == i]).argmax() for i in range(len(uniq))])
    rng = np.random.default_rng(seed)
    return rng.permutation(per_type)[inv]


def shuffled_labels(codes, seed: int = 0) -> np.ndarray:
    """Labels permuted across rows (breaks every link between activation and label)."""
    return np.random.default_rng(seed + 1).permutation(codes)

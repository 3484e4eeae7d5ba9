"""The :class:`PromptSet` container and the canonical row schema.

A prompt set is one pandas DataFrame with a fixed set of *standard* columns
(:data:`STANDARD_COLUMNS`, always present, always in that order) followed by
any number of *label* columns (``superclass``, ``seq_type``, ``entity`` ...).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from replab.errors import ReplabError
from replab.io import writable_dir, write_text_atomic

#: Standard columns of ``PromptSet.rows``, in order.
STANDARD_COLUMNS: tuple[str, ...] = (
    "prompt",
    "answer",
    "foils",
    "corrupt_prompt",
    "corrupt_answer",
    "template",
    "group",
)
_OPTIONAL_STR = ("answer", "corrupt_prompt", "corrupt_answer")


def _is_missing(value: Any) -> bool:
    """True for None / NaN / pandas NA (but not for lists or empty strings)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        return value is pd.NA or bool(pd.isna(value)) if np.ndim(value) == 0 else False
    except (TypeError, ValueError):
        return False


def _clean_label(value: Any) -> Any:
    """Labels are kept as given; numpy scalars become Python scalars, NaN -> None."""
    if _is_missing(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def normalize_rows(records: Iterable[Mapping[str, Any]], where: str = "dataset") -> pd.DataFrame:
    """Validate raw row dicts and return a DataFrame in the canonical schema.

    Every key that is not a standard column becomes a label column (kept in
    first-seen order). Raises :class:`ReplabError` naming the 1-based row number
    for a missing or empty ``prompt`` or a malformed ``foils`` value.
    """
    out: list[dict[str, Any]] = []
    labels: list[str] = []
    for i, rec in enumerate(records, start=1):
        if not isinstance(rec, Mapping):
            raise ReplabError(f"{where}: row {i} is not an object/mapping")
        prompt = rec.get("prompt")
        if _is_missing(prompt) or not isinstance(prompt, str) or prompt == "":
            raise ReplabError(f"{where}: row {i} has no 'prompt' (every row needs a non-empty prompt)")
        row: dict[str, Any] = {"prompt": prompt}
        for col in _OPTIONAL_STR:
            v = rec.get(col)
            row[col] = None if _is_missing(v) or v == "" else str(v)
        row["foils"] = _parse_foils(rec.get("foils"), i, where)
        for col in ("template", "group"):
            v = rec.get(col)
            row[col] = "" if _is_missing(v) else str(v)
        for k, v in rec.items():
            if k in STANDARD_COLUMNS:
                continue
            if k not in labels:
                labels.append(str(k))
            row[str(k)] = _clean_label(v)
        out.append(row)
    cols = list(STANDARD_COLUMNS) + labels
    data = {}
    for col in cols:  # object columns: None stays None (pandas 3 would make str columns with NaN)
        vals = [r.get(col) for r in out]
        if col not in ("prompt", "foils"):
            vals = [None if _is_missing(v) else v for v in vals]
        data[col] = pd.Series(vals, dtype=object)
    df = pd.DataFrame(data, columns=cols)
    return df.reset_index(drop=True)


def default_groups(rows: pd.DataFrame, column: str = "entity") -> bool:
    """Fill an all-empty ``group`` column from ``entity`` (in place); True when it did.

    ``group`` is the unit a probe generalises over (folds, the control task, bootstrap
    CIs). The builtin superset sets it to the person; a user file that names its people in
    an ``entity`` column and gives no ``group`` gets the same grouping by default. Rows with
    no entity keep an empty group. A file with any ``group`` value is left as it is.
    """
    if column not in rows.columns or (rows["group"].astype(str) != "").any():
        return False
    ent = rows[column]
    has = np.array([not _is_missing(v) and str(v) != "" for v in ent], dtype=bool)
    if not has.any():
        return False
    rows["group"] = [str(v) if h else "" for v, h in zip(ent, has, strict=True)]
    return True


def _parse_foils(value: Any, row: int, where: str) -> list[str]:
    """Foils as a list of strings: accepts a list, a JSON list string or a ``|``-separated string."""
    if value is None or (not isinstance(value, (list, tuple, np.ndarray)) and _is_missing(value)):
        return []
    if isinstance(value, str):
        s = value.strip()
        if s == "":
            return []
        if s.startswith("["):
            try:
                value = json.loads(s)
            except json.JSONDecodeError as e:
                raise ReplabError(f"{where}: row {row} has a malformed foils JSON list ({e.msg})") from None
        else:
            return [f for f in value.split("|") if f != ""]
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise ReplabError(f"{where}: row {row} 'foils' must be a list of strings")
    foils = [str(f) for f in value if not _is_missing(f)]
    return [f for f in foils if f != ""]


@dataclass
class PromptSet:
    """A named set of prompts: a thin wrapper around a DataFrame ``rows``.

    ``rows`` has one row per prompt (RangeIndex) with the standard columns
    ``prompt, answer, foils, corrupt_prompt, corrupt_answer, template, group``
    followed by ``label_columns``. ``meta`` carries the YAML card (description,
    scoring, default ``positions`` rule, class words, ...).
    """

    name: str
    rows: pd.DataFrame
    label_columns: list[str] = field(default_factory=list)
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [c for c in STANDARD_COLUMNS if c not in self.rows.columns]
        if missing:
            raise ReplabError(f"prompt set {self.name}: missing standard columns {missing}")
        if not self.label_columns:
            self.label_columns = [c for c in self.rows.columns if c not in STANDARD_COLUMNS]
        self.rows = self.rows[list(STANDARD_COLUMNS) + list(self.label_columns)].reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"PromptSet(name={self.name!r}, n={len(self)}, labels={self.label_columns}, "
                f"pairs={self.has_pairs})")

    @property
    def has_pairs(self) -> bool:
        """True when at least one row has a ``corrupt_prompt``."""
        return bool(self.rows["corrupt_prompt"].notna().any()) if len(self.rows) else False

    def subset(self, mask_or_indices) -> PromptSet:
        """A new PromptSet with the selected rows (boolean mask or positional indices).

        ``meta``, ``name``, ``source`` and ``label_columns`` are kept; the index is reset.
        """
        sel = mask_or_indices
        if isinstance(sel, pd.Series):
            sel = sel.to_numpy()
        sel = np.asarray(sel)
        if sel.dtype == bool:
            if len(sel) != len(self.rows):
                raise ReplabError(f"subset mask has length {len(sel)}, prompt set has {len(self.rows)} rows")
            rows = self.rows[sel]
        else:
            sel = sel.astype(int) if sel.size else np.zeros(0, dtype=int)
            if sel.size and (sel.max() >= len(self.rows) or sel.min() < -len(self.rows)):
                raise ReplabError(f"subset index out of range for prompt set of {len(self.rows)} rows")
            rows = self.rows.iloc[sel]
        return PromptSet(self.name, rows.reset_index(drop=True).copy(), list(self.label_columns),
                         self.source, dict(self.meta))

    def records(self) -> list[dict[str, Any]]:
        """Rows as plain dicts (JSON-able Python values)."""
        recs = []
        for rec in self.rows.to_dict(orient="records"):
            recs.append({k: _to_jsonable(v) for k, v in rec.items()})
        return recs

    def content_hash(self) -> str:
        """sha256 hex digest of a canonical JSON of the rows (stable across processes)."""
        payload = {"columns": list(self.rows.columns), "rows": self.records()}
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def to_jsonl(self, path) -> None:
        """Write the rows in the user-file JSONL schema (round-trips through ``load_prompts``)."""

        p = Path(path)
        if p.is_dir():
            raise ReplabError(f"{p}: is a directory; --out must be a .jsonl file path")
        writable_dir(p.parent, "output directory")
        write_text_atomic(p, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in self.records()))


def _to_jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [_to_jsonable(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_to_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    if v is pd.NA:
        return None
    return v

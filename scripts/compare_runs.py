"""Compare every Parquet table and summary.json value under two run trees (before/after).

    python scripts/compare_runs.py BEFORE_DIR AFTER_DIR

Per table: the largest absolute difference over every shared column (numeric columns and
object columns of numbers; any other column must be equal as text), a differing NaN pattern,
a differing row count or columns on one side only. Per summary.json: every value that differs
(numbers by more than 1e-6; a number that became text or null counts), keys gone and keys new.
Files on one side only are listed. Timing, paths and version keys (SKIP_KEYS) are not compared.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

SKIP_KEYS = {"seconds", "out", "files", "replab_version", "created", "time", "cached", "cpu_seconds"}


def cmp_df(pa, pb):
    x, y = pd.read_parquet(pa), pd.read_parquet(pb)
    if len(x) != len(y):
        return f"rows {len(x)} vs {len(y)}"
    m = 0.0
    for c in (c for c in x.columns if c in y.columns):
        if (x[c].isna().to_numpy() != y[c].isna().to_numpy()).any():
            return f"NaN pattern differs in {c}"
        if pd.api.types.is_numeric_dtype(x[c]) and pd.api.types.is_numeric_dtype(y[c]):
            d = np.abs(x[c].to_numpy(float) - y[c].to_numpy(float))
            d = d[np.isfinite(d)]                 # NaN in both (the pattern is checked above), ±inf
            m = max(m, float(d.max())) if len(d) else m
        elif x[c].map(repr).tolist() != y[c].map(repr).tolist():
            try:
                d = np.nanmax(np.abs(np.array(x[c].tolist(), dtype=float) - np.array(y[c].tolist(), dtype=float)))
            except (TypeError, ValueError):
                return f"column {c} differs"
            m = max(m, float(d))
    only = sorted(set(x.columns) ^ set(y.columns))
    return m if not only else (m, f"columns only on one side: {only}")


def flat(d, p=""):
    if isinstance(d, dict):
        for k, v in d.items():
            if k not in SKIP_KEYS:
                yield from flat(v, f"{p}.{k}")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from flat(v, f"{p}[{i}]")
    else:
        yield p, d


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def cmp_summary(pa, pb) -> str:
    x, y = dict(flat(json.loads(pa.read_text()))), dict(flat(json.loads(pb.read_text())))
    diffs = []
    for k in (k for k in x if k in y):
        v, w = x[k], y[k]
        same = (abs(v - w) <= 1e-6 or (v != v and w != w)) if _number(v) and _number(w) else v == w
        if not same:
            diffs.append(f"{k}: {str(v)[:60]!r} -> {str(w)[:60]!r}")
    gone, new = [k for k in x if k not in y], [k for k in y if k not in x]
    return (f"{len(diffs)} diffs; {len(gone)} keys gone; {len(new)} keys new"
            + "".join("\n    " + d for d in diffs[:12])
            + "".join(f"\n    gone: {k}" for k in gone[:5]) + "".join(f"\n    new: {k}" for k in new[:5]))


def main(a: Path, b: Path) -> None:
    for pattern, compare in (("*.parquet", cmp_df), ("summary.json", cmp_summary)):
        before = {p.relative_to(a) for p in a.rglob(pattern)}
        after = {p.relative_to(b) for p in b.rglob(pattern)}
        for rel in sorted(before | after):
            if rel not in after or rel not in before:
                print(f"{str(rel):70s} only {'before' if rel in before else 'after'}")
                continue
            print(f"{str(rel):70s} {compare(a / rel, b / rel)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

"""Compare every Parquet table and summary.json number under two run trees (before/after)."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

a, b = Path(sys.argv[1]), Path(sys.argv[2])
SKIP_KEYS = {"seconds", "out", "files", "replab_version", "model", "created", "time", "cached", "cpu_seconds"}
worst = []


def cmp_df(pa, pb):
    x, y = pd.read_parquet(pa), pd.read_parquet(pb)
    common = [c for c in x.columns if c in y.columns]
    if len(x) != len(y):
        return f"rows {len(x)} vs {len(y)}"
    m = 0.0
    for c in common:
        if pd.api.types.is_numeric_dtype(x[c]) and pd.api.types.is_numeric_dtype(y[c]):
            d = np.nanmax(np.abs(x[c].to_numpy(float) - y[c].to_numpy(float))) if len(x) else 0.0
            if np.isfinite(d):
                m = max(m, d)
            nx, ny = x[c].isna().to_numpy(), y[c].isna().to_numpy()
            if (nx != ny).any():
                return f"NaN pattern differs in {c}"
        elif x[c].map(repr).tolist() != y[c].map(repr).tolist() and x[c].dtype == object:
            try:
                xa = np.array(x[c].tolist(), dtype=float)
                ya = np.array(y[c].tolist(), dtype=float)
                m = max(m, float(np.nanmax(np.abs(xa - ya))))
            except Exception:
                return f"column {c} differs"
    only = sorted(set(x.columns) ^ set(y.columns))
    return m if not only else (m, f"columns only on one side: {only}")


def flat(d, p=""):
    if isinstance(d, dict):
        for k, v in d.items():
            if k in SKIP_KEYS:
                continue
            yield from flat(v, f"{p}.{k}")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from flat(v, f"{p}[{i}]")
    else:
        yield p, d


for pa in sorted(a.rglob("*.parquet")):
    pb = b / pa.relative_to(a)
    if not pb.exists():
        print(f"MISSING after: {pa.relative_to(a)}")
        continue
    r = cmp_df(pa, pb)
    print(f"{str(pa.relative_to(a)):70s} {r}")
for pa in sorted(a.rglob("summary.json")):
    pb = b / pa.relative_to(a)
    if not pb.exists():
        print(f"MISSING after: {pa.relative_to(a)}")
        continue
    x = dict(flat(json.loads(pa.read_text())))
    y = dict(flat(json.loads(pb.read_text())))
    diffs = []
    for k, v in x.items():
        if k not in y:
            continue
        w = y[k]
        if isinstance(v, (int, float)) and isinstance(w, (int, float)) and not isinstance(v, bool):
            if abs(v - w) > 1e-6:
                diffs.append(f"{k}: {v} -> {w}")
        elif v != w and not isinstance(v, float):
            diffs.append(f"{k}: {str(v)[:60]!r} -> {str(w)[:60]!r}")
    missing = [k for k in x if k not in y]
    print(
        f"{str(pa.relative_to(a)):70s} {len(diffs)} diffs; {len(missing)} keys gone"
        + ("".join("\n    " + d for d in diffs[:12]))
    )

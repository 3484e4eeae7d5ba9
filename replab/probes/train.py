"""``train_probes``: sweep probes over layers of a store and write a run directory.

Run directory (``out``)::

    records.parquet / records.csv   tidy table, one row per (layer, kind, rank)
    summary.json                    best layer, best record, rank answer, config, model, version
    probes/<kind>.safetensors+json  all-rows probes for every layer (no pickle)
    directions/<kind>_L<layer>_<class>.safetensors+json           unit Direction artifacts,
    directions/shuffled_<kind>_L<layer>_<class>.safetensors+json  every layer (logistic,
    directions/index.json                                         meandiff; see directions.py)
    figures/accuracy_vs_layer.png/.svg                     every kind, 95% CIs
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from replab._progress import progress_bar
from replab._version import __version__
from replab.errors import ReplabError
from replab.io import json_plain, writable_dir, write_text_atomic
from replab.probes.directions import save_probe, write_directions
from replab.probes.plots import plot_probe_curves
from replab.probes.rank import cluster_directions, smallest_rank
from replab.probes.splits import (
    control_folds,
    control_labels,
    grouped_folds,
    heldout_folds,
    select_rows,
    shuffled_labels,
    split_column,
    split_hint,
    type_column,
)
from replab.probes.sweep import LayerData, sweep_layer
from replab.store.select import as_store, pick_layers
from replab.threads import limit_threads

KINDS = ("logistic", "meandiff", "lowrank")
RECORD_KEYS = ["layer", "kind", "rank", "accuracy", "balanced_accuracy", "auroc",
               "heldout_accuracy", "heldout_balanced_accuracy", "matched_accuracy", "control_accuracy",
               "selectivity",
               "shuffled_accuracy", "erased_accuracy", "majority_accuracy", "ci_low", "ci_high",
               "fold_std", "lam", "n_rows", "n_classes"]


@dataclass
class ProbeConfig:
    """Settings of a probe sweep (validated in ``__post_init__``).

    Attributes:
        label: index column to predict.
        site: hook alias (``resid_post``) or one full hook name.
        layers: ``"all"``, ``"0-9"``, ``"3,7"``...
        kinds: subset of ``logistic``, ``meandiff``, ``lowrank`` (``lowrank`` needs ``ranks``).
        ranks: ranks of the rank-``k`` probes (e.g. ``(2,)`` or ``(1, 2, 3, 4)``); empty:
            none. With ranks, ``logistic`` is always fitted: it is the full-rank reference.
        split_by: ``entity`` (the ``group`` column), ``template``, ``token`` or any column.
        folds: outer folds.
        lams: candidate per-sample L2 strengths for the nested CV.
        controls: run the control task and the shuffled-label baseline.
        control_type: column whose values are the control task's *types* (default: the
            entity ``group``, else ``token_id`` with >= 20 values; see ``splits.type_column``).
        erase: LEACE necessity check (logistic accuracy after erasure).
        where: pandas query on the index; default_filter: drop control/odd-one-out rows.
        epsilon: rank tolerance (accuracy units); seed; n_boot: bootstrap resamples.
        max_iter: solver iteration cap; threads: layers swept in parallel (one CPU
            thread each; torch runs single-threaded inside a layer).
    """

    label: str
    site: str = "resid_post"
    layers: str | list = "all"
    kinds: tuple = ("logistic", "meandiff")
    ranks: tuple = ()
    split_by: str = "entity"
    folds: int = 5
    lams: tuple = (1e-1, 1e-2, 1e-3)
    controls: bool = True
    control_type: str | None = None
    erase: bool = True
    where: str | None = None
    default_filter: bool = True
    epsilon: float = 0.02
    seed: int = 0
    n_boot: int = 1000
    max_iter: int = 150
    threads: int = 1

    def __post_init__(self):
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise ReplabError(f"unknown probe kind {bad[0]!r}; use logistic, meandiff, lowrank")
        if "lowrank" in self.kinds and not self.ranks:
            raise ReplabError("the lowrank kind needs ranks, e.g. --rank 2 or --rank 1..4")
        self.ranks = tuple(sorted({int(r) for r in self.ranks}))
        if any(r < 1 for r in self.ranks):
            raise ReplabError("--rank values must be >= 1")
        kinds = [k for k in self.kinds if k != "lowrank"]
        if self.ranks and "logistic" not in kinds:
            kinds.insert(0, "logistic")    # the full-rank reference of the rank answer
        self.kinds = tuple(kinds)
        if not self.kinds:
            raise ReplabError("nothing to train: give at least one kind or a rank")
        if self.folds < 2:
            raise ReplabError("--folds must be at least 2")
        if self.control_type is not None and not self.controls:
            raise ReplabError("--control-type needs the control task: drop --no-controls")
        if not self.lams or any(lam <= 0 for lam in self.lams):
            raise ReplabError("L2 strengths must be positive")
        if int(self.threads) < 1:
            raise ReplabError("--threads must be at least 1")


def parse_ranks(spec: str | None) -> tuple:
    """``"2"`` -> (2,) (one rank-2 probe); ``"1..4"`` / ``"1-4"`` -> (1, 2, 3, 4) (a sweep);
    ``"1,3"`` -> (1, 3); None -> ()."""
    if spec is None or str(spec).strip() == "":
        return ()
    text = str(spec).strip().replace("..", "-")
    try:
        if "," in text:
            out = tuple(int(t) for t in text.split(","))
        elif "-" in text:
            lo, hi = (int(t) for t in text.split("-", 1))
            out = tuple(range(lo, hi + 1))
        else:
            out = (int(text),)
    except ValueError:
        raise ReplabError(f"bad --rank {spec!r}; use K, 1..K or 1,2,4") from None
    if not out or min(out) < 1:
        raise ReplabError(f"bad --rank {spec!r}: ranks are >= 1 (K, 1..K or 1,2,4)")
    return out


@dataclass
class ProbeRun:
    """Result of :func:`train_probes`: tidy ``records``, ``best_layer`` and the run dir."""

    records: pd.DataFrame
    best_layer: int
    summary: dict
    out: Path | None = None
    probes: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """``{"best_layer": int, "records": [...]}`` plus the summary's rank answer."""
        recs = self.records[[c for c in RECORD_KEYS if c in self.records]].to_dict("records")
        return {"best_layer": int(self.best_layer), "records": recs,
                "rank": self.summary.get("rank"), "out": str(self.out) if self.out else None}


def prepare(store, cfg: ProbeConfig):
    """Selected rows, classes and :class:`LayerData` (folds, controls, held-out masks)."""
    index = store.index
    rows, notes = select_rows(index, cfg.label, cfg.where, cfg.default_filter)
    ix = index.iloc[rows]
    labels = ix[cfg.label].astype(str).to_numpy()
    classes, codes = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ReplabError(f"label {cfg.label!r} has a single class after filtering: {classes[0]}")
    split_col = split_column(index, cfg.split_by)
    fold = grouped_folds(ix[split_col].to_numpy(), codes, cfg.folds, cfg.seed,
                         column=split_col, split_by=cfg.split_by, class_names=classes,
                         hint=split_hint(ix, exclude=(cfg.label,)))
    heldout = None
    if "template" in ix.columns and split_col != "template":
        per_class = ix.groupby(labels)["template"].nunique()
        if per_class.min() >= 2:        # else a held-out template would hold out a whole class
            heldout = heldout_folds(fold, ix["template"].to_numpy())
        else:
            notes.append("no held-out-template score: some class occurs in a single template")
    control = cfold = None
    control_info = {"control_types": None, "control_split": None, "control_folds": None,
                    "control_coverage": None}
    if cfg.controls:
        type_col = type_column(ix, column=cfg.control_type)
        cf = None
        if type_col is not None:
            types = ix[type_col].to_numpy()
            templates = ix["template"].to_numpy() if "template" in ix.columns else None
            cf = control_folds(types, templates, codes, cfg.folds, cfg.seed)
        if cf is None:
            notes.append("no control task: no type column whose values recur "
                         "(use --control-type COLUMN)")
        else:
            cfold, scheme, coverage = cf
            control = control_labels(types, codes, cfg.seed)
            control_info = {"control_types": type_col, "control_split": scheme,
                            "control_folds": int(cfold.max()) + 1,
                            "control_coverage": round(coverage, 4)}
    boot = ix["group"].to_numpy() if "group" in ix.columns else ix[split_col].to_numpy()
    boot = np.unique(boot.astype(str), return_inverse=True)[1]      # int codes: cheap per layer
    D = LayerData(codes=codes.astype(np.int64), K=len(classes), fold=fold,
                  control=control, cfold=cfold,
                  shuffled=shuffled_labels(codes, cfg.seed), heldout=heldout,
                  boot_groups=boot, lams=tuple(cfg.lams), max_iter=cfg.max_iter,
                  n_boot=cfg.n_boot, controls=cfg.controls, erase=cfg.erase,
                  ranks=cfg.ranks, kinds=cfg.kinds)
    group_source = (store.manifest.get("dataset") or {}).get("group_source")
    info = {"rows": int(len(rows)), "filter": notes, "classes": classes.tolist(),
            "class_counts": {str(c): int((codes == i).sum()) for i, c in enumerate(classes)},
            "split_by": cfg.split_by, "split_column": split_col,
            "split_source": _column_source(split_col, group_source),
            "folds": int(fold.max()) + 1, **control_info,
            "control_source": _column_source(control_info["control_types"], group_source),
            "heldout_templates": heldout is not None}
    return rows, classes, D, info


def _column_source(col: str | None, group_source: str | None) -> str | None:
    """Where a split/type column's values come from, for the summary (``group`` filled from
    the prompt file's ``entity`` column, or the column itself)."""
    if col is None:
        return None
    if col == "group" and group_source:
        return f"the prompt file's {group_source!r} column (as 'group')"
    return f"the {col!r} column"


def train_probes(store, label: str | None = None, out=None, progress: bool = True,
                 config: ProbeConfig | None = None, **kwargs) -> ProbeRun:
    """Sweep probes over the layers of a store.

    Args:
        store: an :class:`~replab.store.ActivationStore` or its directory.
        label: the label column (or pass ``config``).
        out: run directory to write (None: nothing written).
        progress: progress bar (stderr) with layers/s.
        config: a :class:`ProbeConfig`; ``**kwargs`` build one otherwise.

    Returns:
        :class:`ProbeRun`. ``records`` has one row per (layer, kind, rank) with the
        columns in ``RECORD_KEYS`` (see ``docs/probes.md``); the best layer maximises the
        logistic (else first kind's) CV balanced accuracy. ``accuracy`` /
        ``balanced_accuracy`` / ``heldout_*`` use the ``split_by`` folds (generalisation to
        unseen groups); ``matched_accuracy`` / ``control_accuracy`` / ``selectivity`` use the
        control folds, where control types recur (``summary["data"]["control_split"]``).
    """

    store = as_store(store)
    cfg = config or ProbeConfig(label=label, **kwargs)
    layers = pick_layers(store, cfg.site, cfg.layers)
    store.check_finite(layers.values())     # NaN/inf: one error naming the hook and rows
    rows, classes, D, info = prepare(store, cfg)
    t0 = time.perf_counter()
    records, probes = [], {}
    with limit_threads(1, blas=1), \
            progress_bar(len(layers) * len(rows), f"probe {cfg.label}", unit="row",
                         enabled=progress) as bar:
        for layer, hook, res in _sweep_layers(store, layers, rows, D, cfg.threads):
            for rec in res.records:
                records.append({"layer": layer, "hook": hook, **rec})
            probes[layer] = res.probes
            bar.advance(len(rows))
    df = pd.DataFrame(records)
    if info["split_column"] == "template":   # the folds themselves hold templates out
        df["heldout_accuracy"] = df["accuracy"]
        df["heldout_balanced_accuracy"] = df["balanced_accuracy"]
    df = df[[c for c in RECORD_KEYS if c in df] + [c for c in df if c not in RECORD_KEYS]]
    main = "logistic" if "logistic" in cfg.kinds else cfg.kinds[0]
    sel = df[df["kind"] == main]
    best = int(sel.loc[sel["balanced_accuracy"].idxmax(), "layer"])
    summary = {"best_layer": best, "best_kind": main, "seconds": time.perf_counter() - t0,
               "label": cfg.label, "site": cfg.site, "data": info, "config": asdict(cfg),
               "model": store.model, "store": str(store.path), "replab_version": __version__,
               "position": store.manifest.get("config", {}).get("positions")}
    summary["best"] = {k: _py(v) for k, v in sel[sel["layer"] == best].iloc[0].items()}
    if cfg.ranks:
        summary["rank"] = _rank_answer(df, cfg, probes, classes)
    run = ProbeRun(records=df, best_layer=best, summary=summary, probes=probes)
    if out is not None:
        write_run(run, Path(out), store, cfg, classes, layers)
    return run


def _sweep_layers(store, layers: dict, rows, D: LayerData, threads: int = 1):
    """Yield ``(layer, hook, LayerResult)`` in layer order.

    With ``threads > 1`` layers are swept concurrently by that many Python threads, each
    running torch with one intra-op thread (torch and numpy release the GIL in their
    kernels). Parallel layers, not parallel matmuls: on a shared machine a 2-thread
    torch pool stalls at every barrier when a core is busy elsewhere (>5x slower), while
    independent layers just share the cores. Results are identical to a serial sweep.
    """
    def one(item):
        layer, hook = item
        return layer, hook, sweep_layer(np.asarray(store.acts(hook)[rows], dtype=np.float32), D)

    items = list(layers.items())
    if threads <= 1 or len(items) < 2:
        yield from map(one, items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=int(threads)) as pool:
        todo = iter(items)
        pending = deque(pool.submit(one, next(todo))                  # bounded memory
                        for _ in range(min(2 * threads, len(items))))
        while pending:
            yield pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(one, nxt))


def _rank_answer(df, cfg, probes, classes) -> dict:

    table = smallest_rank(df, cfg.epsilon)
    per_layer = {}
    for r in table.to_dict("records"):
        layer, k = r["layer"], r["smallest_rank"]
        entry = {"smallest_rank": None if pd.isna(k) else int(k), "full": r["full"],
                 "accuracy_by_rank": {int(a): float(b) for a, b in r["rank_accuracy"].items()}}
        if (entry["smallest_rank"] is None or entry["smallest_rank"] > 1) and "logistic" in probes[layer]:
            coef = probes[layer]["logistic"][0]
            entry.update(cluster_directions(coef - coef.mean(0), classes))
            # centred rows are biased apart like centred class means: unrelated directions
            # sit at cosine -1/(K-1), i.e. cosine distance 1 + 1/(K-1)
            entry["chance_distance"] = round(1 + 1 / (len(classes) - 1), 4)
        per_layer[int(layer)] = entry
    return {"epsilon": cfg.epsilon, "layers": per_layer}


def write_run(run: ProbeRun, out: Path, store, cfg: ProbeConfig, classes, layers) -> None:
    """Write tables, probes, every layer's Directions and the accuracy figure to ``out``."""

    writable_dir(out, "probe run directory")
    (out / "summary.json").unlink(missing_ok=True)     # rewritten last: a crash leaves no summary
    run.out = out
    run.records.to_parquet(out / "records.parquet", index=False)
    run.records.to_csv(out / "records.csv", index=False)
    meta = {"label": cfg.label, "site": cfg.site, "classes": [str(c) for c in classes],
            "best_layer": run.best_layer, "model": store.model, "config": asdict(cfg),
            "position": run.summary["position"], "store": str(store.path),
            "hooks": {int(k): v for k, v in layers.items()}}
    kinds = sorted({k for p in run.probes.values() for k in p})
    for kind in kinds:
        save_probe(out / "probes", kind, {lay: p[kind] for lay, p in run.probes.items() if kind in p},
                   meta)
    write_directions(out / "directions", run.probes, run.records, layers, classes,
                     label=cfg.label, position=str(run.summary["position"]), model=store.model,
                     config=asdict(cfg), best_layer=run.best_layer)
    plot_probe_curves(run.records, out / "figures" / "accuracy_vs_layer",
                      title=f"probe {cfg.label} on {Path(str(store.path)).name}")
    write_text_atomic(out / "summary.json", json.dumps(json_plain(run.summary), indent=1, default=str) + "\n")


def _py(v):
    return v.item() if hasattr(v, "item") else v



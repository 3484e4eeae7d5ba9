"""Layer scan: where is a probe's direction *used*? (``replab features scan``)

A probe's best layer by accuracy need not be a layer where the patched position still
matters: on SmolLM2 the super-class probe peaks at layers 27–29, but by then the class
information has moved from the name to the final token, and patching the name's residual
there does nothing. The scan measures, in **one** batched call of the patching engine over
every layer of the probe run (corrupt run as base, the probe's position rule):

* ``full``: the full-residual patch at the position (clean → corrupt): how much of the
  behaviour the site can carry at all (the ceiling of any direction there);
* ``direction``: the probe's own Direction artifact at that layer (the class's one-vs-rest
  direction), component patched clean → corrupt;
* ``shuffled``: the shuffled-label probe's direction at that layer (when the run has it);
* ``random``: ``n_random`` random directions per layer (optional);

and joins the probe's per-layer accuracy (``records.parquet``). CIs resample people
(:mod:`replab.patching.bootstrap`). The engine's own full/empty sanity checks run in the same
call.

**The chosen layer** (:func:`choose_layer`) is the layer with the highest probe held-out
accuracy among the layers where the full-residual patch restores at least ``min_full``
(default 50%) of the clean-vs-corrupt gap; ties go to the earlier layer. The rule uses the
probe's accuracy and the *site's* causal reach, never the direction's own effect, so the
direction patching verdict at that layer is not selected on its outcome (picking the layer
where the direction works best would bias that verdict upward).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from replab._figures import pyplot
from replab.errors import ReplabError
from replab.features.config import MIN_FULL, ScanConfig, ScanRunConfig, build_run_config, with_overrides
from replab.features.direction_inputs import load_direction, probe_shuffled
from replab.hooks import canonical_site, parse_layers
from replab.io import inside, read_table
from replab.models.coerce import as_model
from replab.patching.engine import Variant
from replab.patching.interventions import Intervention
from replab.patching.metrics import check_metric
from replab.patching.plan import run_plan
from replab.patching.plots import save_figure
from replab.patching.superclass import check_separation
from replab.patching.task import task_positions
from replab.rundir import finish_run, start_run, write_table

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from replab.patching.task import PatchTask

ACCURACY_COLUMNS = ("heldout_balanced_accuracy", "balanced_accuracy", "accuracy")


def probe_accuracy(run: Path, kind: str) -> tuple[pd.DataFrame, str]:
    """Per-layer accuracy of a probe run's ``kind`` (its rows of ``records.parquet``; the
    ``logistic`` and ``meandiff`` records are full-rank, one per layer):
    ``(DataFrame [layer, probe_accuracy, probe_cv_accuracy, probe_control_accuracy], column)``."""
    if not Path(run).is_dir():
        raise ReplabError(f"{run} is not a probe run directory")
    path = inside(run, "records.parquet", "probe records")
    if not path.is_file():
        raise ReplabError(f"{run} is not a probe run directory (no records.parquet)")
    rec = read_table(path, "probe records")
    if "kind" not in rec.columns or "layer" not in rec.columns:
        raise ReplabError(f"{path}: not a probe run's records (no kind/layer columns)")
    kinds = sorted(set(rec["kind"]))
    rec = rec[rec["kind"] == kind]
    if rec.empty:
        raise ReplabError(f"probe run {run} has no {kind} records (kinds: {', '.join(kinds) or 'none'})")
    col = next((c for c in ACCURACY_COLUMNS if c in rec.columns and rec[c].notna().any()), None)
    if col is None:
        raise ReplabError(f"{path}: no accuracy column ({', '.join(ACCURACY_COLUMNS)})")
    g = rec.groupby("layer")
    out = pd.DataFrame({"layer": g[col].max().index.astype(int), "probe_accuracy": g[col].max().to_numpy()})
    for name, c in (("probe_cv_accuracy", "balanced_accuracy"), ("probe_control_accuracy", "control_accuracy")):
        if c in rec.columns:
            out[name] = g[c].max().to_numpy()
    return out, col


def choose_layer(table: pd.DataFrame, min_full: float = MIN_FULL) -> tuple[int | None, str]:
    """``(layer or None, reason)`` by the rule of the module docstring."""
    ok = table[table["full_effect"] >= min_full]
    if ok.empty:
        best = table.loc[table["full_effect"].idxmax()]
        return None, (f"no layer's full-residual patch restores {min_full:.0%} of the gap (best: "
                      f"{best['full_effect']:.2f} at L{int(best['layer'])}); the position carries too "
                      "little to test a direction there")
    best = ok.sort_values(["probe_accuracy", "layer"], ascending=[False, True]).iloc[0]
    top = table.loc[table["probe_accuracy"].idxmax()]
    why = (f"L{int(best['layer'])}: highest probe accuracy ({best['probe_accuracy']:.3f}) among the "
           f"{len(ok)} layers whose full-residual patch restores >= {min_full:.0%} (there: "
           f"{best['full_effect']:.2f})")
    if int(top["layer"]) != int(best["layer"]):
        why += (f"; the probe's most accurate layer L{int(top['layer'])} ({top['probe_accuracy']:.3f}) "
                f"is excluded: its full patch restores {top['full_effect']:.2f}")
    return int(best["layer"]), why


def layer_directions(run: Path, kind: str, cls: str, layers) -> tuple[dict, dict, str]:
    """``({layer: DirectionInput}, {layer: shuffled unit vector}, how)`` for a probe run
    (each layer's direction loaded once; ``.vector`` is its unit vector)."""

    dirs, shuf, sources = {}, {}, set()
    for layer in layers:
        d = load_direction(run, layer=int(layer), cls=cls, kind=kind)
        dirs[int(layer)] = d
        sources.add("Direction artifacts" if d.kind.startswith("direction:") else "probe weights")
        found = probe_shuffled(d)
        if found is not None:
            shuf[int(layer)] = found[0] / np.linalg.norm(found[0])
    return dirs, shuf, " + ".join(sorted(sources))


def scan_layers(model: HookedTransformer, task: PatchTask, run, config: ScanConfig | None = None, *,
                progress: bool = False, **overrides) -> tuple[pd.DataFrame, dict]:
    """Scan every layer of a probe run (module docstring).

    Args:
        task: a :class:`~replab.patching.task.PatchTask` (e.g. the super-class task).
        run: the probe run directory.
        config: a :class:`~replab.features.config.ScanConfig`: the probe ``kind``, the class
            ``cls`` whose direction is patched (default: the task's clean class), the
            ``positions`` rule (default: the probe's own, e.g. ``entity_last``), the ``layers``
            (default: every layer of the probe run), ``metric``, ``n_random``, ``min_full``,
            ``seed``, ``n_boot``; ``**overrides`` set its fields (``scan_layers(model, task, run,
            cls="artist")``).
    Returns:
        ``(table, summary)``: one row per layer (``layer, hook, probe_accuracy, full_effect,
        full_ci_low, full_ci_high, direction_effect, ci_low, ci_high, direction_of_full,
        shuffled_effect, random_mean, random_p95, eligible, chosen``) and a summary with
        ``chosen_layer`` and ``reason``.
    """

    cfg = with_overrides(ScanConfig, config, overrides)
    kind, n_random, min_full, seed = cfg.kind, cfg.n_random, cfg.min_full, cfg.seed
    run = Path(run)
    acc, acc_col = probe_accuracy(run, kind)
    cls = cfg.cls or (task.meta.get("classes") or [None])[0]
    if not cls:
        raise ReplabError("give --class (the class whose probe direction is patched)")
    layers = cfg.layers
    if isinstance(layers, str):
        layers = parse_layers(layers, model.cfg.n_layers)
    layers = sorted(int(x) for x in (layers if layers is not None else acc["layer"]))
    if not layers:
        raise ReplabError("no layers to scan")
    bad = [x for x in layers if not 0 <= x < model.cfg.n_layers]
    if bad:
        raise ReplabError(f"layer {bad[0]} is out of range: this model has layers 0-{model.cfg.n_layers - 1}")
    dirs, shuf, how = layer_directions(run, kind, cls, layers)
    first = dirs[layers[0]]               # one probe run: the same site and position rule at every layer
    site, _ = canonical_site(first.site or "resid_post")
    rule = cfg.positions or first.position or "last"
    try:
        pos = task_positions(task, rule)
    except ReplabError as e:
        raise ReplabError(f"position rule {rule!r} is not defined for task {task.name} ({e}); "
                          "pass --positions") from None
    metric = check_metric(cfg.metric or task.meta.get("metric") or "logit_diff")
    rng = np.random.default_rng(seed)
    variants = []
    for layer in layers:
        def v(what, u=None, layer=layer):
            iv = Intervention(site, layer, positions=pos, source="clean", direction=u)
            return Variant((iv,), name=f"L{layer}:{what}", group=what, info={"layer": layer})
        variants += [v("full"), v("direction", dirs[layer].vector)]
        if layer in shuf:
            variants.append(v("shuffled", shuf[layer]))
        for _ in range(n_random):
            r = rng.standard_normal(model.cfg.d_model)
            variants.append(v("random", r / np.linalg.norm(r)))
    res = run_plan(model, task, variants, metric, n_boot=cfg.n_boot, seed=seed, max_tokens=cfg.max_tokens,
                   progress=progress, label="layer scan", unit="run")
    eff = res.effect
    rows = []
    for layer in layers:
        f, d = res.index(f"L{layer}:full"), res.index(f"L{layer}:direction")
        of_lo, of_hi = res.ratio_ci([d], f)
        rnd = eff[res.rows("random", layer=layer)]
        sh = res.rows("shuffled", layer=layer)
        rows.append({"layer": layer, "hook": Intervention(site, layer).hook,
                     "full_effect": float(eff[f]), "full_ci_low": float(res.ci_low[f]),
                     "full_ci_high": float(res.ci_high[f]),
                     "direction_effect": float(eff[d]), "ci_low": float(res.ci_low[d]),
                     "ci_high": float(res.ci_high[d]),
                     "direction_of_full": res.of(d, f),
                     "of_full_low": float(of_lo[0]), "of_full_high": float(of_hi[0]),
                     "shuffled_effect": float(eff[sh[0]]) if sh else None,
                     "random_mean": float(rnd.mean()) if len(rnd) else None,
                     "random_p95": float(np.quantile(rnd, 0.95)) if len(rnd) else None})
    table = pd.DataFrame(rows).merge(acc, on="layer", how="left")
    if table["probe_accuracy"].isna().all():
        raise ReplabError(f"the probe run has no accuracy for layers {layers}")
    table["probe_accuracy"] = table["probe_accuracy"].fillna(-np.inf)
    chosen, why = choose_layer(table, min_full)
    table["probe_accuracy"] = table["probe_accuracy"].replace(-np.inf, np.nan)
    table["eligible"] = table["full_effect"] >= min_full
    table["chosen"] = table["layer"] == chosen
    top = table.loc[table["probe_accuracy"].idxmax()]
    summary = {"chosen_layer": chosen, "reason": why,
               "rule": (f"highest probe {acc_col} ({kind}) among layers whose full-residual patch at "
                        f"{rule} restores >= {min_full:g} of the clean-vs-corrupt gap; ties: earlier layer"),
               "min_full": min_full, "probe_best_layer": int(top["layer"]),
               "probe_best_accuracy": float(top["probe_accuracy"]),
               "probe_best_full_effect": float(top["full_effect"]),
               "max_full_layer": int(table.loc[table["full_effect"].idxmax(), "layer"]),
               "max_direction_layer": int(table.loc[table["direction_effect"].idxmax(), "layer"]),
               "accuracy_column": acc_col, "probe_kind": kind, "class": cls, "site": site, "position_rule": rule,
               "positions": None if pos is None else list(pos), "directions": how, "shuffled": bool(shuf),
               "n_random": n_random, "layers": layers, "probe_run": str(run), "task": task.describe(),
               **res.describe()}
    if chosen is not None:
        row = table[table["layer"] == chosen].iloc[0]
        summary.update(chosen_full_effect=float(row["full_effect"]),
                       chosen_direction_effect=float(row["direction_effect"]),
                       chosen_probe_accuracy=float(row["probe_accuracy"]))
    return table, summary


def scan_figure(table: pd.DataFrame, summary: dict, title: str):
    """Probe accuracy and causal effects (full-residual, probe direction, shuffled) vs layer."""

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.4, 4.8))
    L = table["layer"].to_numpy()
    ax.plot(L, table["probe_accuracy"], marker="s", ms=3, color="C2",
            label=f"probe accuracy ({summary['accuracy_column']})")
    ax.plot(L, table["full_effect"], marker="o", ms=3, color="black", label="full-residual patch")
    ax.fill_between(L, table["full_ci_low"], table["full_ci_high"], color="black", alpha=0.12)
    ax.plot(L, table["direction_effect"], marker="o", ms=3, color="C0",
            label=f"probe direction ({summary['probe_kind']}, {summary['class']})")
    ax.fill_between(L, table["ci_low"], table["ci_high"], color="C0", alpha=0.2)
    if table["shuffled_effect"].notna().any():
        ax.plot(L, table["shuffled_effect"].astype(float), ls="--", color="C3", label="shuffled-label direction")
    if table["random_p95"].notna().any():
        ax.plot(L, table["random_p95"].astype(float), ls=":", color="grey", label="random directions, p95")
    ax.axhline(summary["min_full"], color="black", lw=0.6, ls=":")
    if summary["chosen_layer"] is not None:
        ax.axvline(summary["chosen_layer"], color="C1", lw=1.5, label=f"chosen layer {summary['chosen_layer']}")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"normalised effect ({summary['metric']}) / accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def run_scan(probe=None, out=None, model: HookedTransformer | str | None = None, progress: bool = True,
             config: ScanRunConfig | None = None, **options) -> dict:
    """``replab features scan`` end to end: load, scan, write ``scan.parquet/.csv``,
    ``scan.png/.svg`` and ``summary.json`` (last) to ``out`` (default ``runs/features-scan``).

    ``config``: a :class:`~replab.features.config.ScanRunConfig` (the probe run, the task, and
    the scan's options as ``config.scan``); ``**options`` set its fields or those of
    ``config.scan`` (``run_scan("runs/probe", cls="artist", layers="0-23")``). Returns the
    summary; its ``config`` is ``config.to_dict()``.
    """

    if probe is not None:
        options["probe"] = probe
    cfg = build_run_config(ScanRunConfig, config, options)
    run = Path(cfg.probe)
    if not (run / "probes").is_dir():
        raise ReplabError(f"{cfg.probe} is not a probe run directory (replab probe train --out ...)")
    probe_accuracy(run, cfg.scan.kind)                   # its records are readable: fail before the model loads
    m = as_model(model)
    t = cfg.load_task(m)
    sep = check_separation(m, t, cfg.scan.metric or t.meta.get("metric") or "logit_diff")
    table, s = scan_layers(m, t, run, cfg.scan, progress=progress)
    out = start_run(Path(out or "runs/features-scan"))
    files = write_table(table, out, "scan")
    title = (f"{s['class']} probe ({cfg.scan.kind}) vs causal reach at {s['position_rule']}, task {t.name}")
    files += save_figure(scan_figure(table, s, title), out / "scan")
    summary = {"kind": "features_scan", **s, "separation": sep,
               "table": table.to_dict("records"), "files": files, "config": cfg.to_dict()}
    return {**finish_run(out, summary, m), "out": str(out)}


def scan_layer(path) -> int:
    """The chosen layer of a ``features scan`` run directory (ReplabError if it chose none)."""
    import json

    if not Path(path).is_dir():
        raise ReplabError(f"{path} is not a finished `replab features scan` run (not a directory)")
    p = inside(path, "summary.json", "scan summary")
    try:
        s = json.loads(p.read_text())
    except (OSError, ValueError):
        raise ReplabError(f"{path} is not a finished `replab features scan` run (no readable summary.json)") from None
    if not isinstance(s, dict):
        raise ReplabError(f"{p}: not a scan summary (not a JSON object)")
    if s.get("kind") != "features_scan":
        raise ReplabError(f"{path} is not a `replab features scan` run")
    if s.get("chosen_layer") is None:
        raise ReplabError(f"the scan {path} chose no layer: {s.get('reason')}")
    return int(s["chosen_layer"])

"""One call for ``replab features patch``: load everything, run, write a run directory.

Run directory (``summary.json`` written last; no pickles)::

    effects.parquet/.csv       one row per named variant (direction, full, complement, shuffled,
                               noising, ablation, LEACE, steering, sanity) and per random one
    random.parquet/.csv        one row per random direction (denoising and ablation effects)
    steering.parquet/.csv      dose–response over α (direction and random band)
    per_prompt.parquet/.csv    named variants × prompts: the metric after patching
    separation.parquet/.csv    clean vs corrupt metric per pair (the task check)
    dose_response.png/.svg     steering curve; random_baseline.png/.svg: effect histogram
    summary.json               verdict, effect, CI, baselines, checks, config, model identity
"""

from __future__ import annotations

from pathlib import Path

from replab.errors import ReplabError
from replab.features.direction_patch import DEFAULT_ALPHA_UNIT, DEFAULT_ALPHAS


def resolve_layer(layer) -> int | None:
    """``--layer``: None, an integer, or a ``replab features scan`` run directory (its chosen layer)."""
    if layer is None or isinstance(layer, int):
        return layer
    text = str(layer).strip()
    try:
        return int(text)
    except ValueError:
        pass
    if Path(text).is_dir():
        from replab.features.scan import scan_layer

        return scan_layer(text)
    raise ReplabError(f"bad --layer {layer!r}: give a layer number or a `replab features scan` run directory")


def parse_alphas(spec) -> list[float]:
    """``"-8,-4,0,4,8"`` -> floats (ReplabError on a bad list)."""
    if spec is None:
        return list(DEFAULT_ALPHAS)
    if isinstance(spec, str):
        try:
            vals = [float(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ReplabError(f"bad --alphas {spec!r}; use numbers separated by commas, e.g. -8,-4,0,4,8") from None
    else:
        vals = [float(x) for x in spec]
    return vals


def run_direction_patch(direction, out=None, task: str = "superclass", classes: str | None = None,
                        cls: str | None = None, label: str = "superclass", layer=None,
                        site: str | None = None, positions: str | None = None, metric: str | None = None,
                        n_random: int = 100, alphas=None, alpha_unit: str = DEFAULT_ALPHA_UNIT,
                        shuffled: str | None = None,
                        store: str | None = None, leace: bool = True, template: str | None = None,
                        pairs: int = 64, dataset: str | None = None, model: str | None = None,
                        seed: int = 0, progress: bool = True, kind: str = "logistic",
                        random_tol: float | None = None) -> dict:
    """Direction patching end to end (see :func:`replab.features.direction_patch.direction_patch`).

    Args:
        direction: a Direction/probe artifact, raw vector file, probe run or store (see
            :func:`replab.features.direction_inputs.load_direction`); ``cls``/``label``/``layer``
            pick a probe's or store's class and layer; ``layer`` may be a ``features scan`` run
            directory (its chosen layer); ``kind``: the probe of a probe run directory.
        task: ``superclass`` (with ``classes`` ``"artist,scientist"``, ``dataset``, ``template``) or
            any patching task; ``pairs``: at most this many prompt pairs.
        shuffled: shuffled-label baseline: a direction file or a store (default: the direction's
            own store, when it is known and present); ``store``: the store for LEACE (default
            the direction's own); ``leace``: fit and apply LEACE when a store is available.
    Returns:
        The summary dict written to ``<out>/summary.json`` (plus ``out``).
    """
    from replab.features.direction_inputs import (
        check_model,
        fit_leace,
        load_direction,
        resolve_store,
        shuffled_direction,
    )
    from replab.features.direction_patch import patch_direction
    from replab.features.direction_plots import dose_response, random_histogram
    from replab.models import load_model
    from replab.patching.catalog import load_task
    from replab.patching.plots import save_figure
    from replab.patching.superclass import check_separation, separation_table
    from replab.rundir import finish_run, start_run, write_table

    alphas = parse_alphas(alphas)
    layer_arg, layer = layer, resolve_layer(layer)
    d = load_direction(direction, layer, cls, label, kind)
    m = load_model(model)
    t = load_task(task, m.tokenizer, template, pairs, bool(m.cfg.default_prepend_bos), classes, dataset)
    notes = []
    warn = check_model(d, m)
    if warn:
        notes.append(warn)
    metric_name = metric or t.meta.get("metric") or "logit_diff"
    separation = check_separation(m, t, metric_name)
    sep_table = separation_table(m, t, metric_name)
    shuffled_vec, how = None, None
    try:
        shuffled_vec, how = shuffled_direction(shuffled, d, seed)
        notes.append(f"shuffled-label baseline: {how}")
    except ReplabError as e:
        if shuffled is not None:
            raise
        notes.append(f"no shuffled-label baseline: {e}")
    eraser, leace_info = None, None
    use_layer = d.layer if layer is None else int(layer)
    lstore = resolve_store(store or d.store)
    if leace and lstore is not None and (site or d.site or "resid_post") == "resid_post" and use_layer is not None:
        try:
            eraser, leace_info = fit_leace(lstore, use_layer, d.label or label)
            leace_info["store"] = str(lstore)
        except ReplabError as e:
            notes.append(f"no LEACE ({e})")
    elif leace:
        notes.append("no LEACE: it needs an activation store of the patched hook (--store)")
    res = patch_direction(m, t, d, site=site, layer=layer, positions=positions, metric=metric,
                          n_random=n_random, alphas=alphas, alpha_unit=alpha_unit,
                          shuffled=shuffled_vec, leace=eraser, seed=seed, progress=progress,
                          random_tol=random_tol, shuffled_source=how)
    s = res.summary
    out = start_run(Path(out or f"runs/features-patch-L{s['layer']}"))
    files = []
    for df, stem in ((res.effects, "effects"), (res.random, "random"), (res.steering, "steering"),
                     (res.per_prompt, "per_prompt"), (sep_table, "separation")):
        files += write_table(df, out, stem)
    title = (f"{d.cls or 'direction'} ({d.kind}) at {s['hook']} pos {s['position_label']}, task {t.name}")
    files += save_figure(dose_response(res.steering, title, s["metric"], alpha_unit), out / "dose_response")
    files += save_figure(random_histogram(res.random, s, title), out / "random_baseline")
    if d.k == 1:   # the direction actually patched, as a Direction artifact (for `sae decompose`)
        from replab.probes.directions import Direction

        # the position *rule* (e.g. entity_last), so feeding this file back means the same positions
        rule = s.get("position_rule") or ",".join(map(str, s["positions"] or [])) or "all"
        Direction(vector=d.vector, hook=s["hook"], layer=int(s["layer"]), position=str(rule),
                  label=d.label or label, positive_class=d.cls or "", classes=[], kind=d.kind,
                  model=m.replab_identity.to_dict(),
                  config={"source": d.source, "position_label": s.get("position_label")}
                  ).save(out / "direction.json")
        files += [str(out / "direction.json"), str(out / "direction.safetensors")]
    config = {"direction": str(direction), "class": cls, "label": label, "layer": layer,
              "layer_arg": None if layer_arg is None else str(layer_arg), "kind": kind, "site": site,
              "positions": positions, "metric": metric, "n_random": n_random, "alphas": alphas,
              "alpha_unit": alpha_unit,
              "shuffled": shuffled, "store": store, "leace": leace, "task": task, "classes": classes,
              "template": template, "pairs": pairs, "dataset": dataset, "seed": seed,
              "random_tol": random_tol}
    summary = {"kind": "features_direction_patch", **s, "separation": separation, "leace_fit": leace_info,
               "notes": notes, "config": config, "files": files}
    return {**finish_run(out, summary, m), "out": str(out)}

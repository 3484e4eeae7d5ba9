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

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from replab.errors import ReplabError
from replab.features.config import DirectionRunConfig, build_run_config
from replab.features.direction_inputs import check_model, fit_leace, load_direction, resolve_store, shuffled_direction
from replab.features.direction_patch import patch_direction
from replab.features.direction_plots import dose_response, random_histogram
from replab.features.scan import scan_layer
from replab.models.coerce import as_model
from replab.patching.plots import save_figure
from replab.patching.superclass import check_separation, separation_table
from replab.probes.directions import Direction
from replab.rundir import finish_run, start_run, write_table

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


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

        return scan_layer(text)
    raise ReplabError(f"bad --layer {layer!r}: give a layer number or a `replab features scan` run directory")


def run_direction_patch(direction=None, out=None, model: HookedTransformer | str | None = None,
                        progress: bool = True, config: DirectionRunConfig | None = None, **options) -> dict:
    """Direction patching end to end (:func:`replab.features.direction_patch.patch_direction`),
    written to the run directory ``out`` (default ``runs/features-patch-L<layer>``).

    Args:
        direction: what to patch (``config.direction``): a Direction/probe artifact, raw vector
            file, probe run or store (:func:`replab.features.direction_inputs.load_direction`).
        model: a loaded model or a model name (default SmolLM2; :func:`replab.models.coerce.as_model`).
        config: a :class:`~replab.features.config.DirectionRunConfig` (the task, the
            direction's class/label/layer/kind, the baselines' sources, and the experiment's
            options as ``config.patch``); ``**options`` set its fields or, for the others, those
            of ``config.patch`` (``run_direction_patch("runs/probe", cls="artist", layer=20,
            n_random=20)``).
    Returns:
        The summary dict written to ``<out>/summary.json`` (plus ``out``); its ``config`` is
        ``config.to_dict()``.
    """
    if direction is not None:
        options["direction"] = direction
    cfg = build_run_config(DirectionRunConfig, config, options)

    layer = resolve_layer(cfg.layer)
    patch = cfg.patch if layer is None else dataclasses.replace(cfg.patch, layer=layer)
    d = load_direction(cfg.direction, patch.layer, cfg.cls, cfg.label, cfg.kind)
    m = as_model(model)
    t = cfg.load_task(m)
    notes = []
    warn = check_model(d, m)
    if warn:
        notes.append(warn)
    metric_name = patch.metric or t.meta.get("metric") or "logit_diff"
    separation = check_separation(m, t, metric_name)
    sep_table = separation_table(m, t, metric_name)
    shuffled_vec, how = None, None
    try:
        shuffled_vec, how = shuffled_direction(cfg.shuffled, d, patch.seed)
        notes.append(f"shuffled-label baseline: {how}")
    except ReplabError as e:
        if cfg.shuffled is not None:
            raise
        notes.append(f"no shuffled-label baseline: {e}")
    eraser, leace_info = None, None
    use_layer = d.layer if patch.layer is None else patch.layer
    lstore = resolve_store(cfg.store or d.store)
    if cfg.leace and lstore is not None and (patch.site or d.site or "resid_post") == "resid_post" \
            and use_layer is not None:
        try:
            eraser, leace_info = fit_leace(lstore, use_layer, d.label or cfg.label)
            leace_info["store"] = str(lstore)
        except ReplabError as e:
            notes.append(f"no LEACE ({e})")
    elif cfg.leace:
        notes.append("no LEACE: it needs an activation store of the patched hook (--store)")
    res = patch_direction(m, t, d, patch, shuffled=shuffled_vec, leace=eraser, shuffled_source=how,
                          progress=progress)
    s = res.summary
    out = start_run(Path(out or f"runs/features-patch-L{s.layer}"))
    files = []
    for df, stem in ((res.effects, "effects"), (res.random, "random"), (res.steering, "steering"),
                     (res.per_prompt, "per_prompt"), (sep_table, "separation")):
        files += write_table(df, out, stem)
    title = (f"{d.cls or 'direction'} ({d.kind}) at {s.hook} pos {s.position_label}, task {t.name}")
    files += save_figure(dose_response(res.steering, title, s.metric, patch.alpha_unit), out / "dose_response")
    files += save_figure(random_histogram(res.random, s, title), out / "random_baseline")
    if d.k == 1:   # the direction actually patched, as a Direction artifact (for `sae decompose`)

        # the position *rule* (e.g. entity_last), so feeding this file back means the same positions
        rule = s.position_rule or ",".join(map(str, s.positions or [])) or "all"
        Direction(vector=d.vector, hook=s.hook, layer=s.layer, position=str(rule),
                  label=d.label or cfg.label, positive_class=d.cls or "", classes=[], kind=d.kind,
                  model=m.replab_identity.to_dict(),
                  config={"source": d.source, "position_label": s.position_label}
                  ).save(out / "direction.json")
        files += [str(out / "direction.json"), str(out / "direction.safetensors")]
    summary = {"kind": "features_direction_patch", **s.to_dict(), "separation": separation,
               "leace_fit": leace_info, "notes": notes, "config": cfg.to_dict(), "files": files}
    return {**finish_run(out, summary, m), "out": str(out)}

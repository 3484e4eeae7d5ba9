"""``replab sae patch``: SAE latent patching end to end, written to a run directory."""

from __future__ import annotations

import json
from pathlib import Path

from replab.errors import ReplabError


def _latents_from(path) -> list[int]:
    """Top latents of a ``replab sae decompose`` run (its ``top_latents`` table, in order)."""
    import pandas as pd

    d = Path(path)
    table = d / "top_latents.parquet"
    if not table.is_file():
        raise ReplabError(f"{path} is not a `replab sae decompose` run (no top_latents.parquet)")
    return [int(x) for x in pd.read_parquet(table)["latent"].tolist()]


def _parse_ints(spec) -> list[int] | None:
    if spec is None:
        return None
    try:
        return [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise ReplabError(f"bad list {spec!r}; use integers separated by commas") from None


def run_latent_patch(sae_dir=None, layer: int | None = None, hook: str = "resid_post",
                     task: str = "superclass", classes: str | None = None, latents=None,
                     from_dir=None, top: int = 5, positions: str | None = None,
                     metric: str | None = None, n_random: int = 100, pairs: int = 64,
                     template: str | None = None, out=None, model: str | None = None,
                     seed: int = 0, dataset: str | None = None) -> dict:
    """Load the SAE (a directory, or the cached one at ``hook``/``layer``), the task and the
    latents (``latents`` "12,34", ``from_dir`` a decompose run, else the ``top`` by
    attribution), run :func:`replab.features.latent_patch.patch_latents`, write ``out``.

    ``positions``: a rule of the task (``entity_last``, ``last``, ``all``) or "3,4"; default
    the person's last name token for the super-class task, else every position. ``dataset``:
    a prompt file for the task (superset schema for ``superclass``, e.g. a known-only JSONL).
    """
    from replab._figures import pyplot
    from replab.features.latent_patch import patch_latents
    from replab.features.sae.artifact import load_sae, model_for, read_meta, resolve_sae_dir
    from replab.models import load_model
    from replab.patching.catalog import load_task
    from replab.patching.plots import save_figure
    from replab.patching.task import task_positions
    from replab.rundir import finish_run, start_run, write_table

    m = load_model(model)
    path = resolve_sae_dir(sae_dir, m, hook, layer)
    m = model_for(read_meta(path), m)
    sae, meta = load_sae(path)
    t = load_task(task, m.tokenizer, template, pairs, bool(m.cfg.default_prepend_bos), classes, dataset)
    metric = metric or ("class_mass" if t.class_a is not None else "logit_diff")
    rule = positions or ("entity_last" if "entity_last" in t.meta.get("positions", {}) else "all")
    pos = task_positions(t, rule)
    chosen = _parse_ints(latents) or (_latents_from(from_dir)[:top] if from_dir else None)
    table, summary = patch_latents(m, sae, meta, t, latents=chosen, top=top,
                                  positions=None if pos is None else list(pos), metric=metric,
                                  n_random=n_random, seed=seed, position_rule=rule)
    out = start_run(Path(out or "runs/sae-patch"))
    files = write_table(table.assign(latents=table["latents"].map(
        lambda v: json.dumps(v) if v is not None else None)), out, "latent_patch")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    dose = table[table["kind"] == "top_k"]
    ax.errorbar(dose["k"], dose["normalized_effect"],
                yerr=[dose["normalized_effect"] - dose["ci_low"], dose["ci_high"] - dose["normalized_effect"]],
                marker="o", label="top-k latents by attribution")
    ax.axhline(summary["full_residual_effect"], color="black", ls="--", lw=0.8, label="full patch at the site")
    ax.axhline(summary["all_latents_effect"], color="C2", ls="-.", lw=0.8, label="all latents (error term kept)")
    ax.axhline(summary["effect"], color="C1", lw=0.8, label=f"chosen {len(summary['latents'])} latents")
    if summary["n_random"]:
        ax.axhline(summary["random_p95"], color="grey", ls=":", lw=0.8, label="random sets, 95th pct")
    ax.set_xscale("log")
    ax.set_xlabel("number of latents patched (k)")
    ax.set_ylabel("normalised effect")
    ax.set_title(f"SAE latent patching at {meta['hook_name']}, {t.name}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files += save_figure(fig, out / "dose_response")
    summary = {"kind": "sae_latent_patch", "sae": str(path), "config": {
        "top": top, "n_random": n_random, "positions": rule, "pairs": pairs, "seed": seed, "task": task,
        "classes": classes, "dataset": dataset, "template": template, "metric": metric,
        "latents": latents, "from": str(from_dir) if from_dir else None}, **summary, "files": files}
    return {**finish_run(out, summary, m), "out": str(out)}

"""``replab sae patch``: SAE latent patching end to end, written to a run directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from replab._figures import pyplot
from replab.errors import ReplabError
from replab.features.config import LatentRunConfig, build_run_config
from replab.features.latent_patch import patch_latents
from replab.features.sae.artifact import load_sae, model_for, read_meta, resolve_sae_dir
from replab.io import inside, read_table
from replab.models.coerce import as_model
from replab.patching.plots import save_figure
from replab.rundir import finish_run, start_run, write_table

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def latents_from(path) -> list[int]:
    """Top latents of a ``replab sae decompose`` run (its ``top_latents`` table, in order)."""
    d = Path(path)
    if not d.is_dir():
        raise ReplabError(f"{path} is not a `replab sae decompose` run (not a directory)")
    table = inside(d, "top_latents.parquet", "latent table")
    if not table.is_file():
        raise ReplabError(f"{path} is not a `replab sae decompose` run (no top_latents.parquet)")
    df = read_table(table, "latent table")
    if "latent" not in df.columns:
        raise ReplabError(f"{table}: no 'latent' column (not a `replab sae decompose` table)")
    return [int(x) for x in df["latent"].tolist()]


def run_latent_patch(sae_dir=None, out=None, model: HookedTransformer | str | None = None,
                     progress: bool = False, config: LatentRunConfig | None = None, **options) -> dict:
    """``replab sae patch`` end to end, written to the run directory ``out`` (default
    ``runs/sae-patch``).

    ``config``: a :class:`~replab.features.config.LatentRunConfig`: the SAE (``sae_dir``, else
    the cached one at ``hook``/``layer``), the task, ``from_dir`` (a ``sae decompose`` run whose
    top latents are patched when ``patch.latents`` is not given; else the ``patch.top`` by
    attribution), and :func:`replab.features.latent_patch.patch_latents`'s options as
    ``config.patch``; ``**options`` set its fields or those of ``config.patch``
    (``run_latent_patch(layer=20, latents="12,34", n_random=50)``). ``patch.positions``
    defaults to the task's ``entity_last`` when it has one (the super-class task), else every
    position; ``patch.metric`` to the task's (``class_mass`` for superclass), else
    ``logit_diff``. Returns the summary; its ``config`` is ``config.to_dict()``.
    """

    if sae_dir is not None:
        options["sae"] = sae_dir
    cfg = build_run_config(LatentRunConfig, config, options)
    from_latents = latents_from(cfg.from_dir) if cfg.patch.latents is None and cfg.from_dir else None
    m = as_model(model)
    path = resolve_sae_dir(cfg.sae, m, cfg.hook, cfg.layer)
    m = model_for(read_meta(path), m)
    sae, meta = load_sae(path)
    t = cfg.load_task(m)
    rule = cfg.patch.positions or ("entity_last" if "entity_last" in t.meta.get("positions", {}) else "all")
    latents = cfg.patch.latents
    if latents is None and from_latents is not None:
        latents = from_latents[:cfg.patch.top]
    patch = dataclasses.replace(cfg.patch, latents=latents, positions=rule)
    table, summary = patch_latents(m, sae, meta, t, patch, progress=progress,
                                   position_rule=rule if isinstance(rule, str) else None)
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
    summary = {"kind": "sae_latent_patch", "sae": str(path), "config": cfg.to_dict(), **summary, "files": files}
    return {**finish_run(out, summary, m), "out": str(out)}

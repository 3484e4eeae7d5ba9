"""Runs of ``replab sae eval`` and ``replab sae decompose``: each writes a run directory
(tables, figures, then its summary/eval JSON last)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from replab._version import __version__
from replab.errors import ReplabError
from replab.features.sae import plots
from replab.features.sae.acts import corpus_windows
from replab.features.sae.artifact import WEIGHTS, check_replaceable, load_sae, model_for, read_meta, resolve_sae_dir
from replab.features.sae.crosscheck import sae_lens_crosscheck
from replab.features.sae.decompose import decompose_direction, read_direction
from replab.features.sae.evaluate import DEAD_THRESHOLD, DENSE_THRESHOLD, evaluate_sae
from replab.features.sae.plots import frequency_plot
from replab.io import atomic_dir, sha256_file
from replab.models.coerce import as_model
from replab.prompts.corpus import corpus_sha256
from replab.rundir import write_table

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def _table_files(df: pd.DataFrame | None, folder: Path, stem: str) -> list[str]:
    """:func:`replab.rundir.write_table` into ``folder``; the file names written (none for no table)."""
    return [] if df is None else [Path(f).name for f in write_table(df, folder, stem)]


def run_decompose(sae_dir=None, direction=None, store=None, label: str | None = None,
                  positive_class: str | None = None, top: int = 10, n_examples: int = 5,
                  n_tokens: int = 10, out=None, where: str | None = None,
                  model: HookedTransformer | str | None = None) -> dict:
    """:func:`decompose_direction` + a run directory.

    ``sae_dir`` None: the cached SAE at the Direction's hook and layer. Writes (atomically:
    temp dir, then rename) ``cosine``, ``attribution`` (with a store), ``top_latents``,
    ``examples`` and ``logit_effects`` as Parquet + CSV, ``top_latents.png`` and
    ``summary.json`` to ``out`` (default ``runs/sae-decompose``). Returns the summary.
    """

    t0 = time.perf_counter()
    if direction is None:
        raise ReplabError("give a direction (--direction PATH)")
    out = Path(out or "runs/sae-decompose")
    check_replaceable(out, "summary.json", "a decompose run directory")
    if sae_dir is None:

        _, prov = read_direction(direction)
        if prov.get("hook") is None:
            raise ReplabError("a raw vector has no hook or layer: give the SAE directory")
        model = as_model(model)
        sae_dir = resolve_sae_dir(None, model, prov["hook"], prov["layer"])
    res = decompose_direction(sae_dir, direction, store, label, positive_class, top, n_examples,
                              n_tokens, model=model, where=where)
    with atomic_dir(out) as tmp:
        files = []
        for key, name in (("cosine", "cosine"), ("attribution", "attribution"), ("top", "top_latents"),
                          ("examples", "examples"), ("logits", "logit_effects")):
            files += _table_files(res[key], tmp, name)
        s = res["summary"]
        what = f"{s.get('positive_class') or s['direction'].get('positive_class') or 'direction'}"
        value = "contribution" if res["attribution"] is not None else "cosine"
        plots.top_latents_plot(res["top"], tmp / "top_latents.png", value,
                               f"{what}: top SAE latents at {s['hook_name']} by {value}",
                               examples=res["examples"])
        files.append("top_latents.png")
        summary = {"kind": "sae_decompose", **s, "config": {
            "top": top, "n_examples": n_examples, "n_tokens": n_tokens, "label": label,
            "positive_class": positive_class, "where": where,
            "direction": str(direction) if isinstance(direction, (str, os.PathLike)) else None},
            "top": res["top"].to_dict(orient="records"), "files": files,
            "replab_version": __version__, "seconds": round(time.perf_counter() - t0, 1), "out": str(out)}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def check_sae_lens_tokens(n: int, batch_size: int, seq_len: int | None = None,
                          n_windows: int | None = None) -> None:
    """ReplabError unless ``--sae-lens n`` is 0 (off) or gives at least ``batch_size`` windows of
    ``seq_len`` tokens (of the ``n_windows`` evaluated): the cross-check runs whole batches."""

    if int(batch_size) < 1:
        raise ReplabError(f"--batch-size must be at least 1, got {batch_size}")
    if int(n) < 0:
        raise ReplabError(f"--sae-lens must be >= 0 (0: no cross-check), got {n}")
    if not n or seq_len is None:
        return
    have = int(n) // int(seq_len)
    if have < batch_size:
        raise ReplabError(f"--sae-lens {n} gives {have} windows of {seq_len} tokens; the SAELens cross-check "
                          f"needs at least --batch-size ({batch_size}): use --sae-lens {batch_size * seq_len} "
                          "or more")
    if n_windows is not None and n_windows < batch_size:
        raise ReplabError(f"--tokens gives only {n_windows} windows of {seq_len} tokens; the SAELens cross-check "
                          f"needs at least --batch-size ({batch_size}): raise --tokens")


def run_sae_eval(path=None, model: HookedTransformer | str | None = None, corpus: str = "builtin-heldout",
                 tokens: int = 8192, seq_len: int | None = None, skip_first: int | None = None, batch_size: int = 4,
                 out=None, layer: int | None = None, hook: str = "resid_post",
                 dead_threshold: float = DEAD_THRESHOLD, dense_threshold: float = DENSE_THRESHOLD,
                 progress: bool = True, force: bool = False,
                 sae_lens_tokens: int = 0) -> tuple[dict, pd.DataFrame]:
    """Evaluate a saved SAE (``path``, or the cached SAE of ``model`` at ``hook``/``layer``).

    An ``out`` that already holds an evaluation of the same SAE weights (sha256) on the same
    held-out text (sha256) with the same settings is reused (``summary["cached"]``) unless
    ``force``. ``sae_lens_tokens > 0`` adds ``summary["sae_lens_crosscheck"]``: the overlapping
    metrics next to ``sae_lens.evals.run_evals`` on that many held-out tokens (every position
    scored by both; :mod:`replab.features.sae.crosscheck`).

    Writes ``eval.json`` (metrics, config, SAE path, model identity, seconds),
    ``latents.parquet`` / ``latents.csv`` and ``latent_frequency.png`` to ``out``
    (default ``<SAE dir>/eval``). ``seq_len`` / ``skip_first`` default to the SAE's training
    values. Returns ``(summary, latents DataFrame)``; ``summary["metrics"]`` holds the numbers.
    """

    t0 = time.perf_counter()
    check_sae_lens_tokens(sae_lens_tokens, batch_size)
    if path is None:   # the cached SAE of this model
        model = as_model(model)
    path = resolve_sae_dir(path, model, hook, layer)
    meta = read_meta(path)
    cfg = meta.get("config", {})
    seq_len = int(seq_len or cfg.get("seq_len", 128))
    skip_first = int(cfg.get("skip_first", 1) if skip_first is None else skip_first)
    check_sae_lens_tokens(sae_lens_tokens, batch_size, seq_len)   # before loading the model
    out = Path(out) if out is not None else Path(path) / "eval"
    check_replaceable(out, "eval.json", "an SAE eval directory")
    model = model_for(meta, model)
    sae, meta = load_sae(path)

    run_cfg = {"corpus": corpus, "tokens": None, "seq_len": seq_len, "skip_first": skip_first,
               "batch_size": batch_size, "dead_threshold": dead_threshold, "dense_threshold": dense_threshold,
               "sae_lens_tokens": int(sae_lens_tokens),
               "sae_weights_sha256": sha256_file(Path(path) / WEIGHTS),
               "corpus_sha256": corpus_sha256(corpus)}
    windows = corpus_windows(model.tokenizer, corpus, seq_len, tokens, seed=0)
    run_cfg["tokens"] = int(windows.numel())
    check_sae_lens_tokens(sae_lens_tokens, batch_size, seq_len, len(windows))
    if not force and (out / "eval.json").is_file():
        try:
            old = json.loads((out / "eval.json").read_text())
        except ValueError:
            old = {}
        if {k: old.get("config", {}).get(k) for k in run_cfg} == run_cfg and (out / "latents.parquet").is_file():
            return {**old, "cached": True}, pd.read_parquet(out / "latents.parquet")
    metrics, latents = evaluate_sae(sae, model, meta["hook_name"], windows, skip_first, batch_size,
                                    dead_threshold, dense_threshold, progress)
    cross = None
    if sae_lens_tokens:

        cross = sae_lens_crosscheck(sae, model, meta["hook_name"], windows[:sae_lens_tokens // seq_len],
                                    batch_size)
    with atomic_dir(out) as tmp:
        write_table(latents, tmp, "latents")
        frequency_plot(latents, tmp / "latent_frequency.png",
                       f"{meta['hook_name']} {meta['architecture']} d_sae={meta['d_sae']}", dense_threshold)
        summary = {"kind": "sae_eval", "sae": str(path), "hook_name": meta["hook_name"],
                   "architecture": meta["architecture"], "d_sae": meta["d_sae"],
                   "metrics": metrics, "config": run_cfg, "sae_lens_crosscheck": cross,
                   "model": model.replab_identity.to_dict(), "replab_version": __version__,
                   "seconds": round(time.perf_counter() - t0, 1), "out": str(out)}
        (tmp / "eval.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return {**summary, "cached": False}, latents

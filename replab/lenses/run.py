"""``apply_lens``: decode prompts with the logit or tuned lens and write a run directory.

Run directory (``out``)::

    table.parquet / table.csv   tidy lens table (replab.lenses.table; CSV lists as JSON)
    first_top1.csv              per prompt: first layer where the target is top-1
    logit_diff.csv              (prompt sets with answer + foil) W2 step 3 (docs/workflows.md): logit lens
                                from the accumulated residual (incl. mid points), tuned lens
                                from its translated residual (replab.lenses.logit_diff)
    trajectory.png              layer x position heatmap of prompt ``index``
    target.png                  target probability / rank by layer (when there is a target)
    logit_diff.png              mean (± std) logit difference by layer, clean and corrupt
    summary.json                config, model identity, replab version, key results
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from replab._version import __version__
from replab.errors import ReplabError
from replab.io import write_text_atomic
from replab.lenses.cache import check_lens_dir, load_lens
from replab.lenses.decoders import LogitLens, TunedLensDecoder
from replab.lenses.logit_diff import decoder_logit_diff_curve, logit_diff_curve, summarize_curve
from replab.lenses.plots import logit_diff_plot, target_curve, trajectory_heatmap
from replab.lenses.table import first_top1, lens_table
from replab.lenses.tuned import quiet_hf_model, tuned_lens_path
from replab.models import load_model, load_tokenizer
from replab.models.tiny_hf import resolve
from replab.prompts import load_prompts
from replab.rundir import start_run
from replab.threads import limit_threads


def _inputs(tokenizer, prompt, dataset, target, limit):

    if (prompt is None) == (dataset is None):
        raise ReplabError("give exactly one of --prompt TEXT or --dataset NAME")
    if prompt is not None:
        if not prompt:
            raise ReplabError("--prompt is empty")
        return [prompt], [target], None, None
    ps = load_prompts(dataset, tokenizer=tokenizer)
    rows = ps.rows if limit is None else ps.rows.head(limit)
    if rows.empty:
        raise ReplabError(f"prompt set {dataset!r} has no rows")
    answers = rows["answer"].tolist()
    targets = [target] * len(rows) if target is not None else [
        a if isinstance(a, str) else None for a in answers]
    keep = [c for c in rows.columns if c not in ("foils",)]
    return rows["prompt"].tolist(), targets, rows[keep].reset_index(drop=True), rows


def make_decoder(kind: str, model_name: str | None, mid: bool = False, lens_path=None):
    """``(decoder, tl_model, identity)`` for ``kind`` in {"logit", "tuned"}."""

    if kind not in ("logit", "tuned"):
        raise ReplabError(f"unknown lens {kind!r}; use 'logit' or 'tuned'")
    if kind == "tuned" and mid:
        raise ReplabError("--mid has no tuned-lens equivalent (tuned-lens trains translators "
                          "only for the residual entering each block); use `replab lens logit --mid`")
    if kind == "tuned":

        model_name = resolve(model_name)
    model = load_model(model_name)
    identity = model.replab_identity.to_dict()
    if kind == "logit":
        return LogitLens(model, mid=mid), model, identity

    path = check_lens_dir(tuned_lens_path(model_name, lens_path, identity))
    hf = quiet_hf_model(model_name)
    lens = load_lens(path, hf, identity)
    return TunedLensDecoder(hf, lens), model, identity


def apply_lens(kind: str = "logit", model: str | None = None, prompt: str | None = None,
               dataset: str | None = None, target: str | None = None, mid: bool = False,
               k: int = 5, out: str | Path | None = None, index: int = 0, limit: int | None = None,
               lens_path: str | Path | None = None, progress: bool = True,
               threads: int | None = 1) -> dict:
    """Decode ``prompt`` or every prompt of ``dataset`` at every layer and position.

    ``threads``: torch threads for the table and the logit-difference curve (default 1:
    fastest on a shared CPU; ``None`` leaves torch's setting).
    Returns the summary dict (also written to ``out/summary.json``); it holds
    ``first_top1`` (:func:`first_top1_summary`) when there is a target.
    """

    if k < 1:
        raise ReplabError("--top-k must be at least 1")
    t0 = time.perf_counter()
    decoder, tl_model, identity = make_decoder(kind, model, mid, lens_path)
    tokenizer = tl_model.tokenizer or load_tokenizer(model)
    prompts, targets, extra, rows = _inputs(tokenizer, prompt, dataset, target, limit)
    if not 0 <= index < len(prompts):
        raise ReplabError(f"--index {index} is out of range (0..{len(prompts) - 1})")
    bos = bool(identity["prepend_bos"])
    t_load = time.perf_counter() - t0
    with limit_threads(threads):
        table = lens_table(decoder, tokenizer, prompts, targets, k, bos, extra, progress)
    t_table = time.perf_counter() - t0 - t_load
    out = Path(out or f"runs/lens-{kind}-{dataset or 'prompt'}")
    out = start_run(out)   # an older summary.json (the completion marker) goes first
    table.to_parquet(out / "table.parquet", index=False)
    csv = table.copy()
    for col in ("top_tokens", "top_probs"):
        csv[col] = csv[col].map(json.dumps)
    csv.to_csv(out / "table.csv", index=False)
    figures = [str(trajectory_heatmap(table, out / "trajectory.png", index))]
    summary = {"kind": f"{kind}_lens", "model": identity, "replab_version": __version__,
               "config": {"prompt": prompt, "dataset": dataset, "target": target, "mid": mid,
                          "top_k": k, "limit": limit, "threads": threads,
                          "lens_path": str(lens_path) if lens_path else None},
               "n_prompts": len(prompts), "n_points": len(decoder.points), "out": str(out)}
    if any(t is not None for t in targets):
        ft = first_top1(table)
        if extra is not None:
            cols = [c for c in ("prompt", "answer", "template") if c in extra.columns]
            ft = ft.merge(extra[cols].assign(prompt_id=range(len(extra))), on="prompt_id",
                          how="left")
        else:
            ft.insert(1, "prompt", [prompts[i] for i in ft["prompt_id"]])
        ft.to_csv(out / "first_top1.csv", index=False)
        figures.append(str(target_curve(table, out / "target.png", ft)))
        summary["first_top1"] = first_top1_summary(ft)
    if rows is not None and _has_pairs(rows):
        with limit_threads(threads):
            if kind == "logit":
                curve = logit_diff_curve(tl_model, tokenizer, rows, bos, progress)
            else:
                curve = decoder_logit_diff_curve(decoder, tokenizer, rows, bos, progress)
        curve.to_csv(out / "logit_diff.csv", index=False)
        agg = summarize_curve(curve)
        what = ("from the accumulated residual" if kind == "logit"
                else "of the tuned lens (translated residual)")
        figures.append(str(logit_diff_plot(
            agg, out / "logit_diff.png", f"{dataset}: logit difference (answer − foil) {what}",
            kind)))
        clean = agg[agg["which"] == "clean"].sort_values("depth")
        summary["logit_diff_final_mean"] = float(clean["mean"].iloc[-1])
    summary["figures"] = figures
    summary["seconds_load"] = round(t_load, 1)
    summary["seconds_table"] = round(t_table, 1)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_text_atomic(out / "summary.json", json.dumps(_no_nan(summary), indent=1, default=str))
    return summary


def _has_pairs(rows: pd.DataFrame) -> bool:
    has_foil = rows["corrupt_answer"].map(lambda v: isinstance(v, str)) | rows["foils"].map(
        lambda v: v is not None and len(v) > 0)
    return bool((rows["answer"].map(lambda v: isinstance(v, str)) & has_foil).any())


def first_top1_summary(ft: pd.DataFrame) -> dict:
    """Summary of :func:`replab.lenses.table.first_top1` rows.

    ``median_first_top1_layer`` is over the prompts whose target ever becomes top-1
    (``n_ever_top1`` of ``n_prompts``; ``frac_ever_top1``);
    ``median_first_top1_layer_final_top1`` only over those where the model itself
    (the final point) ranks it top-1 (``n_final_top1``); ``median_stable_top1_layer``:
    the point from which it stays top-1, over the latter. ``per_prompt`` lists every
    prompt (``first_top1_layer`` None when never top-1); ``by_template`` repeats the
    counts and medians per template when the prompt set has templates.
    """
    def median(values: pd.Series):
        values = values.dropna()
        return None if values.empty else float(values.median())

    def agg(g: pd.DataFrame) -> dict:
        right = g["final_rank"] == 0
        return {
            "n_prompts": int(len(g)),
            "n_final_top1": int(right.sum()),
            "n_ever_top1": int(g["first_top1_layer"].notna().sum()),
            "frac_final_top1": round(float(right.mean()), 4),
            "frac_ever_top1": round(float(g["first_top1_layer"].notna().mean()), 4),
            "median_first_top1_layer": median(g["first_top1_layer"]),
            "median_first_top1_layer_final_top1": median(g.loc[right, "first_top1_layer"]),
            "median_stable_top1_layer": median(g["stable_top1_layer"]),
        }

    out = agg(ft)
    hit = ft["first_top1_layer"].dropna()
    counts = hit.value_counts().sort_index()
    out["first_top1_layer_counts"] = {f"{k:g}": int(v) for k, v in counts.items()}
    if "template" in ft.columns and ft["template"].nunique() > 1:
        out["by_template"] = {str(t): agg(g) for t, g in ft.groupby("template", sort=False)}
    keep = [c for c in ("prompt_id", "prompt", "target", "first_top1_layer", "first_top1_point",
                        "stable_top1_layer", "final_rank", "final_prob") if c in ft.columns]
    out["per_prompt"] = _no_nan(ft[keep].to_dict(orient="records"))
    return out


def _no_nan(value):
    """NaN -> None, numpy scalars -> Python, recursively (for JSON)."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value

"""``apply_lens``: decode prompts with the logit or tuned lens and write a run directory.

Run directory (``out``)::

    table.parquet / table.csv   tidy lens table (replab.lenses.table; CSV lists as JSON)
    first_top1.csv              per prompt: first layer where the target is top-1
    logit_diff.csv              (logit lens, prompt sets with answer + foil) W2 step 3 curve
    trajectory.png              layer x position heatmap of prompt ``index``
    target.png                  target probability / rank by layer (when there is a target)
    logit_diff.png              mean logit difference along the accumulated residual
    summary.json                config, model identity, replab version, key results
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from replab._version import __version__
from replab.errors import ReplabError


def _inputs(tokenizer, prompt, dataset, target, limit):
    from replab.prompts import load_prompts

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
    from replab.lenses.decoders import LogitLens, TunedLensDecoder
    from replab.models import load_model

    if kind not in ("logit", "tuned"):
        raise ReplabError(f"unknown lens {kind!r}; use 'logit' or 'tuned'")
    if kind == "tuned":
        from replab.lenses.tiny_hf import resolve

        model_name = resolve(model_name)
    model = load_model(model_name, device="cpu")
    identity = model.replab_identity.to_dict()
    if kind == "logit":
        return LogitLens(model, mid=mid), model, identity
    if mid:
        raise ReplabError("the tuned lens has translators only at resid_pre points; "
                          "use `replab lens logit --mid` for mid-layer points")
    from replab.lenses.store import check_lens_dir, load_lens
    from replab.lenses.tuned import quiet_hf_model, tuned_lens_path

    path = check_lens_dir(tuned_lens_path(model_name, lens_path, identity))
    hf = quiet_hf_model(model_name)
    lens = load_lens(path, hf, identity)
    return TunedLensDecoder(hf, lens), model, identity


def apply_lens(kind: str = "logit", model: str | None = None, prompt: str | None = None,
               dataset: str | None = None, target: str | None = None, mid: bool = False,
               k: int = 5, out: str | Path | None = None, index: int = 0, limit: int | None = None,
               lens_path: str | Path | None = None, progress: bool = True) -> dict:
    """Decode ``prompt`` or every prompt of ``dataset`` at every layer and position.

    Returns the summary dict (also written to ``out/summary.json``).
    """
    from replab.lenses import plots
    from replab.lenses.logit_diff import logit_diff_curve, summarize_curve
    from replab.lenses.table import first_top1, lens_table
    from replab.models import load_tokenizer

    if k < 1:
        raise ReplabError("--top-k must be at least 1")
    t0 = time.perf_counter()
    decoder, tl_model, identity = make_decoder(kind, model, mid, lens_path)
    tokenizer = tl_model.tokenizer or load_tokenizer(model)
    prompts, targets, extra, rows = _inputs(tokenizer, prompt, dataset, target, limit)
    if not 0 <= index < len(prompts):
        raise ReplabError(f"--index {index} is out of range (0..{len(prompts) - 1})")
    bos = bool(identity["prepend_bos"])
    table = lens_table(decoder, tokenizer, prompts, targets, k, bos, extra, progress)
    out = Path(out or f"runs/lens-{kind}-{dataset or 'prompt'}")
    out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out / "table.parquet", index=False)
    csv = table.copy()
    for col in ("top_tokens", "top_probs"):
        csv[col] = csv[col].map(json.dumps)
    csv.to_csv(out / "table.csv", index=False)
    figures = [str(plots.trajectory_heatmap(table, out / "trajectory.png", index))]
    summary = {"kind": f"{kind}_lens", "model": identity, "replab_version": __version__,
               "config": {"prompt": prompt, "dataset": dataset, "target": target, "mid": mid,
                          "top_k": k, "limit": limit, "lens_path": str(lens_path) if lens_path else None},
               "n_prompts": len(prompts), "n_points": len(decoder.points), "out": str(out)}
    if any(t is not None for t in targets):
        ft = first_top1(table)
        ft.to_csv(out / "first_top1.csv", index=False)
        figures.append(str(plots.target_curve(table, out / "target.png", ft)))
        summary["first_top1"] = _first_top1_summary(ft)
    if kind == "logit" and rows is not None and _has_pairs(rows):
        curve = logit_diff_curve(tl_model, tokenizer, rows, bos, progress)
        curve.to_csv(out / "logit_diff.csv", index=False)
        agg = summarize_curve(curve)
        figures.append(str(plots.logit_diff_plot(
            agg, out / "logit_diff.png",
            f"{dataset}: logit difference (answer − foil) from the accumulated residual")))
        clean = agg[agg["which"] == "clean"].sort_values("depth")
        summary["logit_diff_final_mean"] = float(clean["mean"].iloc[-1])
    summary["figures"] = figures
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _has_pairs(rows: pd.DataFrame) -> bool:
    has_foil = rows["corrupt_answer"].map(lambda v: isinstance(v, str)) | rows["foils"].map(
        lambda v: v is not None and len(v) > 0)
    return bool((rows["answer"].map(lambda v: isinstance(v, str)) & has_foil).any())


def _first_top1_summary(ft: pd.DataFrame) -> dict:
    hit = ft["first_top1_layer"].dropna()
    return {
        "n_prompts": int(len(ft)),
        "n_final_top1": int((ft["final_rank"] == 0).sum()),
        "n_ever_top1": int(len(hit)),
        "median_first_top1_layer": None if hit.empty else float(hit.median()),
        "median_stable_top1_layer": None if ft["stable_top1_layer"].dropna().empty
        else float(ft["stable_top1_layer"].dropna().median()),
        "first_top1_layer_counts": {str(k): int(v) for k, v in hit.value_counts().sort_index().items()},
    }

"""The ``sequences`` experiment's head-function stage (W4 step 3): head detectors, OV next-item
and copy scores, QK previous-item scores on token sets, and the circuit heads' attention
patterns, joined for the pruned circuit's heads (:func:`replab.heads.runs.run_detect`,
``run_ov``, ``run_qk``, ``run_patterns``)."""

from __future__ import annotations

import shlex

import numpy as np
import pandas as pd

from replab.experiments.sequences_common import MAX_ROWS, items
from replab.experiments.spec import model_flag, rel
from replab.heads.runs import run_detect, run_ov, run_patterns, run_qk
from replab.rundir import write_table


def _ranked(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """``table`` with each head's name (``L5H3``) and its rank by ``column`` (1 = highest, ties share
    the best rank)."""
    table = table.assign(name="L" + table["layer"].astype(str) + "H" + table["head"].astype(str))
    table["rank"] = table[column].rank(ascending=False, method="min")
    return table


def _circuit_table(ctx, detect: dict, ov: dict, qk: dict, heads: list[str]) -> tuple[list[dict], dict]:
    """One row per circuit head: detector scores and ranks, OV next-item and copy scores, QK
    previous-item and self scores."""
    det = pd.read_parquet(ctx.out / "detect" / "detectors.parquet")
    det["name"] = "L" + det["layer"].astype(str) + "H" + det["head"].astype(str)
    det["rank"] = det.groupby("detector")["score"].rank(ascending=False, method="min").astype(int)
    rows = {h: {"head": h} for h in heads}
    best = {"relative": -np.inf}
    for r in det[det["name"].isin(heads)].itertuples():
        rows[r.name][r.detector] = float(r.score)
        rows[r.name][f"{r.detector}_rank"] = int(r.rank)
        ideal = detect["ideal"].get(r.detector)
        if ideal and r.score / ideal > best["relative"]:
            best = {"head": r.name, "detector": r.detector, "score": float(r.score), "ideal": float(ideal),
                    "relative": float(r.score / ideal), "rank": int(r.rank)}
    best_ov = {"score": -np.inf}
    for name, (table, n) in ov.items():
        table = _ranked(table, "next_item")
        for r in table[table["name"].isin(heads)].itertuples():
            rows[r.name][f"next_item_{name}"] = float(r.next_item)
            rows[r.name][f"copy_{name}"] = float(r.copy)
            if r.next_item > best_ov["score"]:
                best_ov = {"head": r.name, "tokens": name, "score": float(r.next_item), "chance": 1.0 / n,
                           "n_items": n, "rank": int(r.rank), "copy": float(r.copy),
                           "n_tied": int((table["next_item"] == r.next_item).sum()) - 1}
    best_qk = {"score": -np.inf}
    for name, table in qk.items():
        table = _ranked(table, "previous_item_top")
        for r in table[table["name"].isin(heads)].itertuples():
            rows[r.name][f"qk_previous_{name}"] = float(r.previous_item_top)
            rows[r.name][f"qk_self_{name}"] = float(r.self_top)
            if r.previous_item_top > best_qk["score"]:
                best_qk = {"head": r.name, "tokens": name, "score": float(r.previous_item_top),
                           "self": float(r.self_top), "n_items": int(r.n_tokens), "chance": 1.0 / int(r.n_tokens),
                           "rank": int(r.rank)}
    cols = ["head"] + [f"{d}{x}" for d in detect["detectors"] for x in ("", "_rank")] \
        + [f"{k}_{name}" for name in ov for k in ("next_item", "copy")] \
        + [f"qk_{k}_{name}" for name in qk for k in ("previous", "self")]
    return [{k: r.get(k) for k in cols} for r in rows.values()], {"detector": best if "head" in best else None,
                                 "next_item": best_ov if "head" in best_ov else None,
                                 "previous_item_qk": best_qk if "head" in best_qk else None}


def heads_stage(ctx) -> dict:
    c = ctx.config
    heads = ctx.results["prune"]["circuit"]["heads"]
    d = run_detect(c["detectors"], model=ctx.model, n_seqs=c["n_seqs"], seed=c["seed"], out=ctx.out / "detect",
                   progress=ctx.progress)
    commands = [f"replab heads detect{model_flag(ctx)} --detectors {c['detectors']} --n-seqs {c['n_seqs']} "
                f"--seed {c['seed']} --out {ctx.out / 'detect'}"]
    figures = [rel(ctx.out / "detect" / f"heatmap_{x}.png", ctx.run_dir) for x in d["detectors"]]
    ov, ov_top = {}, {}
    for name in items(c["ov_tokens"]):
        s = run_ov(tokens=name, model=ctx.model, out=ctx.out / f"ov_{name}")
        ov[name] = (pd.read_parquet(ctx.out / f"ov_{name}" / "ov_scores.parquet"), s["tokens"]["n"])
        ov_top[name] = [{"head": f"L{r['layer']}H{r['head']}", "next_item": r["next_item"]}
                        for r in s["top"].get("next_item", [])[:3]]
        commands.append(f"replab heads ov{model_flag(ctx)} --tokens {name} --out {ctx.out / f'ov_{name}'}")
        if (ctx.out / f"ov_{name}" / "heatmap_next_item.png").is_file():
            figures.append(rel(ctx.out / f"ov_{name}" / "heatmap_next_item.png", ctx.run_dir))
    qk = {}
    for name in items(c["ov_tokens"]):              # QK: does a circuit head's query pick the previous item?
        shown = ",".join(heads) if 0 < len(heads) <= c["max_pattern_heads"] else None
        run_qk(tokens=name, heads=shown, model=ctx.model, out=ctx.out / f"qk_{name}")
        qk[name] = pd.read_parquet(ctx.out / f"qk_{name}" / "qk_scores.parquet")
        commands.append(f"replab heads qk{model_flag(ctx)} --tokens {name}"
                        + (f" --heads {shown}" if shown else "") + f" --out {ctx.out / f'qk_{name}'}")
        figures.append(rel(ctx.out / f"qk_{name}" / "qk_matrices.png", ctx.run_dir))
    table, best = _circuit_table(ctx, d, ov, qk, heads)
    patterns = None
    if 0 < len(heads) <= c["max_pattern_heads"]:
        p = run_patterns(",".join(heads), prompt=c["pattern_prompt"], model=ctx.model, out=ctx.out / "patterns")
        patterns = [{"head": r["head"], "last_attends_to": r["last_attends_to"], "weight": r["weight"]}
                    for r in p["heads"]]
        figures.append(rel(ctx.out / "patterns" / "patterns.png", ctx.run_dir))
        commands.append(f"replab heads patterns{model_flag(ctx)} --heads {','.join(heads)} "
                        f"--prompt {shlex.quote(c['pattern_prompt'])} --out {ctx.out / 'patterns'}")
    write_table(pd.DataFrame(table), ctx.out, "circuit_heads")
    if len(table) > MAX_ROWS:      # a large circuit: its heads with the highest detector scores (all in the table)
        rel_score = lambda r: max((r.get(x) or 0) / v for x, v in d["ideal"].items() if v)  # noqa: E731
        table = sorted(table, key=rel_score, reverse=True)[:MAX_ROWS]
    return {"n_heads": len(heads), "ideal": d["ideal"], "top_heads": d["top_heads"], "ov_top": ov_top,
            "circuit_heads": table, "n_rows_shown": len(table), "best_detector": best["detector"],
            "best_next_item": best["next_item"], "best_previous_item_qk": best["previous_item_qk"],
            "patterns": patterns, "n_heads_model": ctx.results["prune"]["n_heads_model"],
            "figures": figures, "command": " && ".join(commands)}

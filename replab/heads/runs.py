"""One call per ``replab heads`` command: load the model, compute, write a run directory.

Each returns the summary that is also written (last) to ``<out>/summary.json``, plus ``out``.
Tables are tidy Parquet + CSV; figures PNG + SVG; every summary records the model identity,
the options and the replab version.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from replab._figures import save
from replab._progress import progress_bar
from replab.errors import ReplabError
from replab.heads.composition import composition_table, parse_modes, top_pairs
from replab.heads.detectors import PATTERN_DETECTORS, detect, parse_detectors, read_texts, tl_crosscheck
from replab.heads.detectors import top_heads as top
from replab.heads.ov import ov_matrices, ov_table
from replab.heads.plots import composition_heatmap, layer_head_heatmap, matrix_panels, positional_panels
from replab.heads.qk import has_learned_positions, is_rotary, matrix_frame, positional_qk, qk_matrices, qk_table
from replab.heads.tokensets import resolve
from replab.hooks import parse_head_list, parse_layers
from replab.models.coerce import as_model
from replab.patching.plots import attention_patterns
from replab.patching.runs import run_patterns as w2_patterns
from replab.prompts import load_prompts
from replab.rundir import finish_run, start_run, write_table


def _save(fig, stem: Path) -> list[str]:

    return [str(p) for p in save(fig, Path(stem), formats=("png", "svg"))]


def run_detect(detectors="all", text=None, out=None, model=None, n_seqs: int = 10, half: int = 25,
               seed: int = 0, tokens: str = "words", crosscheck: bool = False, progress: bool = False) -> dict:
    """``replab heads detect``: every detector's score per (layer, query head), a heatmap per
    detector, the top heads; ``crosscheck`` adds TransformerLens ``detect_head`` differences.

    Writes ``detectors.parquet|csv`` (``layer, head, detector, score``) and
    ``heatmap_<detector>.png|svg``.
    """

    dets = parse_detectors(detectors)
    texts = read_texts(text) if text else None
    m = as_model(model)
    n_steps = (len(texts) if texts else n_seqs) * (1 + ("positional" in dets))
    t0 = time.time()
    show = progress and any(d in PATTERN_DETECTORS for d in dets)
    with progress_bar(n_steps, "detect heads", "seq", enabled=show) as bar:
        table, summary = detect(m, dets, texts, n_seqs, half, seed, tokens, progress=bar.advance)
    seconds = time.time() - t0
    out = start_run(Path(out or "runs/heads-detect"))
    files = write_table(table, out, "detectors")
    for d in dets:
        sub = table[table.detector == d]
        files += _save(layer_head_heatmap(sub, "score", f"{d} detector score per query head", f"{d} score"),
                       out / f"heatmap_{d}")
    summary = {**summary, "kind": "heads_detect", "seconds": round(seconds, 2), "files": files,
               "top_heads": top(table, 3), "options": {"text": str(text) if text else None, "n_seqs": n_seqs,
                                                       "half": half, "seed": seed, "tokens": tokens}}
    if crosscheck:
        used = texts if texts is not None else summary["inputs"]["texts"]
        summary["transformer_lens_max_abs_diff"] = tl_crosscheck(m, used, table)
    return {**finish_run(out, summary, m), "out": str(out)}


def _ranked(table: pd.DataFrame, score: str) -> pd.DataFrame:
    """Rows by ``score`` (descending), ties broken by ``<score>_mean_rank`` (ascending) if present."""
    tie = f"{score}_mean_rank"
    if tie in table:
        return table.sort_values([score, tie], ascending=[False, True])
    return table.sort_values(score, ascending=False)


def _default_heads(table: pd.DataFrame, score: str, k: int = 3) -> list[tuple[int, int]]:
    return [(int(r.layer), int(r.head)) for r in _ranked(table, score).head(k).itertuples()]


def run_ov(tokens: str = "weekdays", heads=None, out=None, model=None, cyclic: bool | None = None,
           layers="all") -> dict:
    """``replab heads ov``: copy / next-item / eigenvalue-copy scores of every query head's OV
    circuit on a token set, and the token × token matrices of chosen heads (default: the 3
    best by next-item score, or by copy score for unordered sets).

    Writes ``ov_scores.parquet|csv``, ``ov_matrices.parquet|csv`` (long: head, source, target,
    value) and ``ov_matrices.png|svg``, ``heatmap_copy``/``heatmap_next_item``.
    """

    m = as_model(model)
    ts = resolve(tokens, m.tokenizer, cyclic=cyclic)
    layer_list = parse_layers(layers, m.cfg.n_layers)
    t0 = time.time()
    table = ov_table(m, ts, layer_list)
    seconds = time.time() - t0
    score = "next_item" if ts.ordered and table["next_item"].notna().any() else "copy"
    chosen = (parse_head_list(heads, m.cfg.n_layers, m.cfg.n_heads) if heads
              else _default_heads(table, score))
    mats = ov_matrices(m, ts, sorted({layer for layer, _ in chosen}))
    frames, marks, long = {}, {}, []
    for layer, h in chosen:
        name = f"L{layer}H{h}"
        mat = mats[layer][h]
        frames[name] = matrix_frame(mat, ts.tokens, ts.tokens)
        marks[name] = [(i, int(j)) for i, j in enumerate(mat.argmax(-1))]
        long.append(frames[name].stack().rename("value").reset_index()
                    .rename(columns={"level_0": "source", "level_1": "target"}).assign(head=name))
    out = start_run(Path(out or f"runs/heads-ov-{ts.name}"))
    files = write_table(table, out, "ov_scores") + write_table(pd.concat(long, ignore_index=True), out, "ov_matrices")
    files += _save(matrix_panels(frames, f"OV circuit on {ts.name} (row: attended token; box: row max)",
                                 "attended (source) token", "logit of token", "logit contribution", mark=marks),
                   out / "ov_matrices")
    for col in ("copy", "next_item"):
        if table[col].notna().any():
            files += _save(layer_head_heatmap(table, col, f"OV {col.replace('_', '-')} score on {ts.name}",
                                              f"{col} score"), out / f"heatmap_{col}")
    cols = lambda c: ["layer", "head", "kv_head", c] + ([f"{c}_mean_rank"] if f"{c}_mean_rank" in table else [])  # noqa: E731
    top = {c: _ranked(table, c).head(5)[cols(c)].to_dict("records")
           for c in ("copy", "next_item", "eigen_copy") if table[c].notna().any()}
    summary = {"kind": "heads_ov", "per": "query head", "tokens": ts.describe(), "layers": layer_list,
               "heads_shown": [f"L{a}H{b}" for a, b in chosen], "top": top, "seconds": round(seconds, 2),
               "files": files, "norms": "ln1 on the embedding; final norm's linear part only; no biases"}
    return {**finish_run(out, summary, m), "out": str(out)}


def run_qk(tokens: str = "weekdays", heads=None, out=None, model=None, offset: int = 0,
           cyclic: bool | None = None, layers="all", n_pos: int = 32) -> dict:
    """``replab heads qk``: the token × token QK circuit of every query head (per-head scores)
    and matrices for chosen heads; for learned-position models also the positional QK.

    Writes ``qk_scores``, ``qk_matrices`` (tables), ``qk_matrices.png|svg`` and, with learned
    positions, ``positional_qk.png|svg``; rotary models get the rotary note in the summary.
    """

    m = as_model(model)
    ts = resolve(tokens, m.tokenizer, cyclic=cyclic)
    layer_list = parse_layers(layers, m.cfg.n_layers)
    table = qk_table(m, ts, layer_list, offset)
    chosen = (parse_head_list(heads, m.cfg.n_layers, m.cfg.n_heads) if heads
              else _default_heads(table, "self_minus_mean"))
    mats = qk_matrices(m, ts, sorted({layer for layer, _ in chosen}), offset)
    frames, long = {}, []
    for layer, h in chosen:
        name = f"L{layer}H{h}"
        frames[name] = matrix_frame(mats[layer][h], ts.tokens, ts.tokens)
        long.append(frames[name].stack().rename("value").reset_index()
                    .rename(columns={"level_0": "query", "level_1": "key"}).assign(head=name))
    out = start_run(Path(out or f"runs/heads-qk-{ts.name}"))
    files = write_table(table, out, "qk_scores") + write_table(pd.concat(long, ignore_index=True), out, "qk_matrices")
    files += _save(matrix_panels(frames, f"QK circuit on {ts.name}, relative offset {offset}",
                                 "query token", "key token", "attention score (pre-softmax)"), out / "qk_matrices")
    positions = None
    if has_learned_positions(m):
        pos_frames = {}
        for layer, h in chosen:
            p = positional_qk(m, layer, n_pos)[h]
            labels = [str(i) for i in range(p.shape[0])]
            pos_frames[f"L{layer}H{h}"] = matrix_frame(p, labels, labels)
        files += _save(positional_panels(pos_frames, "positional QK circuit (learned positions)"),
                       out / "positional_qk")
        positions = "learned: positional_qk.png shows query position × key position scores"
    elif is_rotary(m):
        positions = ("rotary: no positional embedding, so no position-only QK circuit; the token "
                     f"matrices are the scores at relative offset {offset} (query {offset} positions after "
                     "the key), rotated by the model's own rotary; compare --offset values")
    summary = {"kind": "heads_qk", "per": "query head (keys from its KV head)", "tokens": ts.describe(),
               "offset": offset, "layers": layer_list, "heads_shown": list(frames), "positions": positions,
               "top": table.sort_values("self_minus_mean", ascending=False).head(5)
               [["layer", "head", "kv_head", "self_top", "previous_item_top", "self_minus_mean"]].to_dict("records"),
               "files": files, "norms": "ln1 on both embeddings; no biases"}
    return {**finish_run(out, summary, m), "out": str(out)}


def run_composition(mode="all", out=None, model=None, top: int = 20, n_random: int = 200,
                    seed: int = 0, into=None) -> dict:
    """``replab heads composition``: Q/K/V composition of every (sender, later receiver) query-head
    pair, with the random baseline; a sender × receiver heatmap per mode and a top-pairs table.
    ``into`` (e.g. ``"L18H6,L17H4"``): also list the 5 strongest senders into each of these
    receivers, per mode (``summary["into"]``), with their rank among all earlier heads.

    Writes ``composition.parquet|csv`` (all pairs), ``top_pairs.parquet|csv`` and
    ``heatmap_<mode>.png|svg``.
    """

    modes = parse_modes(mode)
    m = as_model(model)
    receivers = parse_head_list(into, m.cfg.n_layers, m.cfg.n_heads) if into else []
    t0 = time.time()
    table, baselines = composition_table(m, modes, n_random, seed)
    seconds = time.time() - t0
    out = start_run(Path(out or "runs/heads-composition"))
    tops = top_pairs(table, top)
    files = write_table(table, out, "composition") + write_table(tops, out, "top_pairs")
    L, H = m.cfg.n_layers, m.cfg.n_heads
    for md in modes:
        sub = table[table["mode"] == md]
        arr = np.zeros((L, H, L, H))
        arr[sub.sender_layer, sub.sender_head, sub.receiver_layer, sub.receiver_head] = sub.score
        files += _save(composition_heatmap(arr, f"{md.upper()}-composition per query-head pair",
                                           baselines[md]["mean"]), out / f"heatmap_{md}")
    summary = {"kind": "heads_composition", "per": "query head (sender and receiver)", "modes": modes,
               "baseline": baselines, "seconds": round(seconds, 2), "n_pairs": int(len(table) // len(modes)),
               "top_pairs": {md: tops[tops["mode"] == md].head(5)[["sender_layer", "sender_head", "receiver_layer",
                                                                   "receiver_head", "score"]].to_dict("records")
                             for md in modes},
               "files": files}
    if receivers:
        summary["into"] = {f"L{la}H{h}": {md: _senders(table, md, la, h) for md in modes} for la, h in receivers}
    return {**finish_run(out, summary, m), "out": str(out)}


def _senders(table: pd.DataFrame, mode: str, layer: int, head: int, k: int = 5) -> list[dict]:
    sub = table[(table["mode"] == mode) & (table.receiver_layer == layer) & (table.receiver_head == head)]
    sub = sub.sort_values("score", ascending=False).reset_index(drop=True)
    return [{"sender": f"L{int(r.sender_layer)}H{int(r.sender_head)}", "score": round(float(r.score), 4),
             "rank": i + 1, "of": len(sub)} for i, r in enumerate(sub.head(k).itertuples())]


def _third(layer: int, n_layers: int) -> str:
    return ("early", "middle", "late")[min(2, layer * 3 // n_layers)]


def run_patterns(heads, prompt: str | None = None, dataset: str | None = None, task: str | None = None,
                 prompt_index: int | None = None, out=None, model=None) -> dict:
    """``replab heads patterns``: attention patterns of chosen query heads, grouped into early /
    middle / late rows, drawn by W2's figure code.

    ``task`` (a patching task) hands over to :func:`replab.patching.runs.run_patterns`
    (mean over the task's clean prompts). ``prompt``: one text. ``dataset``: a prompt set
    (builtin name or file): its prompt ``prompt_index``, or, without it, the mean over the
    prompts of the set's most common token length.
    """

    if sum(x is not None for x in (prompt, dataset, task)) != 1:
        raise ReplabError("give exactly one of --prompt, --dataset or --task")
    if task is not None:

        spec = heads if isinstance(heads, str) else ",".join(f"{a}.{b}" for a, b in heads)
        return w2_patterns(task, heads=spec, out=out or "runs/heads-patterns", model=model)
    m = as_model(model)
    chosen = parse_head_list(heads, m.cfg.n_layers, m.cfg.n_heads)
    texts, source = _pattern_texts(m, prompt, dataset, prompt_index)
    toks = torch.stack([m.to_tokens(t)[0] for t in texts])
    names = {f"blocks.{layer}.attn.hook_pattern" for layer, _ in chosen}
    with torch.inference_mode():
        _, cache = m.run_with_cache(toks, names_filter=lambda n: n in names, return_type=None)
    str_tokens = [m.tokenizer.decode([t]) for t in toks[0].tolist()]
    pats, groups, rows = {}, {}, []
    for layer, h in sorted(chosen):
        p = cache[f"blocks.{layer}.attn.hook_pattern"][:, h].mean(0).float().numpy()
        key = f"L{layer}H{h}"
        pats[key], groups[key] = p, _third(layer, m.cfg.n_layers)
        src = int(np.argmax(p[-1]))
        rows.append({"head": key, "layer": layer, "index": h, "group": groups[key],
                     "last_attends_to": f"{src}:{str_tokens[src]}",
                     "weight": float(p[-1, src])})
    out = start_run(Path(out or "runs/heads-patterns"))
    table = pd.DataFrame(rows)
    files = write_table(table, out, "heads")
    title = f"attention patterns ({source})"
    labels = str_tokens if len(texts) == 1 else [f"{i}:{t}" for i, t in enumerate(str_tokens)]
    files += _save(attention_patterns(pats, labels, title, groups), out / "patterns")
    summary = {"kind": "attention_patterns", "per": "query head", "source": source, "n_prompts": len(texts),
               "tokens": str_tokens, "files": files, "heads": table.to_dict("records")}
    return {**finish_run(out, summary, m), "out": str(out)}


def _pattern_texts(m, prompt, dataset, prompt_index) -> tuple[list[str], str]:
    if prompt is not None:
        if not prompt.strip():
            raise ReplabError("empty prompt")
        return [prompt], f"prompt {prompt!r}"

    ps = load_prompts(dataset, m.tokenizer, prepend_bos=bool(m.cfg.default_prepend_bos))
    prompts = list(ps.rows["prompt"])
    if prompt_index is not None:
        if not 0 <= prompt_index < len(prompts):
            raise ReplabError(f"--prompt-index {prompt_index} is out of range 0-{len(prompts) - 1}")
        return [prompts[prompt_index]], f"{ps.name} prompt {prompt_index}: {prompts[prompt_index]!r}"
    lengths = [m.to_tokens(p).shape[1] for p in prompts]
    common = max(set(lengths), key=lambda n: (lengths.count(n), -n))
    keep = [p for p, n in zip(prompts, lengths, strict=True) if n == common]
    return keep, f"{ps.name}: mean over {len(keep)} prompts of {common} tokens (tokens of the first shown)"

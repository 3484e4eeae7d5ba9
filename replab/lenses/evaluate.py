"""Lens quality on held-out text: per layer KL(final ‖ lens) and next-token cross-entropy.

:func:`evaluate_lenses` returns a tidy DataFrame with one row per (layer, lens):
``layer`` (0..n_layers; ``n_layers`` is the model output, where both lenses equal the
model), ``lens`` (``"logit"`` | ``"tuned"``), ``kl`` (mean ``KL(p_final || p_lens)`` in
nats over every position that has a next token) and ``ce`` (mean cross-entropy of the
lens distribution on the actual next token, nats). ``--json`` prints exactly these
records.
"""

from __future__ import annotations

import pandas as pd
import torch

from replab._progress import progress_bar
from replab._version import __version__
from replab.io import write_text_atomic
from replab.lenses.decoders import Decoder
from replab.lenses.plots import eval_plot
from replab.lenses.run import make_decoder
from replab.models.tiny_hf import resolve
from replab.prompts.corpus import read_corpus, token_chunks
from replab.rundir import start_run
from replab.threads import limit_threads


@torch.no_grad()
def lens_losses(decoder: Decoder, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens [batch, pos]`` -> ``(kl_sum [n_points], ce_sum [n_points])`` over positions 0..pos-2."""
    resid = decoder.residuals(tokens)[:, :, :-1]
    n_points = len(decoder.points)
    final = decoder.decode_point(resid[-1], n_points - 1).float().log_softmax(-1)
    pf = final.exp()
    nxt = tokens[:, 1:]
    kl, ce = [], []
    for i in range(n_points):  # one point's logits at a time: bounded memory
        logq = decoder.decode_point(resid[i], i).float().log_softmax(-1)
        kl.append((pf * (final - logq)).sum(-1).clamp_min(0).sum())
        ce.append(-logq.gather(-1, nxt.unsqueeze(-1)).sum())
    return torch.stack(kl), torch.stack(ce)


def evaluate_lenses(decoders: list[Decoder], chunks: torch.Tensor, batch_size: int = 4,
                    progress: bool = False) -> pd.DataFrame:
    """Mean KL and CE per point for each decoder over ``chunks [n, seq_len]``."""

    n_pred = chunks.shape[0] * (chunks.shape[1] - 1)
    rows = []
    with progress_bar(chunks.numel() * len(decoders), "eval lenses", "tok", enabled=progress) as bar:
        for dec in decoders:
            kl_sum = ce_sum = 0
            for s in range(0, len(chunks), batch_size):
                part = chunks[s:s + batch_size]
                kl, ce = lens_losses(dec, part)
                kl_sum, ce_sum = kl_sum + kl.double(), ce_sum + ce.double()
                bar.advance(part.numel())
            for pt, k, c in zip(dec.points, (kl_sum / n_pred).tolist(), (ce_sum / n_pred).tolist(), strict=True):
                rows.append({"layer": pt.layer, "lens": dec.name, "kl": k, "ce": c})
    return pd.DataFrame(rows)


def wide(df: pd.DataFrame) -> pd.DataFrame:
    """Side-by-side view: ``layer, kl_logit, kl_tuned, ce_logit, ce_tuned``."""
    w = df.pivot(index="layer", columns="lens", values=["kl", "ce"])
    w.columns = [f"{a}_{b}" for a, b in w.columns]
    return w.reset_index()


def run_eval(model: str | None = None, corpus: str = "builtin-heldout", tokens: int = 1024,
             seq_len: int = 128, lens_path=None, out=None, batch_size: int = 4,
             progress: bool = True, threads: int | None = 1) -> tuple[pd.DataFrame, dict]:
    """Evaluate the logit lens and the (cached or given) tuned lens on held-out text.

    Writes ``eval.csv``, ``eval.png`` and ``summary.json`` to ``out`` (default
    ``runs/lens-eval``). ``threads``: torch threads (default 1, fastest on a shared CPU;
    ``None`` leaves torch's setting). Returns ``(records DataFrame, summary)``.
    """
    import json
    import time
    from pathlib import Path

    t0 = time.perf_counter()
    name = resolve(model)
    tuned, tl_model, identity = make_decoder("tuned", name, False, lens_path)
    logit, _, _ = make_decoder("logit", name, False)
    chunks = token_chunks(read_corpus(corpus), tl_model.tokenizer, seq_len, tokens, seed=0)
    with limit_threads(threads):
        df = evaluate_lenses([logit, tuned], chunks, batch_size, progress)
    out = Path(out or "runs/lens-eval")
    out = start_run(out)   # an older summary.json (the completion marker) goes first
    df.to_csv(out / "eval.csv", index=False)
    eval_plot(df, out / "eval.png",
                    f"{Path(identity['name']).name}: lenses on {corpus} ({chunks.numel()} tokens)")
    w = wide(df)
    inner = w[w["layer"] < w["layer"].max()]
    summary = {"kind": "lens_eval", "model": identity, "replab_version": __version__,
               "config": {"corpus": corpus, "tokens": int(chunks.numel()), "seq_len": seq_len,
                          "lens_path": str(lens_path) if lens_path else None},
               "tuned_better_every_layer": bool((inner["kl_tuned"] < inner["kl_logit"]).all()),
               "seconds": round(time.perf_counter() - t0, 1), "out": str(out)}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return df, summary

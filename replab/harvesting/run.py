"""``harvest``: run a model over a prompt set and stream activations to a store."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pandas as pd
import torch

from replab._progress import progress_bar
from replab._version import __version__
from replab.errors import ReplabError
from replab.harvesting.positions import select_positions
from replab.hooks import resolve_hooks, stop_at_layer
from replab.store import open_store
from replab.store.format import split_of
from replab.store.writer import StoreWriter

STORE_DTYPES = {"float32": np.float32, "float16": np.float16}
_TEST_DELAY = float(os.environ.get("REPLAB_TEST_BATCH_DELAY", "0") or 0)


def harvest(model=None, dataset=None, hooks=("resid_post",), layers="all", positions="last",
            dtype=None, batch_size=None, out=None, progress: bool = True):
    """Harvest activations of ``model`` on ``dataset`` into an activation store.

    Args:
        model: a loaded model (:func:`replab.load_model`) or a model name (None: default).
        dataset: a builtin set name, a JSONL/CSV/YAML path, or a ``PromptSet``.
        hooks: aliases (``resid_pre/mid/post``, ``attn_out``, ``mlp_out``, ``mlp_pre``,
            ``mlp_post``, ``z``, ``q``, ``k``, ``v``) and/or raw TransformerLens hook names.
        layers: ``"all"``, ``"0-9"``, ``"10-"``, ``"3,7"``...
        positions: ``"last"``, ``"all"``, ``"0,-1"``, or a span rule like ``"entity_last"``.
        dtype: storage dtype, ``"float32"`` (default) or ``"float16"``.
        batch_size: prompts per forward (default: :func:`replab.models.auto_batch_size`,
            32 on CPU, as many as fit half the GPU's memory on CUDA; must be >= 1).
        out: the store directory. An interrupted harvest into ``out`` resumes.
        progress: show a progress bar (stderr) with tokens/s.

    Returns:
        The finished :class:`~replab.store.ActivationStore`. Rows are in dataset order,
        then position order; each stored tensor is ``[rows, d]`` (head hooks flattened
        to ``n_heads * d_head``). Nothing past the last requested layer is computed
        and the unembedding is skipped.
    """
    from replab.models.coerce import as_model
    from replab.prompts import PromptSet, load_prompts, token_ids

    if out is None:
        raise ReplabError("harvest needs an output directory (out=...)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ReplabError(f"{out}: --out is a file, not a directory; choose a directory path")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ReplabError(f"batch size must be a positive integer, got {batch_size!r}")
    model = as_model(model)
    identity = model.replab_identity
    prepend_bos = bool(model.cfg.default_prepend_bos)
    tok = model.tokenizer
    if dataset is None:
        raise ReplabError("harvest needs a dataset (a builtin name or a JSONL/CSV path)")
    ps = dataset if isinstance(dataset, PromptSet) else load_prompts(
        str(dataset), tokenizer=tok, prepend_bos=prepend_bos)
    if len(ps) == 0:
        raise ReplabError(f"dataset {ps.name} is empty")
    store_dtype = _store_dtype(dtype)
    names = resolve_hooks(model, hooks, layers)
    stop = stop_at_layer(names, model.cfg.n_layers)

    token_lists = [token_ids(tok, p, prepend_bos=prepend_bos) for p in ps.rows["prompt"]]
    if batch_size is None:
        from replab.models import auto_batch_size

        batch_size = auto_batch_size(model, max(len(t) for t in token_lists), keep_layers=stop)
    batch_size = int(batch_size)
    longest = max(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    if len(token_lists[longest]) > model.cfg.n_ctx:
        n_long = sum(len(t) > model.cfg.n_ctx for t in token_lists)
        raise ReplabError(f"{ps.source or ps.name}: row {longest + 1} has {len(token_lists[longest])} tokens, "
                          f"more than the model's context of {model.cfg.n_ctx} ({n_long} prompt(s) too long)")
    chosen = select_positions(positions, ps.rows, [len(t) for t in token_lists], tok, prepend_bos)
    index = build_index(ps, token_lists, chosen, tok)
    dims = _dims(model, names, stop)
    n_batches = math.ceil(len(ps) / batch_size)
    config = {"hooks": names, "layers": str(layers), "positions": positions,
              "dtype": np.dtype(store_dtype).name, "batch_size": batch_size,
              "prepend_bos": prepend_bos, "stop_at_layer": stop}
    dataset_meta = {"name": ps.name, "content_hash": ps.content_hash(), "n_prompts": len(ps),
                    "label_columns": list(ps.label_columns)}
    plan = {"model": identity.to_dict(), "dataset": dataset_meta, "config": config,
            "n_rows": len(index), "n_batches": n_batches, "dims": dims}
    writer = StoreWriter(out, plan, index, dims, store_dtype)
    first = writer.start()
    if not writer.complete:
        _run_batches(model, writer, token_lists, chosen, names, stop, batch_size, first, progress)
        group_source = ps.meta.get("group_source")
        manifest = {"replab_version": __version__, "model": identity.to_dict(),
                    "dataset": {**dataset_meta, "source": str(ps.source),
                                **({"group_source": group_source} if group_source else {})},
                    "config": config}
        writer.finish(manifest)
    return open_store(out)


def _run_batches(model, writer, token_lists, chosen, names, stop, batch_size, first, progress):
    device = next(model.parameters()).device
    pad = model.tokenizer.pad_token_id or 0
    starts = np.cumsum([0] + [len(c) for c in chosen])
    n = len(token_lists)
    total = sum(len(t) for t in token_lists)
    done_tokens = sum(len(t) for t in token_lists[: first * batch_size])
    try:
        with progress_bar(total, "harvest", unit="tok", enabled=progress) as bar:
            bar.advance(done_tokens)
            for b in range(first, math.ceil(n / batch_size)):
                lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
                batch = token_lists[lo:hi]
                tokens = torch.full((len(batch), max(map(len, batch))), pad, dtype=torch.long)
                for i, ids in enumerate(batch):
                    tokens[i, : len(ids)] = torch.tensor(ids)
                rows_b = torch.tensor([i for i, c in enumerate(chosen[lo:hi]) for _ in c])
                rows_p = torch.tensor([p for c in chosen[lo:hi] for p in c])
                captured = _forward(model, tokens.to(device), names, stop, rows_b, rows_p)
                writer.submit(b, int(starts[lo]), captured)
                if _TEST_DELAY:  # lets the kill/resume tests interrupt a run mid-way
                    time.sleep(_TEST_DELAY)
                bar.advance(sum(map(len, batch)))
    except BaseException:
        writer.close()
        raise


def _forward(model, tokens, names, stop, rows_b, rows_p) -> dict[str, np.ndarray]:
    captured: dict[str, np.ndarray] = {}

    def grab(act, hook):
        flat = act.reshape(act.shape[0], act.shape[1], -1)
        captured[hook.name] = flat[rows_b, rows_p].float().cpu().numpy()

    with torch.inference_mode(), model.hooks(fwd_hooks=[(n, grab) for n in names]):
        model(tokens, stop_at_layer=stop)
    return captured


def _dims(model, names, stop) -> dict[str, int]:
    """Width of each hook's flattened vector, from a two-token dry run."""
    tokens = torch.zeros((1, 2), dtype=torch.long, device=next(model.parameters()).device)
    got = _forward(model, tokens, names, stop, torch.tensor([0]), torch.tensor([1]))
    return {n: int(got[n].shape[1]) for n in names}


def _store_dtype(dtype):
    name = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    if name not in STORE_DTYPES:
        raise ReplabError(f"storage dtype {dtype!r} is not supported; use float32 or float16")
    return STORE_DTYPES[name]


def build_index(ps, token_lists, chosen, tokenizer) -> pd.DataFrame:
    """The store index: one row per stored (prompt, position)."""
    rows = ps.rows
    ex_ids = np.repeat(np.arange(len(rows)), [len(c) for c in chosen])
    positions = np.concatenate([np.asarray(c, dtype=np.int32) for c in chosen])
    token_id = np.asarray([token_lists[e][p] for e, p in zip(ex_ids, positions, strict=True)], dtype=np.int64)
    lengths = np.asarray([len(token_lists[e]) for e in ex_ids], dtype=np.int32)
    vocab = {int(t): tokenizer.decode([int(t)]) for t in np.unique(token_id)}
    groups = [str(g) if isinstance(g, str) and g else f"ex{e}" for e, g in
              zip(range(len(rows)), rows["group"], strict=True)]
    index = pd.DataFrame({
        "row": np.arange(len(ex_ids), dtype=np.int64),
        "example_id": ex_ids.astype(np.int64),
        "position": positions,
        "token_id": token_id,
        "token": [vocab[int(t)] for t in token_id],
        "n_tokens": lengths,
        "is_last": positions == lengths - 1,
        "split": [split_of(groups[e]) for e in ex_ids],
    })
    for column in ["prompt", "answer", "template", "group", *ps.label_columns]:
        values = rows[column].to_numpy()[ex_ids]
        index[column] = _arrow_safe(values)
    return index


def _arrow_safe(values: np.ndarray):
    """Label values as given, or as strings when a column mixes types."""
    kinds = {type(v) for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))}
    if len(kinds) <= 1 and not (kinds & {list, dict, tuple}):
        return values
    return [None if v is None else str(v) for v in values]

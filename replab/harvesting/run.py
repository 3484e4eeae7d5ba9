"""``harvest``: run a model over a prompt set and stream activations to a store."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from replab._progress import progress_bar
from replab._version import __version__
from replab.errors import ReplabError
from replab.harvesting.positions import select_positions
from replab.hooks import resolve_hooks, stop_at_layer
from replab.io import is_url, location
from replab.store import open_store
from replab.store.format import split_of
from replab.store.writer import StoreWriter

STORE_DTYPES = {"float32": np.float32, "float16": np.float16}
_TEST_DELAY = float(os.environ.get("REPLAB_TEST_BATCH_DELAY", "0") or 0)


@dataclass
class HarvestPlan:
    """Everything a harvest computes before its first forward (shared by both engines).

    ``token_lists[i]``/``chosen[i]``: token ids and stored positions of prompt ``i``;
    ``starts[i]``: its first store row; batch ``b`` covers prompts
    ``b * batch_size : (b + 1) * batch_size``.
    """

    token_lists: list[list[int]]
    chosen: list[list[int]]
    starts: np.ndarray
    names: list[str]
    stop: int | None
    batch_size: int
    n_batches: int
    index: pd.DataFrame
    dims: dict[str, int]
    store_dtype: object
    plan: dict
    manifest: dict

    def batch(self, b: int) -> tuple[int, list[list[int]], list[list[int]]]:
        """``(first row, token lists, positions)`` of batch ``b``."""
        lo, hi = b * self.batch_size, min(len(self.token_lists), (b + 1) * self.batch_size)
        return int(self.starts[lo]), self.token_lists[lo:hi], self.chosen[lo:hi]


def harvest(model=None, dataset=None, hooks=("resid_post",), layers="all", positions="last",
            dtype=None, batch_size=None, out=None, progress: bool = True, engine: str = "local",
            workers: int | None = None, address: str | None = None, cpus_per_worker: float | None = None):
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
        out: the store directory, or an fsspec URL (``s3://bucket/store``, ``memory://x``:
            built in a local staging directory, then uploaded, manifest last). An interrupted
            harvest into ``out`` resumes.
        progress: show a progress bar (stderr) with tokens/s (rows/s across the cluster for Ray).
        engine: ``"local"`` (this process) or ``"ray"``: contiguous shards of batches run on
            Ray actors that each load the model once (:mod:`replab.harvesting.ray_shards`); the
            store is byte-identical to the local one.
        workers: Ray actors (default: as many as the cluster's free CPUs hold, or its GPUs for a
            CUDA model).
        address: the Ray cluster (``"auto"``, ``"ray://HOST:10001"``; default: the one this
            process joined, else a new local one).
        cpus_per_worker: Ray CPUs each worker reserves (default: the driver's torch thread
            count, which every worker uses so that its kernels round as the driver's do).

    Returns:
        The finished :class:`~replab.store.ActivationStore`, with ``harvest_run``: this call's
        ``{"engine", "rows", "seconds", "rows_per_second"}`` (rows computed now, not resumed;
        for Ray also ``"workers"``, ``"shards"`` and ``"start_seconds"``, the part spent
        starting the workers and loading the model on each; seconds include it and writing the
        store). Rows are in dataset order,
        then position order; each stored tensor is ``[rows, d]`` (head hooks flattened
        to ``n_heads * d_head``). Nothing past the last requested layer is computed
        and the unembedding is skipped.
    """
    from replab.distributed import check_engine
    from replab.models.coerce import as_model

    engine = check_engine(engine, workers, address)
    if out is None:
        raise ReplabError("harvest needs an output directory (out=...)")
    if not is_url(out) and os.path.exists(location(out)) and not os.path.isdir(location(out)):
        raise ReplabError(f"{out}: --out is a file, not a directory; choose a directory path")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ReplabError(f"batch size must be a positive integer, got {batch_size!r}")
    model = as_model(model)
    hp = plan_harvest(model, dataset, hooks, layers, positions, dtype, batch_size)
    writer = StoreWriter(out, hp.plan, hp.index, hp.dims, hp.store_dtype)
    first = writer.start()
    stats = {"engine": engine, "rows": 0, "seconds": 0.0}
    if not writer.complete:
        t0 = time.perf_counter()
        try:
            if engine == "ray":
                from replab.harvesting.ray_shards import run_shards

                stats.update(run_shards(model, writer, hp, first, batch_arrays, progress=progress, workers=workers,
                                        address=address, cpus_per_worker=cpus_per_worker))
            else:
                _run_batches(model, writer, hp, first, progress)
                stats.update(rows=len(hp.index) - int(hp.starts[min(len(hp.token_lists), first * hp.batch_size)]))
        except BaseException:
            writer.close()
            raise
        writer.finish(hp.manifest)
        stats["seconds"] = time.perf_counter() - t0
    stats["rows_per_second"] = stats["rows"] / stats["seconds"] if stats["seconds"] else None
    store = open_store(out)
    store.harvest_run = stats
    return store


def plan_harvest(model, dataset, hooks=("resid_post",), layers="all", positions="last", dtype=None,
                 batch_size=None) -> HarvestPlan:
    """Tokenise, choose positions, build the index and the plan of a harvest (no forward
    beyond a two-token dry run for the widths)."""
    from replab.prompts import PromptSet, load_prompts, token_ids

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
    group_source = ps.meta.get("group_source")
    manifest = {"replab_version": __version__, "model": identity.to_dict(),
                "dataset": {**dataset_meta, "source": str(ps.source),
                            **({"group_source": group_source} if group_source else {})},
                "config": config}
    starts = np.cumsum([0] + [len(c) for c in chosen])
    return HarvestPlan(token_lists, chosen, starts, names, stop, batch_size, n_batches, index, dims,
                       store_dtype, plan, manifest)


def _run_batches(model, writer, hp: HarvestPlan, first: int, progress: bool) -> None:
    token_lists = hp.token_lists
    total = sum(len(t) for t in token_lists)
    done_tokens = sum(len(t) for t in token_lists[: first * hp.batch_size])
    with progress_bar(total, "harvest", unit="tok", enabled=progress) as bar:
        bar.advance(done_tokens)
        for b in range(first, hp.n_batches):
            row_start, batch, chosen = hp.batch(b)
            writer.submit(b, row_start, batch_arrays(model, batch, chosen, hp.names, hp.stop))
            if _TEST_DELAY:  # lets the kill/resume tests interrupt a run mid-way
                time.sleep(_TEST_DELAY)
            bar.advance(sum(map(len, batch)))


def batch_arrays(model, batch: list[list[int]], chosen: list[list[int]], names, stop) -> dict[str, np.ndarray]:
    """One batch's stored rows, ``{hook: [rows, d]}`` float32: the batch is right-padded to its
    longest prompt and the chosen positions of each prompt are read at every hook. The one
    computation both engines run (so their stores are byte-identical)."""
    device = next(model.parameters()).device
    pad = model.tokenizer.pad_token_id or 0
    tokens = torch.full((len(batch), max(map(len, batch))), pad, dtype=torch.long)
    for i, ids in enumerate(batch):
        tokens[i, : len(ids)] = torch.tensor(ids)
    rows_b = torch.tensor([i for i, c in enumerate(chosen) for _ in c])
    rows_p = torch.tensor([p for c in chosen for p in c])
    return _forward(model, tokens.to(device), names, stop, rows_b, rows_p)


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

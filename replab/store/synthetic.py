"""Synthetic activation stores with a planted signal (tests and benchmarks).

:func:`write_synthetic_store` writes an ordinary store through :class:`StoreWriter`, so
everything that reads stores reads it unchanged. Its manifest's model identity is
clearly labelled ``{"name": "synthetic", "synthetic": true, ...}``; no model was run.

Each row belongs to an entity (``group``/``entity``) with a class label (``label``) and a
template. Layer ``l`` activations are::

    x = signal_l * M[class] @ Q  +  entity_scale * e[entity]  +  template_scale * t[template]  +  noise

where ``M [K, rank]`` places the class means in a ``rank``-dimensional subspace (for
``rank=2``: a regular polygon), ``Q [rank, d]`` is a random orthonormal embedding, and
``signal_l`` grows linearly from 0 at layer 0 to ``signal`` at the last layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from replab._version import __version__
from replab.errors import ReplabError
from replab.store.writer import StoreWriter


def synthetic_identity(d: int, n_layers: int, seed: int) -> dict:
    """A model identity dict that cannot be mistaken for a real model."""
    return {"name": "synthetic", "synthetic": True, "weights_sha256": f"synthetic-seed-{seed}",
            "dtype": "float32", "n_layers": n_layers, "d_model": d, "n_heads": 0,
            "n_kv_heads": 0, "prepend_bos": False, "processing": "none (planted signal)",
            "replab_version": __version__}


def class_means(K: int, rank: int, rng) -> np.ndarray:
    """``[K, rank]`` class means of norm 1: a regular polygon for rank 2, else random."""
    if rank == 2:
        ang = 2 * np.pi * np.arange(K) / K
        return np.stack([np.cos(ang), np.sin(ang)], 1)
    m = rng.normal(size=(K, rank))
    m -= m.mean(0)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def write_synthetic_store(out, n_rows: int = 600, d: int = 64, n_layers: int = 4,
                          n_classes: int = 5, rank: int = 2, signal: float = 3.0,
                          n_entities: int | None = None, n_templates: int = 3,
                          entity_scale: float = 1.0, template_scale: float = 0.5,
                          noise: float = 1.0, seed: int = 0, batch_rows: int = 1000):
    """Write a synthetic store to ``out`` and return it opened.

    Args:
        n_rows: rows (each an (entity, template) prompt); d: width; n_layers: layers
            stored as ``blocks.<l>.hook_resid_post``.
        n_classes: ``K``; rank: dimension of the class-mean subspace; signal: class-mean
            norm at the last layer (in noise standard deviations).
        n_entities: entities (default ``n_rows // n_templates``), each with one class.
        entity_scale, template_scale, noise: sizes of the nuisance components.

    Returns:
        The :class:`~replab.store.ActivationStore`.
    """
    from replab.store import open_store

    if n_classes < 2 or rank < 1 or n_rows < n_classes or d < rank:
        raise ReplabError("synthetic store needs >= 2 classes, rank >= 1, d >= rank, rows >= classes")
    rng = np.random.default_rng(seed)
    n_ent = n_entities or max(n_classes, n_rows // max(n_templates, 1))
    ent_class = np.arange(n_ent) % n_classes
    rng.shuffle(ent_class)
    ent = np.arange(n_rows) % n_ent
    tmpl = (np.arange(n_rows) // n_ent) % max(n_templates, 1)
    labels = np.array([f"class{c}" for c in ent_class[ent]])
    from replab.store.format import split_of

    groups = [f"entity{e}" for e in ent]
    index = pd.DataFrame({
        "row": np.arange(n_rows, dtype=np.int64), "example_id": np.arange(n_rows, dtype=np.int64),
        "position": np.zeros(n_rows, dtype=np.int32), "token_id": ent.astype(np.int64),
        "token": [f"tok{e}" for e in ent], "n_tokens": np.ones(n_rows, dtype=np.int32),
        "is_last": np.ones(n_rows, dtype=bool), "split": [split_of(g) for g in groups],
        "prompt": [f"template{t} entity{e}" for t, e in zip(tmpl, ent, strict=True)],
        "answer": labels, "template": [f"template{t}" for t in tmpl], "group": groups,
        "entity": groups, "label": labels,
    })
    Q = np.linalg.qr(rng.normal(size=(d, rank)))[0].T                   # [rank, d]
    M = class_means(n_classes, rank, rng) @ Q                          # [K, d]
    E = rng.normal(size=(n_ent, d)) * entity_scale
    T = rng.normal(size=(max(n_templates, 1), d)) * template_scale
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    plan = {"model": synthetic_identity(d, n_layers, seed), "synthetic": {
        "n_rows": n_rows, "d": d, "n_layers": n_layers, "n_classes": n_classes, "rank": rank,
        "signal": signal, "n_entities": n_ent, "n_templates": n_templates, "seed": seed,
        "entity_scale": entity_scale, "template_scale": template_scale, "noise": noise},
        "n_batches": int(np.ceil(n_rows / batch_rows))}
    writer = StoreWriter(Path(out), plan, index, {h: d for h in hooks}, np.float32)
    first = writer.start()
    if not writer.complete:
        for b in range(first, plan["n_batches"]):
            lo, hi = b * batch_rows, min(n_rows, (b + 1) * batch_rows)
            arrays = {}
            for layer, hook in enumerate(hooks):
                r = np.random.default_rng([seed, layer, b])
                s = signal * layer / max(n_layers - 1, 1)
                x = (s * M[ent_class[ent[lo:hi]]] + E[ent[lo:hi]] + T[tmpl[lo:hi]]
                     + noise * r.normal(size=(hi - lo, d)))
                arrays[hook] = x.astype(np.float32)
            writer.submit(b, lo, arrays)
        config = {"hooks": hooks, "layers": "all", "positions": "synthetic", "dtype": "float32",
                  "batch_size": batch_rows, "prepend_bos": False, "stop_at_layer": None}
        writer.finish({"replab_version": __version__, "model": plan["model"],
                       "dataset": {"name": "synthetic", "source": "replab.store.synthetic",
                                   "content_hash": f"synthetic-{seed}", "n_prompts": n_rows,
                                   "label_columns": ["label", "entity"]},
                       "config": config})
    return open_store(out)

"""Random-set baselines: component sets of the same size and layer profile.

A reader needs to know whether a set is special or whether any set of that shape would do
the same. :func:`random_sets` draws, with a seed, sets that keep every member's kind, part
(``.q``/``.k``/``.v``) and positions and its layer's head count:

* a head is replaced by a head of the **same layer** (the layer's drawn heads are distinct);
* an MLP, attention layer or residual stream by the same kind at a layer within ±2 of its own
  (distinct within the set);
* ``EMBED`` stays.

:func:`baseline_stats` summarises the random sets' values next to the set's own:
``random_mean``, ``random_p05``, ``random_p95`` and ``percentile`` (the fraction of random
sets whose value is at or below the set's).
"""

from __future__ import annotations

import numpy as np

from replab.circuits.components import Component
from replab.errors import ReplabError

MIN_RANDOM = 20


def random_sets(model, comps: list[Component], n: int = MIN_RANDOM, seed: int = 0,
                pool: set | None = None) -> list[list[Component]]:
    """``n`` random sets like ``comps`` (module docstring), each a list aligned with ``comps``
    (member ``i`` of a random set replaces ``comps[i]``). ``pool``: heads ``(layer, head)`` that
    may be drawn (default: every head). ReplabError when no drawn set can differ."""
    if n < 1:
        raise ReplabError(f"the number of random sets must be at least 1, not {n}")
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    by_layer: dict[int, list[int]] = {}
    for i, c in enumerate(comps):
        if c.kind == "head":
            by_layer.setdefault(c.layer, []).append(i)
    for layer, idx in by_layer.items():
        avail = [h for h in range(cfg.n_heads) if pool is None or (layer, h) in pool]
        if len(avail) < len(idx):
            raise ReplabError(f"layer {layer} has {len(avail)} heads to draw from, the set uses {len(idx)}")
    out = []
    for _ in range(n):
        new: list[Component | None] = [None] * len(comps)
        for layer, idx in by_layer.items():
            avail = [h for h in range(cfg.n_heads) if pool is None or (layer, h) in pool]
            picks = rng.choice(avail, size=len(idx), replace=False)
            for i, h in zip(idx, picks, strict=True):
                c = comps[i]
                new[i] = Component("head", layer, int(h), c.part, c.positions)
        used: dict[str, set] = {}
        for i, c in enumerate(comps):
            if c.kind == "head":
                continue
            if c.kind == "embed":
                new[i] = c
                continue
            taken = used.setdefault(c.kind, set())
            near = [lay for lay in range(max(0, c.layer - 2), min(cfg.n_layers, c.layer + 3)) if lay not in taken]
            lay = int(rng.choice(near)) if near else c.layer
            taken.add(lay)
            new[i] = Component(c.kind, lay, None, None, c.positions)
        out.append(new)
    if all(set(s) == set(comps) for s in out):
        raise ReplabError("every random set of the same size and layer profile is this set itself (it holds "
                          "every head of its layers): a random baseline cannot tell it apart")
    return out


def baseline_stats(value: float, randoms) -> dict:
    """``random_mean``, ``random_p05``, ``random_p95``, ``random_sd`` and ``percentile`` of
    ``value`` among ``randoms`` (NaNs when there are none)."""
    r = np.asarray(list(randoms), dtype=np.float64)
    if r.size == 0:
        nan = float("nan")
        return {"random_mean": nan, "random_p05": nan, "random_p95": nan, "random_sd": nan, "percentile": nan,
                "n_random": 0}
    return {"random_mean": float(r.mean()), "random_p05": float(np.quantile(r, 0.05)),
            "random_p95": float(np.quantile(r, 0.95)), "random_sd": float(r.std(ddof=1)) if r.size > 1 else 0.0,
            "percentile": float((r <= value).mean()), "n_random": int(r.size)}

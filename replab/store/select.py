"""Selecting from a store: a store from a path, a site's layers, rows by a query.

Shared by every reader of stores (probes, geometry, directions, SAE decomposition).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from replab.errors import ReplabError


def site_layers(store, site: str = "resid_post") -> dict[int, str]:
    """``{layer: full hook name}`` for one site alias (``resid_post``) or one full hook name."""
    from replab.hooks import parse_hook_name

    if site in store.hooks:
        alias, layer = parse_hook_name(site)
        return {layer if layer is not None else 0: site}
    out = {}
    for hook in store.hooks:
        alias, layer = parse_hook_name(hook)
        if alias == site and layer is not None:
            out[layer] = hook
    if not out:
        raise ReplabError(f"no {site!r} hooks in this store; it has: {', '.join(store.hooks)}")
    return dict(sorted(out.items()))


def pick_layers(store, site: str, layers="all") -> dict[int, str]:
    """Requested layers (``"all"``, ``"0-9"``, ``"3,7"``, ``[1, 2]``) that the store holds."""
    from replab.hooks import parse_layers

    have = site_layers(store, site)
    if site in store.hooks:
        return have
    n_layers = int(store.model.get("n_layers") or (max(have) + 1))
    if layers is None or (isinstance(layers, str) and layers.strip().lower() == "all"):
        return have
    want = parse_layers(layers, n_layers)
    missing = [layer for layer in want if layer not in have]
    if missing:
        raise ReplabError(f"layer {missing[0]} of {site} is not in this store; "
                          f"stored layers: {sorted(have)}")
    return {layer: have[layer] for layer in want}


def hook_for_layer(store, site: str, layer: int) -> str:
    """The full hook name of ``site`` at ``layer`` in ``store``."""
    return pick_layers(store, site, [layer])[layer] if site not in store.hooks else site


def as_store(store):
    """An :class:`~replab.store.ActivationStore` from a store or a directory path."""
    from replab.store import ActivationStore, open_store

    return store if isinstance(store, ActivationStore) else open_store(store)


def where_mask(index: pd.DataFrame, where: str | None) -> np.ndarray:
    """Boolean mask of the rows a pandas query keeps (all rows when ``where`` is empty)."""
    if not where:
        return np.ones(len(index), dtype=bool)
    try:
        return np.asarray(index.eval(where), dtype=bool)
    except Exception as exc:  # noqa: BLE001 - any query error is the user's
        raise ReplabError(f"bad --where query {where!r}: {exc}") from None

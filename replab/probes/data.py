"""Reading probe inputs from an activation store: hooks per layer, layer specs."""

from __future__ import annotations

from replab.errors import ReplabError


def site_layers(store, site: str = "resid_post") -> dict[int, str]:
    """``{layer: full hook name}`` for one site alias (``resid_post``) or one full hook name."""
    from replab.harvest.hooks import parse_hook_name

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
    from replab.harvest.hooks import parse_layers

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


class limit_threads:
    """Context manager: torch intra-op threads = ``n`` and numpy's BLAS to one thread.

    Interleaving small numpy BLAS calls with torch matmuls makes both thread pools
    spin against each other; on a busy 2-core machine that was 20x slower.
    """

    def __init__(self, n: int = 1):
        self.n = n

    def __enter__(self):
        import torch
        from threadpoolctl import threadpool_limits

        self._old = torch.get_num_threads()
        torch.set_num_threads(max(1, int(self.n)))
        self._pool = threadpool_limits(limits=1)
        return self

    def __exit__(self, *exc):
        import torch

        self._pool.restore_original_limits()
        torch.set_num_threads(self._old)
        return False

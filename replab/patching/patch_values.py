"""The values a patch writes, and the hook functions that write them.

* :func:`source_tensor` / :func:`source_values`: an intervention's source activation (the clean
  or corrupt run, a seeded resample of it, a mean, a custom tensor), :func:`noise_like` its
  noise, :func:`slice_positions` the positions from a cached prefix on;
* :func:`hook_fn`: the hook of one hook point in a batched forward, applying every variant's
  patches to its own rows (copying patches that share a source tensor become one masked write;
  ``vectorise=False`` applies them one by one, the bit-identical reference path).

Split out of :mod:`replab.patching.engine`, which plans and runs the batched forwards.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from replab.errors import ReplabError
from replab.patching.interventions import Intervention, apply, select


def derangement(n: int, seed: int) -> torch.Tensor:
    if n < 2:
        raise ReplabError("resample ablation needs at least 2 prompts")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        if bool((perm != torch.arange(n)).all()):
            return perm


def source_tensor(iv: Intervention, forwards: dict, base: str) -> torch.Tensor | None:
    """The source activation ``[N, ...]`` (absolute positions) of ``iv``, or None."""
    if iv.source.startswith("custom:"):
        name = iv.source.split(":", 1)[1]
        if name not in forwards.get("custom", {}):
            raise ReplabError(f"intervention source {iv.source!r} was not passed in sources=")
        value = forwards["custom"][name]
        if isinstance(value, dict):
            if iv.hook not in value:
                raise ReplabError(f"intervention source {iv.source!r} has no values for {iv.hook}")
            value = value[iv.hook]
        return value
    if iv.source in ("clean", "corrupt"):
        return forwards[iv.source][iv.hook]
    b = forwards[base][iv.hook]
    if iv.source == "zero":
        return torch.zeros_like(b)
    if iv.source == "mean":
        return b.mean(0, keepdim=True).expand_as(b)
    if iv.source == "resample":
        return b[derangement(b.shape[0], iv.seed)]
    return None  # noise / steer modify the base activation itself


def source_values(iv: Intervention, forwards: dict, base: str, sources: dict | None = None) -> torch.Tensor | None:
    """What ``iv`` writes, ``[N, ...]`` over every position (None for noise/steer): the same
    tensor the engine uses (for callers that need the values themselves, e.g. gradients)."""
    return source_tensor(iv, {**forwards, "custom": dict(sources or {})}, base)


def noise_like(iv: Intervention, like: torch.Tensor) -> torch.Tensor | None:
    if iv.source != "noise":
        return None
    g = torch.Generator().manual_seed(iv.seed)
    return torch.randn(like.shape, generator=g, dtype=like.dtype).to(like.device)


def slice_positions(t: torch.Tensor, iv: Intervention, p: int) -> torch.Tensor:
    if t is None or p == 0:
        return t
    return t[:, :, p:] if iv.kind == "pattern" else t[:, p:]


def _copies(iv: Intervention) -> bool:
    """True when ``iv`` only copies source values (what the vectorised write handles)."""
    return iv.source not in ("noise", "steer") and iv.direction is None


def _masked_write(act: torch.Tensor, patches: list, p: int) -> torch.Tensor:
    """Write the entries selected by ``patches`` (rows ``r0:r1`` of one variant each, all with
    the same source tensor ``src [N, ...]``) from ``src`` in one ``torch.where``."""
    neurons = any(iv.neurons is not None for _, _, iv, _, _ in patches)
    mask = torch.zeros(act.shape if neurons else (*act.shape[:-1], 1), dtype=torch.bool)
    for r0, r1, iv, _, _ in patches:
        idx = select(act[r0:r1], iv, p)
        if idx is not None:
            mask[r0:r1][idx] = True
    src = patches[0][3]
    n = src.shape[0]
    full = src.to(act.dtype).repeat(act.shape[0] // n, *([1] * (src.dim() - 1))) if n != act.shape[0] \
        else src.to(act.dtype)
    return torch.where(mask, full, act)


def hook_fn(patches: list[tuple[int, int, Intervention, torch.Tensor, torch.Tensor]], p: int,
             records: list[tuple[int, int, dict]] = (), vectorise: bool = True):
    """The hook of one hook point: apply ``patches`` ``(r0, r1, iv, src, noise)``, then copy the
    rows of recording variants into ``records`` ``(r0, r1, store)``."""
    def fn(act, hook):
        act = act.clone()
        if vectorise:
            act = _apply_vectorised(act, patches, p)
        else:
            for r0, r1, iv, src, noise in patches:
                apply(act[r0:r1], src, iv, p, noise)
        for r0, r1, store in records:
            store[hook.name] = act[r0:r1].clone()
        return act
    return fn


def _apply_vectorised(act: torch.Tensor, patches: list, p: int) -> torch.Tensor:
    """Apply ``patches`` in stages: stage k holds the k-th patch of every variant (rows of
    different variants never overlap, so a stage's order does not matter, while a variant's
    own patches keep their order). In a stage, the copying patches that share a source tensor
    are one masked write; the others (noise, steer, directions) are applied one by one."""
    by_rows: dict[int, list] = defaultdict(list)
    for patch in patches:
        by_rows[patch[0]].append(patch)
    depth = max((len(v) for v in by_rows.values()), default=0)
    for k in range(depth):
        stage = [v[k] for v in by_rows.values() if len(v) > k]
        groups: dict[int, list] = defaultdict(list)
        for patch in stage:
            if _copies(patch[2]) and patch[3] is not None:
                groups[id(patch[3])].append(patch)
            else:
                r0, r1, iv, src, noise = patch
                apply(act[r0:r1], src, iv, p, noise)
        for group in groups.values():
            if len(group) == 1:
                r0, r1, iv, src, noise = group[0]
                apply(act[r0:r1], src, iv, p, noise)
            else:
                act = _masked_write(act, group, p)
    return act

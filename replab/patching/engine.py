"""The batched patching engine: many patched runs in few forwards, nothing recomputed.

A *variant* is one patched run of every prompt of a task: a tuple of
:class:`~replab.patching.interventions.Intervention` applied on top of a *base* run (the
corrupt run for denoising, the clean run for noising). :func:`run_variants` returns each
variant's final residual at the last position, from which :mod:`replab.patching.metrics`
reads logits. Three techniques make it fast and exact:

1. **Start at the patched layer.** A variant whose first intervention is at layer ``l``
   enters the network at ``blocks.l.hook_resid_pre`` with the base run's cached residual:
   the layers before ``l`` are unchanged, so they are never recomputed.
2. **Skip the unchanged prefix.** Causal attention means positions before the first patched
   position ``p`` keep the base run's values at every layer. Such variants run only
   positions ``p..T-1``, reading the base run's cached keys and values for the prefix (a
   frozen TransformerLens KV-cache entry per block; rotary offsets and the causal mask are
   TransformerLens's own). Used for rotary / learned-absolute-position models without
   QK-norm or QKV clipping, where the cached ``hook_k``/``hook_v`` are exactly what the
   attention reads; otherwise ``p`` is 0.
3. **Pack variants into the batch, pipelined over layers.** Variants that share ``p`` run
   together: at block ``k`` the batch holds every variant that entered at a layer ≤ ``k``
   (prompts × variants rows), and the interventions at block ``k`` are applied to their own
   rows by hooks on TransformerLens's hook points. One call of each block per group.

Only the final position is read out, and only the candidate columns of ``W_U`` unless a
full-vocabulary metric is asked for (see :mod:`replab.patching.metrics`).

Interventions at one hook are applied **vectorised**: those of every variant in the batch
that copy a source (clean, corrupt, zero, mean, resample, custom; no direction) are merged
into one boolean mask per source and written with one ``torch.where``, in the order each
variant lists them (the k-th intervention of every variant in one pass, so a later one still
overwrites an earlier one). A variant that freezes 269 heads therefore costs one masked write
per hook, not 269 index writes; the values are bit-identical to writing them one by one
(``vectorise=False`` keeps that reference path).

A variant can also **record** activations (``Variant(record=("blocks.9.attn.hook_q",))``):
the value at that hook in the variant's own patched forward, after its interventions there,
``[N, T, ...]`` like the clean run's (positions the engine did not compute are the base run's,
which they equal). Path patching records a receiver's input in one run and replays it, as a
``custom:`` source, in a second.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from replab.errors import ReplabError
from replab.patching.edge_patch import (
    EdgeGroup,
    EdgePatch,
    edge_mode,
    edge_slots,
    has_edges,
    sender_hook,
    validate_edge,
)
from replab.patching.interventions import Intervention, validate
from replab.patching.patch_values import hook_fn, noise_like, slice_positions, source_tensor

RUN_SOURCES = ("clean", "corrupt")
_PREFIX_UNSAFE_ARCH = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


@dataclass(frozen=True)
class Variant:
    """A patched run: interventions applied together. ``start`` forces the entry layer
    (used by the empty-patch sanity check, which has no interventions).

    ``name``, ``group`` and ``info`` are the caller's labels (the engine ignores them):
    :func:`replab.patching.plan.run_plan` copies them into every row of its result table,
    e.g. ``Variant((iv,), name="L5H3", group="head", info={"layer": 5, "head": 3})``.
    """

    interventions: tuple[Intervention, ...] = ()
    start: int | None = None
    name: str = ""
    group: str = ""
    info: dict = field(default_factory=dict, compare=False, hash=False)
    record: tuple[str, ...] = ()     # block hook names whose patched values to return

    def start_layer(self, n_layers: int) -> int:
        layers = [iv.layer for iv in self.interventions]
        if self.start is not None:
            layers.append(self.start)
        return min(layers) if layers else n_layers

    def first_position(self, shared: int = 0) -> int:
        """First position whose value can change. Clean/corrupt-sourced interventions are
        no-ops on the ``shared`` leading positions where the two prompts have the same tokens
        (causal attention: their activations are identical at every layer)."""
        return min((max(iv.first_position(), shared) if iv.source in RUN_SOURCES
                    else iv.first_position() for iv in self.interventions), default=0)

    def is_noop(self, n_tokens: int, shared: int) -> bool:
        """True when every intervention copies clean/corrupt values into the shared prefix,
        where both runs agree: the result is the base run's, with nothing to compute."""
        return bool(self.interventions) and all(
            iv.source in RUN_SOURCES and iv.last_position(n_tokens) < shared
            for iv in self.interventions)


def prefix_ok(model) -> bool:
    """Whether the cached-prefix shortcut is exact for this architecture (module docstring)."""
    cfg = model.cfg
    return (cfg.positional_embedding_type in ("rotary", "standard")
            and not getattr(cfg, "use_qk_norm", False) and getattr(cfg, "clip_qkv", None) is None
            and cfg.original_architecture not in _PREFIX_UNSAFE_ARCH
            and (getattr(cfg, "attention_dir", "causal") == "causal")
            and not getattr(cfg, "use_split_qkv_input", False) and not getattr(cfg, "use_attn_in", False))


class ForwardCache:
    """Activations of one run (clean or corrupt) at the hooks a set of variants needs."""

    def __init__(self, model, tokens: torch.Tensor, names: set[str]):
        names = set(names) | {f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"}
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names,
                                        return_type=None)
        self.acts = {k: v for k, v in cache.items()}
        self.final = self.acts[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, -1]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.acts[name]


def shared_prefix(clean: torch.Tensor, corrupt: torch.Tensor) -> int:
    """Number of leading positions where every clean prompt equals its corrupt prompt."""
    diff = (clean != corrupt).any(0).nonzero()
    return int(diff[0]) if len(diff) else int(clean.shape[1])


def needed_hooks(model, variants: list[Variant], base: str, use_prefix: bool) -> dict[str, set[str]]:
    """Hook names each run must cache: the base run's entry residuals and prefix K/V, and
    every intervention's source activation."""
    need: dict[str, set[str]] = {"clean": set(), "corrupt": set()}
    n_layers = model.cfg.n_layers
    for v in variants:
        s = v.start_layer(n_layers)
        if s < n_layers:
            need[base].add(f"blocks.{s}.hook_resid_pre")
        for iv in v.interventions:
            if isinstance(iv, EdgePatch):      # sender outputs in the source run and the base run
                hooks = {sender_hook(s) for s in iv.senders}
                need[iv.source] |= hooks
                need[base] |= hooks
                continue
            need[iv.source if iv.source in ("clean", "corrupt") else base].add(iv.hook)
        for name in v.record:
            need[base].add(name)         # the positions the engine does not compute, and no-ops
    if use_prefix:
        lo = min(v.start_layer(n_layers) for v in variants)
        for k in range(lo, n_layers):
            need[base] |= {f"blocks.{k}.attn.hook_k", f"blocks.{k}.attn.hook_v"}
    return need


def cache_forwards(model, clean: torch.Tensor, corrupt: torch.Tensor, need: dict[str, set[str]],
                   split_inputs: bool = False) -> dict:
    """The clean and corrupt :class:`ForwardCache`; ``split_inputs`` runs them in
    :func:`~replab.patching.edge_patch.edge_mode` (as the engine runs edge patches)."""
    with edge_mode(model, split_inputs):
        return {"clean": ForwardCache(model, clean, need["clean"]),
                "corrupt": ForwardCache(model, corrupt, need["corrupt"])}


def _kv_entry(forwards, base: str, layer: int, p: int, n_rep: int):
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    k = forwards[base][f"blocks.{layer}.attn.hook_k"][:, :p]
    v = forwards[base][f"blocks.{layer}.attn.hook_v"][:, :p]
    return TransformerLensKeyValueCacheEntry(k.repeat(n_rep, 1, 1, 1), v.repeat(n_rep, 1, 1, 1),
                                             frozen=True)


@contextmanager
def _block_hooks(model, fns: dict):
    """Forward hooks on just the named hook points, removed on exit. (TransformerLens's
    ``model.hooks`` walks every hook point of the model on exit: about 1 s per head sweep.)"""
    handles = []
    try:
        for name, fn in fns.items():
            hp = model.hook_dict[name]
            handles.append(hp.register_forward_hook(
                lambda mod, args, out, fn=fn, hp=hp: fn(out, hook=hp)))
        yield
    finally:
        for h in handles:
            h.remove()


def _run_group(model, group: list[tuple[int, Variant]], forwards: dict, base: str, p: int,
               n_prompts: int, recorded: dict | None = None, vectorise: bool = True) -> dict[int, torch.Tensor]:
    """Pipelined forward of variants sharing prefix length ``p``; {variant index: final [N, d]}.
    Recordings go to ``recorded[vi][hook]`` (positions ``p..``; the caller completes them)."""
    n_layers = model.cfg.n_layers
    by_start = defaultdict(list)
    for vi, v in group:
        by_start[v.start_layer(n_layers)].append((vi, v))
    rows: dict[int, int] = {}
    x = None
    first = min(by_start)
    sources: dict[tuple, torch.Tensor] = {}      # one tensor per (source, hook, seed): shared masks

    def source_of(iv):
        key = (iv.source, iv.hook, iv.seed)
        if key not in sources:
            sources[key] = slice_positions(source_tensor(iv, forwards, base), iv, p)
        return sources[key]

    edges = EdgeGroup(model, group, forwards, base) if has_edges([v for _, v in group]) else None
    for k in range(first, n_layers):
        entering = by_start.get(k, [])
        if entering:
            new = forwards[base][f"blocks.{k}.hook_resid_pre"][:, p:].repeat(len(entering), 1, 1)
            start_row = 0 if x is None else x.shape[0]
            for j, (vi, _) in enumerate(entering):
                rows[vi] = start_row + j * n_prompts
            x = new if x is None else torch.cat([x, new])
        if x is None:
            continue
        hooks = defaultdict(list)
        records = defaultdict(list)
        for vi, v in group:
            if vi not in rows:
                continue
            for iv in v.interventions:
                if iv.layer == k and not isinstance(iv, EdgePatch):
                    like = forwards[base][iv.hook] if iv.source == "noise" else None
                    hooks[iv.hook].append((rows[vi], rows[vi] + n_prompts, iv, source_of(iv),
                                           slice_positions(noise_like(iv, like) if like is not None else None, iv, p)))
            for name in v.record:
                if name.startswith(f"blocks.{k}."):
                    records[name].append((rows[vi], rows[vi] + n_prompts, recorded.setdefault(vi, {})))
        n_rep = x.shape[0] // n_prompts
        entry = _kv_entry(forwards, base, k, p, n_rep) if p > 0 else None
        fns = {name: hook_fn(hooks.get(name, []), p, records.get(name, []), vectorise)
               for name in set(hooks) | set(records)}
        if edges is not None:
            fns = edges.block_fns(k, rows, n_prompts, fns)
        with _block_hooks(model, fns):
            x = model.blocks[k](x, past_kv_cache_entry=entry)
    out = {}
    for vi, _ in group:
        if vi in rows:
            out[vi] = x[rows[vi]:rows[vi] + n_prompts, -1]
    return out


def _complete_record(value: torch.Tensor | None, base_act: torch.Tensor, p: int, name: str) -> torch.Tensor:
    """A recorded activation over every position: the base run's values before ``p`` (equal by
    causality) and the recorded ones from ``p`` on; the base value when nothing was recorded."""
    if value is None:
        return base_act.clone()
    if p == 0:
        return value
    if name.endswith("hook_pattern") or name.endswith("hook_attn_scores"):
        raise ReplabError(f"recording {name} needs every position (use_prefix=False)")
    return torch.cat([base_act[:, :p], value], dim=1)


def check_records(model, variants: list[Variant]) -> None:
    """ReplabError when a variant records something other than a block hook of ``model``."""
    for v in variants:
        for name in v.record:
            if name not in model.hook_dict or not name.startswith("blocks."):
                raise ReplabError(f"cannot record {name!r}: the engine records block hooks such as "
                                  "blocks.9.attn.hook_q")


def _edge_chunks(members, chunk: int, per_slot: int, budget: int) -> list[list]:
    """Consecutive chunks of at most ``chunk`` variants whose edge stacks (``slots × per_slot``
    floats each) stay within ``budget`` floats (a chunk always holds at least one variant)."""
    parts, cur, used = [], [], 0
    for m in members:
        cost = edge_slots(m[1].interventions) * per_slot
        if cur and (len(cur) >= chunk or used + cost > budget):
            parts.append(cur)
            cur, used = [], 0
        cur.append(m)
        used += cost
    if cur:
        parts.append(cur)
    return parts


def variant_chunks(model, clean: torch.Tensor, corrupt: torch.Tensor, variants: list[Variant],
                   max_tokens: int = 65536, use_prefix: bool = True, split: bool = False,
                   edge_memory: int = 2 ** 26) -> tuple[list[int], list[tuple[int, list]]]:
    """How :func:`run_variants` splits ``variants`` into batched block calls.

    Returns ``(noops, chunks)``: the indices of variants with nothing to compute (their final
    residual is the base run's), and the chunks in the order they run, each
    ``(p, [(index, variant), ...])``: variants whose first changed position is ``p``, sorted by
    entry layer, at most ``max_tokens // (N * (T - p))`` of them (``split``: edge plans, whose
    chunks also keep their edge stacks within ``edge_memory`` floats). A chunk's result depends
    only on its members, so running the same chunks elsewhere (``replab.patching.executors``)
    gives the same numbers.
    """
    n, t = clean.shape
    n_layers = model.cfg.n_layers
    shared = shared_prefix(clean, corrupt) if use_prefix else 0
    noops: list[int] = []
    groups = defaultdict(list)
    for vi, v in enumerate(variants):
        if v.start_layer(n_layers) >= n_layers or v.is_noop(t, shared):
            noops.append(vi)
            continue
        groups[min(v.first_position(shared), t - 1) if use_prefix else 0].append((vi, v))
    chunks = []
    for p, members in sorted(groups.items()):
        members.sort(key=lambda m: m[1].start_layer(n_layers))
        per_variant = n * (t - p)
        size = max(1, max_tokens // per_variant)
        parts = ([members[s:s + size] for s in range(0, len(members), size)] if not split
                 else _edge_chunks(members, size, n * t * model.cfg.d_model, edge_memory))
        chunks += [(p, part) for part in parts]
    return noops, chunks


@torch.inference_mode()
def run_chunk(model, part: list[tuple[int, Variant]], forwards: dict, base: str, p: int,
              n_prompts: int, raw: dict | None = None, vectorise: bool = True) -> dict[int, torch.Tensor]:
    """One chunk of :func:`variant_chunks`: ``{index: final residual [N, d_model]}``.
    ``forwards`` holds the clean/corrupt caches and ``"custom"`` sources; recordings of the
    chunk's variants go to ``raw[index][hook]`` (positions ``p..``: :func:`complete_records`
    completes them). A plan with edge patches runs its chunks in
    :func:`~replab.patching.edge_patch.edge_mode` (the caller enters it)."""
    return _run_group(model, part, forwards, base, p, n_prompts, raw if raw is not None else {}, vectorise)


def complete_records(variants: list[Variant], raw: dict, first_pos: dict, forwards: dict, base: str,
                     recorded: dict) -> None:
    """Fill ``recorded[vi] = {hook: [N, T, ...]}`` for every recording variant from the chunks'
    raw recordings (``raw[vi][hook]``, positions ``first_pos[vi]..``) and the base run."""
    for vi, v in enumerate(variants):
        if v.record:
            got = raw.get(vi, {})
            recorded[vi] = {name: _complete_record(got.get(name), forwards[base][name], first_pos.get(vi, 0), name)
                            for name in v.record}


@torch.inference_mode()
def run_variants(model, clean: torch.Tensor, corrupt: torch.Tensor, variants: list[Variant],
                 base: str = "corrupt", forwards: dict | None = None, max_tokens: int = 65536,
                 use_prefix: bool | None = None, progress=None,
                 sources: dict[str, torch.Tensor] | None = None, recorded: dict | None = None,
                 vectorise: bool = True, edge_memory: int = 2 ** 26) -> tuple[torch.Tensor, dict]:
    """Final-position residuals of every variant: ``([V, N, d_model], forwards)``.

    Args:
        clean, corrupt: token ids ``[N, T]`` (same shape).
        variants: the patched runs (each applied to all N prompts).
        base: ``"corrupt"`` (denoising: patch clean into corrupt) or ``"clean"`` (noising).
        forwards: cached :class:`ForwardCache` per run (made when None; pass them to reuse).
        max_tokens: bound on rows × positions in one block call (memory); groups are split.
        use_prefix: force the cached-prefix shortcut on/off (default: :func:`prefix_ok`).
        progress: optional callable ``advance(n_variants)``.
        sources: values for ``custom:NAME`` interventions, ``{NAME: [N, ...]}`` shaped like the
            activation at the intervention's hook, or ``{NAME: {hook name: [N, ...]}}``.
        recorded: a dict to fill with every recording variant's activations,
            ``{variant index: {hook name: [N, T, ...]}}`` (see ``Variant.record``).
        vectorise: merge copying interventions into masked writes (module docstring); False
            applies them one by one (the reference path; results are bit-identical).
        edge_memory: bound on the floats of the edge-patch stacks of one group
            (:mod:`replab.patching.edge_patch`); groups are split.

    Edge patches (:class:`~replab.patching.edge_patch.EdgePatch`) run the whole plan in
    :func:`~replab.patching.edge_patch.edge_mode` and without the cached-prefix shortcut.
    """
    split = check_plan(model, clean, variants, base)
    with edge_mode(model, split):
        forwards, noops, chunks = plan_chunks(model, clean, corrupt, variants, base, forwards, max_tokens,
                                              use_prefix, split, edge_memory, sources)
        return _run_variants(model, clean, variants, base, forwards, noops, chunks, progress, recorded, vectorise)


def check_plan(model, clean: torch.Tensor, variants: list[Variant], base: str) -> bool:
    """ReplabError for a bad ``base``, intervention or recorded hook; True when the plan holds
    edge patches (it then runs in :func:`~replab.patching.edge_patch.edge_mode`)."""
    if base not in ("clean", "corrupt"):
        raise ReplabError(f"base must be 'clean' or 'corrupt', not {base!r}")
    t = clean.shape[1]
    for v in variants:
        for iv in v.interventions:
            (validate_edge if isinstance(iv, EdgePatch) else validate)(model, iv, t)
    check_records(model, variants)
    return has_edges(variants)


def plan_chunks(model, clean, corrupt, variants, base, forwards, max_tokens, use_prefix, split, edge_memory,
                sources) -> tuple[dict, list[int], list]:
    """``(forwards with the custom sources, no-op variant indices, chunks)`` of a checked plan
    (:func:`check_plan`; inside ``edge_mode(model, split)``): the runs' caches (made when
    ``forwards`` is None) and the variants grouped by the position they start at. Shared by the
    local loop and :class:`~replab.patching.executors.RayEngine`."""
    use_prefix = False if split else use_prefix
    use_prefix = prefix_ok(model) if use_prefix is None else (use_prefix and prefix_ok(model))
    if forwards is None:
        with torch.inference_mode():
            forwards = cache_forwards(model, clean, corrupt, needed_hooks(model, variants, base, use_prefix))
    noops, chunks = variant_chunks(model, clean, corrupt, variants, max_tokens, use_prefix, split, edge_memory)
    return {**forwards, "custom": dict(sources or {})}, noops, chunks


def _run_variants(model, clean, variants, base, forwards, noops, chunks, progress, recorded, vectorise):
    n = clean.shape[0]
    finals: dict[int, torch.Tensor] = {vi: forwards[base].final for vi in noops}
    if progress is not None and finals:
        progress(len(finals))          # no-op variants: done without computing anything
    raw: dict[int, dict] = {}
    first_pos: dict[int, int] = {}
    for p, part in chunks:
        finals.update(_run_group(model, part, forwards, base, p, n, raw, vectorise))
        first_pos.update({vi: p for vi, _ in part})
        if progress is not None:
            progress(len(part))
    if recorded is not None:
        complete_records(variants, raw, first_pos, forwards, base, recorded)
    if not variants:
        return torch.empty(0, n, model.cfg.d_model), forwards
    return torch.stack([finals[i] for i in range(len(variants))]), forwards

"""Edge patches: replace what chosen upstream components contribute to one component's input.

The residual stream of a pre-norm transformer is a sum of component outputs: the input of any
block is ``EMBED + Σ head outputs + Σ MLP outputs`` (plus constant biases) of everything
upstream. An **edge** is one term of that sum as read by one downstream input: a *sender*
(the embedding, an attention head's output ``z_h W_O[h]``, an MLP's output) into a
*receiver* (a query head's query input, a KV head's key or value input, an MLP's input, or the
logits, i.e. the final residual). An :class:`EdgePatch` says: in this receiver's input, replace
the contribution of these senders by their value in the ``source`` run::

    input_receiver  +=  Σ_{u in senders} (source_u − live_u)

where ``live_u`` is the sender's output in the patched run itself. Everything else (the other
inputs of the same layer, the residual stream that other components read) is untouched, so a
variant made of edge patches is exactly an edge-level circuit intervention: patching the
complement of a circuit's edges from the corrupt run into the clean run gives the circuit's
faithfulness (:mod:`replab.circuits.discover`).

Separate inputs per head need TransformerLens's split inputs: :func:`edge_mode` turns on
``cfg.use_split_qkv_input`` (``blocks.L.hook_q_input`` ``[B, T, n_heads, d]``,
``hook_k_input``/``hook_v_input`` ``[B, T, n_kv_heads, d]``: one per **KV head** under
grouped-query attention, read by every query head of its group) and ``cfg.use_hook_mlp_in``
(``blocks.L.hook_mlp_in``) for the duration of a forward and restores them afterwards. The
logits receiver is ``blocks.{n_layers-1}.hook_resid_post`` (what ``ln_final`` reads).

Senders and receivers are plain tuples ``(kind, layer, head)``: senders ``("embed", 0, None)``
(``blocks.0.hook_resid_pre``: token + positional embedding), ``("head", l, h)`` (computed from
``blocks.l.attn.hook_z`` and ``W_O[h]``, bias excluded: it is a constant) and ``("mlp", l, None)``
(``blocks.l.hook_mlp_out``). The node names of :mod:`replab.circuits.graph` map onto them.

The engine (:mod:`replab.patching.engine`) runs edge patches like any other intervention, in
batched variants: :class:`EdgeGroup` keeps, per variant, a stack ``D [N, T, S, d]`` of
``source_u − live_u`` for the variant's senders. A sender that no patched input of the variant
can reach keeps its base-run value, so its entry is precomputed from the cached runs; the others
are captured while the variant runs (``hook_z`` / ``hook_mlp_out``, after any other intervention
at that hook), and every receiver adds ``mask @ D`` to its input.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from replab.errors import ReplabError

SENDER_KINDS = ("embed", "head", "mlp")
RECEIVER_KINDS = ("q", "k", "v", "mlp", "logits")
EDGE_SOURCES = ("clean", "corrupt")
_RECEIVER_HOOK = {"q": "blocks.{L}.hook_q_input", "k": "blocks.{L}.hook_k_input",
                  "v": "blocks.{L}.hook_v_input", "mlp": "blocks.{L}.hook_mlp_in",
                  "logits": "blocks.{L}.hook_resid_post"}
_UNSUPPORTED = ("parallel_attn_mlp", "attn_only", "use_normalization_before_and_after", "use_attn_in",
                "use_local_attn", "use_logn_attn")


def sender_order(sender) -> int:
    """Topological rank of a sender: embed −1, head at layer l 4l+1, MLP at l 4l+3."""
    kind, layer, _ = sender
    return -1 if kind == "embed" else 4 * int(layer) + (1 if kind == "head" else 3)


def receiver_order(kind: str, layer: int) -> int:
    """Topological rank of a receiver: q/k/v inputs at layer L 4L, the MLP input 4L+2, the logits
    (applied at the last block's ``hook_resid_post``) 4L+4. A sender feeds a receiver iff its
    rank is lower."""
    return 4 * int(layer) + {"q": 0, "k": 0, "v": 0, "mlp": 2, "logits": 4}[kind]


def sender_hook(sender) -> str:
    """The hook whose activation gives ``sender``'s output."""
    kind, layer, _ = sender
    if kind == "embed":
        return "blocks.0.hook_resid_pre"
    return f"blocks.{layer}.attn.hook_z" if kind == "head" else f"blocks.{layer}.hook_mlp_out"


def head_outputs(model, z: torch.Tensor, layer: int, heads=None) -> torch.Tensor:
    """Per-head outputs ``z_h W_O[h]`` (no bias): ``z`` ``[B, T, H, d_head]`` -> ``[B, T, h, d_model]``
    for ``heads`` (default all)."""
    w = model.blocks[layer].attn.W_O                       # [H, d_head, d_model]
    if heads is not None:
        z, w = z[:, :, heads], w[heads]
    return torch.einsum("bthe,hem->bthm", z, w)


def sender_value(model, act: torch.Tensor, sender) -> torch.Tensor:
    """``sender``'s output ``[B, T, d_model]`` from the activation at :func:`sender_hook`."""
    kind, layer, head = sender
    if kind == "head":
        return head_outputs(model, act, layer, [head])[:, :, 0]
    return act


@dataclass(frozen=True)
class EdgePatch:
    """Replace the contribution of ``senders`` to one receiver's input by their ``source``-run
    values (module docstring). ``layer`` is the receiver's layer (the logits receiver sits at the
    last layer); ``head`` a query head for ``q``, a KV head for ``k``/``v``, None otherwise.
    ``positions`` restricts the patch to those (query) positions (None: all)."""

    receiver: str
    layer: int
    head: int | None = None
    senders: tuple = ()
    source: str = "corrupt"
    positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.receiver not in RECEIVER_KINDS:
            raise ReplabError(f"unknown edge receiver {self.receiver!r} (known: {', '.join(RECEIVER_KINDS)})")
        if self.source not in EDGE_SOURCES:
            raise ReplabError(f"an edge patch copies sender outputs from the clean or corrupt run, not "
                              f"{self.source!r}")
        needs_head = self.receiver in ("q", "k", "v")
        if needs_head != (self.head is not None):
            raise ReplabError(f"edge receiver {self.receiver} {'needs' if needs_head else 'takes no'} head")
        senders = []
        for s in self.senders:
            kind, layer, head = (tuple(s) + (None,))[:3] if len(s) == 2 else tuple(s)
            if kind not in SENDER_KINDS:
                raise ReplabError(f"unknown edge sender kind {kind!r} (known: {', '.join(SENDER_KINDS)})")
            if (kind == "head") != (head is not None):
                raise ReplabError(f"edge sender {kind} {'needs' if kind == 'head' else 'takes no'} head")
            senders.append((str(kind), int(layer), None if head is None else int(head)))
        senders = sorted(set(senders), key=lambda s: (sender_order(s), s[2] or 0))
        object.__setattr__(self, "senders", tuple(senders))
        object.__setattr__(self, "layer", int(self.layer))
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))

    kind = "edge"

    @property
    def hook(self) -> str:
        """The receiver's hook name."""
        return _RECEIVER_HOOK[self.receiver].format(L=self.layer)

    @property
    def order(self) -> int:
        return receiver_order(self.receiver, self.layer)

    def first_position(self) -> int:
        return 0 if self.positions is None else min(self.positions)

    def last_position(self, n_tokens: int) -> int:
        return n_tokens - 1 if self.positions is None else max(self.positions)

    def to_dict(self) -> dict:
        return {"receiver": self.receiver, "layer": self.layer, "head": self.head,
                "senders": [list(s) for s in self.senders], "source": self.source,
                "positions": list(self.positions) if self.positions is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> EdgePatch:
        d = dict(d)
        d["senders"] = tuple(tuple(s) for s in d.get("senders", ()))
        if d.get("positions") is not None:
            d["positions"] = tuple(d["positions"])
        return cls(**d)


def check_edge_model(model) -> None:
    """ReplabError unless the model's residual stream is a plain sum of its components' outputs
    (sequential pre-norm blocks), which the edge graph assumes."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = model.cfg
    bad = [flag for flag in _UNSUPPORTED if getattr(cfg, flag, False)]
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        bad.append(f"post-norm ({cfg.original_architecture})")
    if cfg.positional_embedding_type not in ("rotary", "standard"):
        bad.append(f"positional_embedding_type={cfg.positional_embedding_type}")
    if bad:
        raise ReplabError("edge-level patching needs a sequential pre-norm model whose residual stream is "
                          f"a sum of head and MLP outputs; this model has {', '.join(bad)}")


def validate_edge(model, ep: EdgePatch, n_tokens: int) -> None:
    """ReplabError if ``ep`` does not fit ``model`` (layers, heads, senders upstream, positions)."""
    check_edge_model(model)
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    last = cfg.n_layers - 1
    if ep.receiver == "logits" and ep.layer != last:
        raise ReplabError(f"the logits receiver sits at the last layer ({last}), not {ep.layer}")
    if not 0 <= ep.layer <= last:
        raise ReplabError(f"layer {ep.layer} is out of range: this model has layers 0-{last}")
    if ep.head is not None:
        n = cfg.n_heads if ep.receiver == "q" else n_kv
        if not 0 <= ep.head < n:
            raise ReplabError(f"head {ep.head} is out of range: receiver {ep.receiver} has {n} heads")
    for s in ep.senders:
        kind, layer, head = s
        if not 0 <= layer <= last or (kind == "embed" and layer != 0):
            raise ReplabError(f"edge sender {s} has a bad layer")
        if kind == "head" and not 0 <= head < cfg.n_heads:
            raise ReplabError(f"edge sender head {head} is out of range 0-{cfg.n_heads - 1}")
        if sender_order(s) >= ep.order:
            raise ReplabError(f"edge sender {s} is not upstream of receiver {ep.receiver} at layer {ep.layer}")
    if ep.positions is not None:
        bad = [p for p in ep.positions if not 0 <= p < n_tokens]
        if bad or not ep.positions:
            raise ReplabError(f"position {bad[0] if bad else '(none)'} is out of range 0-{n_tokens - 1}")


@contextmanager
def edge_mode(model, on: bool = True):
    """Give every head its own q/k/v input hook and the MLP its input hook for the duration
    (``cfg.use_split_qkv_input``, ``cfg.use_hook_mlp_in``); restores the previous settings."""
    if not on:
        yield
        return
    cfg = model.cfg
    old = (cfg.use_split_qkv_input, cfg.use_hook_mlp_in)
    try:
        cfg.use_split_qkv_input, cfg.use_hook_mlp_in = True, True
        yield
    finally:
        cfg.use_split_qkv_input, cfg.use_hook_mlp_in = old


def has_edges(variants) -> bool:
    return any(isinstance(iv, EdgePatch) for v in variants for iv in v.interventions)


def edge_slots(interventions) -> int:
    """Number of distinct (sender, source) pairs of a variant's edge patches (memory of its
    ``D`` stack is ``N × T × slots × d_model`` floats)."""
    return len({(s, iv.source) for iv in interventions if isinstance(iv, EdgePatch) for s in iv.senders})


class _VariantEdges:
    """One variant's edge patches: its ``D`` stack, receivers and live captures."""

    def __init__(self, model, variant, values, base: str, n_layers: int):
        eps = [iv for iv in variant.interventions if isinstance(iv, EdgePatch)]
        others = [iv for iv in variant.interventions if not isinstance(iv, EdgePatch)]
        # The first point of the variant's computation that can differ from the base run.
        first = min([ep.order for ep in eps] + [4 * iv.layer for iv in others]
                    + ([4 * variant.start] if variant.start is not None else []))
        slots = sorted({(s, ep.source) for ep in eps for s in ep.senders},
                       key=lambda x: (sender_order(x[0]), x[0][2] or 0, x[1]))
        self.index = {slot: i for i, slot in enumerate(slots)}
        base_vals = [values(base, s) for s, _ in slots]
        n, t, d = base_vals[0].shape if base_vals else (0, 0, 0)
        self.D = (torch.zeros(n, t, len(slots), d, dtype=base_vals[0].dtype, device=base_vals[0].device)
                  if slots else None)
        self.capture: dict[str, list[tuple[int, int | None, torch.Tensor]]] = {}
        for i, (s, src) in enumerate(slots):
            src_val = values(src, s)
            if sender_order(s) > first:      # reachable from a patched input: read it live
                self.capture.setdefault(sender_hook(s), []).append((i, s[2], src_val))
            else:
                self.D[:, :, i] = src_val - base_vals[i]
        self.receivers: dict[str, list[tuple[int | None, tuple | None, torch.Tensor]]] = {}
        for ep in eps:
            mask = torch.zeros(len(slots), dtype=self.D.dtype if self.D is not None else torch.float32,
                               device=self.D.device if self.D is not None else None)
            for s in ep.senders:
                mask[self.index[(s, ep.source)]] = 1.0
            self.receivers.setdefault(ep.hook, []).append((ep.head, ep.positions, mask))

    def add(self, act: torch.Tensor, hook: str) -> None:
        """Add ``mask @ D`` to each receiver at ``hook`` in ``act`` (one variant's rows)."""
        entries = self.receivers.get(hook, [])
        if not entries or self.D is None:
            return
        masks = torch.stack([m for _, _, m in entries])                # [E, S]
        delta = torch.einsum("ntsd,es->nted", self.D, masks)          # [N, T, E, d]
        for e, (head, positions, _) in enumerate(entries):
            pos = slice(None) if positions is None else list(positions)
            if head is None:
                act[:, pos] += delta[:, pos, e]
            else:
                act[:, pos, head] += delta[:, pos, e]

    def read(self, model, act: torch.Tensor, hook: str, layer: int) -> None:
        """Store ``source − live`` for the senders captured at ``hook`` (one variant's rows)."""
        for i, head, src_val in self.capture.get(hook, []):
            live = head_outputs(model, act, layer, [head])[:, :, 0] if head is not None else act
            self.D[:, :, i] = src_val - live


class EdgeGroup:
    """The edge patches of a group of variants run together by the engine.

    ``values(run, sender)`` gives a sender's output ``[N, T, d]`` in a cached run; rows are the
    engine's row offsets of each variant (filled in as variants enter the pipelined forward).
    """

    def __init__(self, model, members, forwards: dict, base: str):
        self.model = model
        self._cache: dict = {}

        def values(run, sender):
            key = (run, sender)
            if key not in self._cache:
                self._cache[key] = sender_value(model, forwards[run][sender_hook(sender)], sender)
            return self._cache[key]

        n_layers = model.cfg.n_layers
        self.variants = {vi: _VariantEdges(model, v, values, base, n_layers) for vi, v in members
                         if any(isinstance(iv, EdgePatch) for iv in v.interventions)}
        self._cache.clear()

    def block_fns(self, layer: int, rows: dict[int, int], n_prompts: int, fns: dict) -> dict:
        """Hook functions for block ``layer``: ``fns`` (the engine's patch functions, name ->
        ``fn(act, hook)``) composed with the edge receivers and captures at this block."""
        names = {f"blocks.{layer}.hook_q_input", f"blocks.{layer}.hook_k_input",
                 f"blocks.{layer}.hook_v_input", f"blocks.{layer}.hook_mlp_in",
                 f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.attn.hook_z",
                 f"blocks.{layer}.hook_mlp_out"}
        out = dict(fns)
        for name in names:
            users = [(rows[vi], ve) for vi, ve in self.variants.items() if vi in rows
                     and (name in ve.receivers or name in ve.capture)]
            if not users:
                continue
            out[name] = self._fn(fns.get(name), users, name, layer, n_prompts)
        return out

    def _fn(self, inner, users, name: str, layer: int, n_prompts: int):
        model = self.model

        def fn(act, hook):
            act = inner(act, hook) if inner is not None else act
            receive = any(name in ve.receivers for _, ve in users)
            if receive and inner is None:
                act = act.clone()
            for r0, ve in users:
                if name in ve.receivers:
                    ve.add(act[r0:r0 + n_prompts], name)
                if name in ve.capture:
                    ve.read(model, act[r0:r0 + n_prompts], name, layer)
            return act
        return fn

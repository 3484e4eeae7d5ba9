"""The edge graph of a transformer: nodes, their inputs, and every edge between them.

**Senders** (node outputs), in topological order: ``EMBED`` (token + position embedding), then
per layer ``L{l}H{h}`` for each query head (its output ``z_h W_O[h]``) and ``L{l}MLP``.

**Receivers** (node inputs): per layer ``L{l}H{h}.q`` (a query head's query input),
``L{l}KV{g}.k`` and ``L{l}KV{g}.v`` (a **KV head**'s key and value inputs: under grouped-query
attention one KV head is read by every query head of its group, :func:`replab.hooks.query_heads_of`;
SmolLM2's ``L9KV1.k`` is read by L9H3, L9H4, L9H5), ``L{l}MLP`` (the MLP's input), and ``LOGITS``
(the final residual that the unembedding reads).

**Edges**: every sender into every receiver downstream of it: the q/k/v inputs of layer ``L``
read ``EMBED`` and every head and MLP of layers ``< L``; the MLP of layer ``L`` also reads the
heads of layer ``L``; ``LOGITS`` reads everything. Edge names are ``SENDER->RECEIVER``
(``L2H1->L5H3.q``). With ``H`` query heads, ``K`` KV heads and ``n`` layers the count is::

    Σ_L (H + 2K)(1 + L(H+1))  +  Σ_L (1 + L(H+1) + H)  +  (1 + n(H+1))

which :func:`edge_graph` computes by enumeration (SmolLM2-135M: 70,651 edges; the tiny test
model, 4 layers × 4 heads / 2 KV heads: 343).

Because senders are listed in topological order, the senders of any receiver are a prefix of the
sender list (:attr:`EdgeGraph.upstream`), which is what lets attribution score a whole receiver
with one matrix product (:mod:`replab.circuits.eap`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from replab.errors import ReplabError
from replab.hooks import query_heads_of
from replab.patching.edge_patch import EdgePatch, check_edge_model


def sender_name(kind: str, layer: int, head: int | None) -> str:
    return "EMBED" if kind == "embed" else (f"L{layer}H{head}" if kind == "head" else f"L{layer}MLP")


def receiver_name(kind: str, layer: int, head: int | None) -> str:
    if kind == "logits":
        return "LOGITS"
    if kind == "q":
        return f"L{layer}H{head}.q"
    if kind in ("k", "v"):
        return f"L{layer}KV{head}.{kind}"
    return f"L{layer}MLP"


@dataclass
class EdgeGraph:
    """Senders, receivers and edges of one model (module docstring).

    Attributes:
        senders: ``[(kind, layer, head)]`` in topological order (``kind`` embed/head/mlp).
        receivers: ``[(kind, layer, head)]`` (``kind`` q/k/v/mlp/logits; ``head`` a KV head for k/v).
        upstream: ``[n_receivers]`` number of senders feeding each receiver (a prefix).
        edge_sender, edge_receiver: ``[n_edges]`` indices, receiver-major in receiver order.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    senders: list[tuple]
    receivers: list[tuple]
    upstream: np.ndarray
    edge_sender: np.ndarray
    edge_receiver: np.ndarray
    _names: list[str] | None = field(default=None, repr=False)

    @property
    def n_edges(self) -> int:
        return int(len(self.edge_sender))

    @property
    def sender_names(self) -> list[str]:
        return [sender_name(*s) for s in self.senders]

    @property
    def receiver_names(self) -> list[str]:
        return [receiver_name(*r) for r in self.receivers]

    def edge_names(self) -> list[str]:
        """``SENDER->RECEIVER`` for every edge, in edge order."""
        if self._names is None:
            s, r = self.sender_names, self.receiver_names
            self._names = [f"{s[a]}->{r[b]}" for a, b in zip(self.edge_sender, self.edge_receiver, strict=True)]
        return self._names

    def edge_index(self, names) -> np.ndarray:
        """Edge indices of ``names`` (``SENDER->RECEIVER``); ReplabError naming an unknown one."""
        lookup = {n: i for i, n in enumerate(self.edge_names())}
        out = []
        for name in names:
            key = str(name).replace(" ", "")
            if key not in lookup:
                raise ReplabError(f"unknown edge {name!r}: write SENDER->RECEIVER with senders EMBED, L5H3, "
                                  "L7MLP and receivers L5H3.q, L9KV1.k, L9KV1.v, L7MLP, LOGITS, the sender "
                                  "upstream of the receiver")
            out.append(lookup[key])
        return np.asarray(out, dtype=np.int64)

    def counts(self) -> dict:
        """Edge counts by receiver kind, plus nodes."""
        kinds = np.array([self.receivers[r][0] for r in self.edge_receiver])
        return {"edges": self.n_edges, "senders": len(self.senders), "receivers": len(self.receivers),
                **{f"edges_into_{k}": int((kinds == k).sum()) for k in ("q", "k", "v", "mlp", "logits")}}

    def query_heads(self, receiver: int) -> list[int]:
        """Query heads that read receiver ``receiver`` (its own head for q, the group for k/v)."""
        kind, _, head = self.receivers[receiver]
        if kind == "q":
            return [head]
        if kind in ("k", "v"):
            return query_heads_of(head, self.n_heads, self.n_kv_heads)
        return []

    def table(self, idx=None) -> pd.DataFrame:
        """One row per edge (all, or ``idx``): ``edge, sender, receiver, sender_kind, sender_layer,
        sender_head, receiver_kind, receiver_layer, receiver_head, query_heads``."""
        idx = np.arange(self.n_edges) if idx is None else np.asarray(idx, dtype=np.int64)
        names = self.edge_names()
        sn, rn = self.sender_names, self.receiver_names
        rows = []
        for i in idx:
            a, b = int(self.edge_sender[i]), int(self.edge_receiver[i])
            sk, sl, sh = self.senders[a]
            rk, rl, rh = self.receivers[b]
            rows.append({"edge": names[i], "sender": sn[a], "receiver": rn[b], "sender_kind": sk,
                         "sender_layer": sl, "sender_head": sh, "receiver_kind": rk,
                         "receiver_layer": rl, "receiver_head": rh, "query_heads": self.query_heads(b)})
        df = pd.DataFrame(rows)
        for c in ("sender_head", "receiver_head"):
            df[c] = df[c].astype("Int64")
        return df

    def patches(self, idx, source: str = "corrupt") -> tuple[EdgePatch, ...]:
        """:class:`~replab.patching.edge_patch.EdgePatch` es that patch edges ``idx`` from the
        ``source`` run (one per receiver, its senders grouped)."""
        idx = np.asarray(idx, dtype=np.int64)
        by_receiver: dict[int, list[tuple]] = {}
        for i in idx:
            by_receiver.setdefault(int(self.edge_receiver[i]), []).append(self.senders[int(self.edge_sender[i])])
        out = []
        for r in sorted(by_receiver):
            kind, layer, head = self.receivers[r]
            out.append(EdgePatch(kind, layer, head, tuple(by_receiver[r]), source))
        return tuple(out)


def edge_graph(model) -> EdgeGraph:
    """The :class:`EdgeGraph` of ``model`` (module docstring); ReplabError for an architecture
    whose residual stream is not a plain sum of component outputs."""
    check_edge_model(model)
    cfg = model.cfg
    n, h = cfg.n_layers, cfg.n_heads
    k = cfg.n_key_value_heads or cfg.n_heads
    senders: list[tuple] = [("embed", 0, None)]
    receivers: list[tuple] = []
    upstream: list[int] = []
    for layer in range(n):
        before = len(senders)                  # EMBED + everything of layers < layer
        for kind, count in (("q", h), ("k", k), ("v", k)):
            for j in range(count):
                receivers.append((kind, layer, j))
                upstream.append(before)
        senders += [("head", layer, j) for j in range(h)]
        receivers.append(("mlp", layer, None))
        upstream.append(len(senders))          # the MLP also reads its own layer's heads
        senders.append(("mlp", layer, None))
    receivers.append(("logits", n - 1, None))
    upstream.append(len(senders))
    up = np.asarray(upstream, dtype=np.int64)
    edge_receiver = np.repeat(np.arange(len(receivers)), up)
    edge_sender = np.concatenate([np.arange(u) for u in up])
    return EdgeGraph(n, h, k, senders, receivers, up, edge_sender, edge_receiver)


def parse_node(name: str) -> tuple[str, tuple]:
    """``"L5H3"`` -> ``("sender", ("head", 5, 3))``; ``"L9KV1.k"`` -> ``("receiver", ("k", 9, 1))``;
    ``"L7MLP"`` is the MLP (a sender and, as its input, a receiver: ``("node", ("mlp", 7, None))``)."""
    text = str(name).strip()
    if text == "EMBED":
        return "sender", ("embed", 0, None)
    if text == "LOGITS":
        return "receiver", ("logits", None, None)
    m = re.fullmatch(r"L(\d+)H(\d+)", text)
    if m:
        return "sender", ("head", int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"L(\d+)MLP", text)
    if m:
        return "node", ("mlp", int(m.group(1)), None)
    m = re.fullmatch(r"L(\d+)H(\d+)\.q", text)
    if m:
        return "receiver", ("q", int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"L(\d+)KV(\d+)\.([kv])", text)
    if m:
        return "receiver", (m.group(3), int(m.group(1)), int(m.group(2)))
    raise ReplabError(f"unknown node {name!r} (EMBED, L5H3, L7MLP, L5H3.q, L9KV1.k, L9KV1.v, LOGITS)")


def circuit_heads(graph: EdgeGraph, idx) -> list[str]:
    """The node-level view of an edge circuit: query heads (``L5H3``) that are an endpoint of an
    edge in ``idx``: as a sender, as a q receiver, or as a reader of a k/v receiver (every
    query head of that KV group)."""
    heads = set()
    for i in np.asarray(idx, dtype=np.int64):
        kind, layer, head = graph.senders[int(graph.edge_sender[i])]
        if kind == "head":
            heads.add((layer, head))
        r = int(graph.edge_receiver[i])
        heads |= {(graph.receivers[r][1], q) for q in graph.query_heads(r)}
    return [f"L{layer}H{h}" for layer, h in sorted(heads)]


def heads_by_weight(edges, n_heads: int, n_kv_heads: int, effective_only: bool = True) -> list[tuple[str, float]]:
    """Query heads ranked by the summed ``|score|`` of the circuit edges they are an endpoint of
    (a k/v edge's weight is shared equally by the query heads of its KV group): the node-level
    view of a large edge circuit. ``edges``: dicts with ``sender``, ``receiver``, ``score`` (and
    ``effective``), as in a circuit's JSON. Returns ``[(head, weight)]``, heaviest first."""
    group = n_heads // n_kv_heads
    weight: dict[str, float] = {}
    for e in edges:
        if effective_only and not e.get("effective", True):
            continue
        w = abs(float(e["score"]))
        if re.fullmatch(r"L\d+H\d+", e["sender"]):
            weight[e["sender"]] = weight.get(e["sender"], 0.0) + w
        kind, spec = parse_node(e["receiver"])
        if spec[0] == "q":
            name = f"L{spec[1]}H{spec[2]}"
            weight[name] = weight.get(name, 0.0) + w
        elif spec[0] in ("k", "v"):
            for q in query_heads_of(spec[2], n_heads, n_kv_heads):
                name = f"L{spec[1]}H{q}"
                weight[name] = weight.get(name, 0.0) + w / group
    return sorted(weight.items(), key=lambda kv: -kv[1])


def head_overlap(a, b) -> dict:
    """Overlap of two head sets (names such as ``L5H3``): ``shared``, ``only_a``, ``only_b``
    (sorted lists), their sizes and the Jaccard index ``|a ∩ b| / |a ∪ b|``."""
    sa, sb = {str(x) for x in a}, {str(x) for x in b}
    key = lambda s: tuple(int(x) for x in re.findall(r"\d+", s))  # noqa: E731
    union = sa | sb
    return {"shared": sorted(sa & sb, key=key), "only_a": sorted(sa - sb, key=key),
            "only_b": sorted(sb - sa, key=key), "n_a": len(sa), "n_b": len(sb), "n_shared": len(sa & sb),
            "jaccard": (len(sa & sb) / len(union)) if union else float("nan")}


def node_view_overlap(circuit: dict, heads, n_heads: int, n_kv_heads: int) -> dict:
    """The node-level view of an edge circuit (a circuit JSON of ``replab circuit discover``:
    ``heads`` it touches, ``edges`` with scores) against a head set (e.g. a pruning circuit):
    ``touched`` = :func:`head_overlap` of every head the circuit touches with ``heads``;
    ``heaviest`` = the same for its ``len(heads)`` heaviest heads (:func:`heads_by_weight`),
    which is what a circuit touching most heads can be compared by."""
    heads = sorted({str(h) for h in heads})
    ranked = [h for h, _ in heads_by_weight(circuit["edges"], n_heads, n_kv_heads)]
    return {"touched": head_overlap(circuit["heads"], heads),
            "heaviest": head_overlap(ranked[:len(heads)], heads),
            "heaviest_heads": ranked[:len(heads)],
            "ranks_of_heads": {h: (ranked.index(h) + 1 if h in ranked else None) for h in heads}}

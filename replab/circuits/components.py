"""The component vocabulary of every circuit command, and its translation into interventions.

=============  ====================================================  ==========================
component      what it is                                            intervention (site, layer)
=============  ====================================================  ==========================
``L5H3``       query head 3 of layer 5: its output                   ``z``, head 3
``L5H3.q``     that head's query input                               ``q``, head 3
``L5H3.k``     the keys it reads: its **KV head** under GQA          ``k``, KV head of head 3
``L5H3.v``     the values it reads: its KV head                      ``v``, KV head of head 3
``L7MLP``      the MLP of layer 7 (its output)                       ``mlp_out``
``L7ATTN``     the whole attention layer 7 (every head + bias)       ``attn_out``
``L7RESID``    the residual stream leaving layer 7                   ``resid_post``
``EMBED``      the embedding (the residual entering layer 0)         ``resid_pre``, layer 0
=============  ====================================================  ==========================

A position suffix restricts any of them: ``L5H3@-1`` (the last position), ``L5H3@3,4``,
``L5H3.q@-1``. A head is written as everywhere in replab (:data:`replab.hooks.HEAD_PATTERN`:
``L5H3``, also ``5.3``). Lists are comma-separated (``L5H3@3,4,L7MLP``: a bare integer after an ``@``
continues that component's positions) or a JSON file holding a list of names (or
``{"components": [...]}``). Names are case-insensitive and printed canonically.

Grouped-query attention: ``.k``/``.v`` replace the keys/values of the KV head that query
head reads, which every query head of its group reads too (``kv_group`` in the records says
which); SmolLM2 has 9 query heads over 3 KV heads per layer.

:func:`interventions` turns a set of components into interventions, merging the plain head
outputs of one layer (same positions) into **one** intervention with several heads, so an
ablation of 250 heads costs 30 masked writes per forward, not 250.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from replab.errors import ReplabError
from replab.hooks import HEAD_PATTERN, check_head, kv_head_of, parse_head, query_heads_of

KINDS = ("head", "mlp", "attn", "resid", "embed")
_POS = r"(?:@(-?\d+(?:,-?\d+)*))?"
# the head itself is written as everywhere else in replab (replab.hooks.HEAD_PATTERN: L5H3, 5.3)
_HEAD = re.compile(rf"^({HEAD_PATTERN})(?:\.([QKV]))?{_POS}$", re.IGNORECASE)
_BLOCK = re.compile(rf"^L(\d+)(MLP|ATTN|RESID){_POS}$")
_EMBED = re.compile(rf"^EMBED{_POS}$")
_SITE = {"mlp": "mlp_out", "attn": "attn_out", "resid": "resid_post", "embed": "resid_pre"}


@dataclass(frozen=True)
class Component:
    """One component (module docstring). ``positions`` as written (negative from the end)."""

    kind: str
    layer: int = 0
    head: int | None = None
    part: str | None = None                 # q | k | v: a head's input; None: its output
    positions: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        if self.kind == "embed":
            base = "EMBED"
        elif self.kind == "head":
            base = f"L{self.layer}H{self.head}" + (f".{self.part}" if self.part else "")
        else:
            base = f"L{self.layer}{self.kind.upper()}"
        return base + ("" if self.positions is None else "@" + ",".join(map(str, self.positions)))

    def __str__(self) -> str:
        return self.name

    @property
    def site(self) -> str:
        if self.kind == "head":
            return self.part or "z"
        return _SITE[self.kind]

    @property
    def is_head_output(self) -> bool:
        return self.kind == "head" and self.part is None

    def whole(self) -> Component:
        """The same component at every position."""
        return Component(self.kind, self.layer, self.head, self.part, None)

    def abs_positions(self, n_tokens: int) -> tuple[int, ...] | None:
        """Positions as indices ``0..n_tokens-1`` (ReplabError when out of range)."""
        if self.positions is None:
            return None
        out = []
        for p in self.positions:
            q = p + n_tokens if p < 0 else p
            if not 0 <= q < n_tokens:
                raise ReplabError(f"{self.name}: position {p} is out of range for {n_tokens}-token prompts")
            out.append(q)
        return tuple(sorted(set(out)))

    def kv_head(self, model) -> int:
        cfg = model.cfg
        return kv_head_of(self.head, cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads)

    def kv_group(self, model) -> str | None:
        """For ``.k``/``.v``: the query heads that read the same KV head (e.g. ``"L5H3,L5H4,L5H5"``)."""
        if self.part not in ("k", "v"):
            return None
        cfg = model.cfg
        heads = query_heads_of(self.kv_head(model), cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads)
        return ",".join(f"L{self.layer}H{h}" for h in heads)

    def intervention(self, model, source: str, n_tokens: int, seed: int = 0):
        """This component as one :class:`~replab.patching.interventions.Intervention`."""
        from replab.patching.interventions import Intervention

        layer = 0 if self.kind == "embed" else self.layer
        head = None
        if self.kind == "head":
            head = self.kv_head(model) if self.part in ("k", "v") else self.head
        return Intervention(self.site, layer, head=head, positions=self.abs_positions(n_tokens),
                            source=source, seed=seed)


def _split(text: str) -> list[str]:
    """Comma-split, re-attaching bare integers to the preceding ``@`` position list."""
    out: list[str] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if re.fullmatch(r"-?\d+", item) and out and "@" in out[-1]:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def parse_component(text: str) -> Component:
    """One name -> :class:`Component` (ReplabError naming the vocabulary if unknown)."""
    t = str(text).strip().upper().replace(" ", "")
    pos = lambda s: None if s is None else tuple(int(x) for x in s.split(","))  # noqa: E731
    m = _HEAD.match(t)
    if m:
        layer, head = parse_head(m.group(1))
        part = m.group(4).lower() if m.group(4) else None
        return Component("head", layer, head, part, pos(m.group(5)))
    m = _BLOCK.match(t)
    if m:
        return Component(m.group(2).lower(), int(m.group(1)), None, None, pos(m.group(3)))
    m = _EMBED.match(t)
    if m:
        return Component("embed", 0, None, None, pos(m.group(1)))
    raise ReplabError(f"unknown component {text!r}: use L5H3 (a head's output), L5H3.q|.k|.v, L7MLP, L7ATTN, "
                      "L7RESID or EMBED, optionally with positions such as @-1 or @3,4")


def parse_components(spec, model=None, n_tokens: int | None = None) -> list[Component]:
    """Components from a comma string, a list of names, or a JSON file (module docstring).

    With ``model`` the layers and heads are checked against it; with ``n_tokens`` the
    positions too. Duplicates are dropped (order kept). ReplabError on an empty set.
    """
    if spec is None:
        raise ReplabError("no components given")
    if isinstance(spec, (list, tuple)):
        names = [str(s) for item in spec for s in _split(str(item))]
    else:
        text = str(spec).strip()
        path = Path(text)
        if text.endswith(".json") or (path.suffix and path.is_file()):
            if not path.is_file():
                raise ReplabError(f"component file {text} does not exist")
            try:
                data = json.loads(path.read_text())
            except ValueError as exc:
                raise ReplabError(f"component file {text} is not JSON: {exc}") from None
            if isinstance(data, dict):
                data = data.get("components", data.get("heads"))
            if not isinstance(data, list):
                raise ReplabError(f"component file {text} must hold a list of names or {{\"components\": [...]}}")
            names = [str(s) for item in data for s in _split(str(item))]
        else:
            names = _split(text)
    comps = list(dict.fromkeys(parse_component(n) for n in names))
    if not comps:
        raise ReplabError("the component set is empty")
    if model is not None:
        check_components(comps, model, n_tokens)
    return comps


def check_components(comps, model, n_tokens: int | None = None) -> None:
    """ReplabError if a component's layer, head or position does not exist."""
    cfg = model.cfg
    for c in comps:
        if c.kind == "head":
            check_head(c.layer, c.head, cfg.n_layers, cfg.n_heads, c.name)
        elif c.kind != "embed" and not 0 <= c.layer < cfg.n_layers:
            raise ReplabError(f"{c.name}: layer {c.layer} is out of range: this model has layers 0-{cfg.n_layers - 1}")
        if n_tokens is not None:
            c.abs_positions(n_tokens)


def all_heads(model) -> list[Component]:
    """Every query head's output, layer by layer."""
    return [Component("head", layer, h) for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


def all_mlps(model) -> list[Component]:
    return [Component("mlp", layer) for layer in range(model.cfg.n_layers)]


def names(comps) -> list[str]:
    return [c.name for c in comps]


def interventions(comps, model, source: str, n_tokens: int, seed: int = 0) -> tuple:
    """Interventions for a set of components, all with ``source``: the plain head outputs of
    one layer with the same positions become one several-head ``z`` intervention; every other
    component is one intervention. Ordered by layer."""
    from replab.patching.interventions import Intervention

    grouped: dict[tuple, list[int]] = {}
    rest = []
    for c in comps:
        if c.is_head_output:
            grouped.setdefault((c.layer, c.abs_positions(n_tokens)), []).append(c.head)
        else:
            rest.append(c.intervention(model, source, n_tokens, seed))
    out = [Intervention("z", layer, head=tuple(heads) if len(heads) > 1 else heads[0], positions=pos,
                        source=source, seed=seed)
           for (layer, pos), heads in grouped.items()]
    return tuple(sorted(out + rest, key=lambda iv: iv.layer))


def layer_profile(comps) -> dict:
    """``{(kind, layer): count}``: what random sets of the same profile keep."""
    prof: dict = {}
    for c in comps:
        prof[(c.kind, c.layer)] = prof.get((c.kind, c.layer), 0) + 1
    return prof

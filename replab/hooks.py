"""The one hook vocabulary: sites, their synonyms, layer specs, head names and hook-name parsing.

Every package speaks in these terms: a *site* is a friendly name for a per-layer
TransformerLens hook point (``resid_post`` -> ``blocks.L.hook_resid_post``), a *layer spec*
picks layers (``all``, ``5``, ``-1``, ``0-9``, ``10-``, ``0,5,10``), and full hook names
(``blocks.14.hook_resid_post``) are what stores, probes, interventions and SAEs record.

=================  ==================================  ======================================
site               hook                                shape; what ``head`` indexes
=================  ==================================  ======================================
resid_pre          blocks.L.hook_resid_pre             [B, T, d_model] (HF ``hidden_states[L]``)
resid_mid          blocks.L.hook_resid_mid             [B, T, d_model]
resid_post         blocks.L.hook_resid_post            [B, T, d_model]
attn_out, mlp_out  blocks.L.hook_attn_out / _mlp_out   [B, T, d_model]
mlp_pre, mlp_post  blocks.L.mlp.hook_pre / _post       [B, T, d_mlp]
z, q               blocks.L.attn.hook_z / _q           [B, T, n_heads, d_head]; a query head
k, v               blocks.L.attn.hook_k / _v           [B, T, n_kv_heads, d_head]; a **KV head**
pattern            blocks.L.attn.hook_pattern          [B, n_heads, T_dest, T_src]
=================  ==================================  ======================================

Synonyms: ``head_z``/``head_out`` -> ``z``, ``head_q``/``head_k``/``head_v``/``head_pattern``,
``mlp_in`` -> ``mlp_pre``, ``neurons`` -> ``mlp_post``. There is deliberately no ``resid``: it
would have to mean either ``resid_pre`` or ``resid_post``, and the two differ by a whole block.

Grouped-query attention (SmolLM2: 9 query heads share 3 KV heads): ``k`` and ``v`` exist once
per KV head; :func:`query_heads_of` lists the query heads that read one.

A query head is written ``L5H3`` (also ``5.3``, ``5:3``; case-insensitive) everywhere:
:func:`parse_head` / :func:`parse_head_list` / :func:`check_head` are the one parser behind
``replab heads --heads``, ``replab patch patterns --heads``, the circuit components
(``L5H3.v@-1``) and ``--compare-heads``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from replab.errors import ReplabError


@dataclass(frozen=True)
class Site:
    """A per-layer hook point: its TransformerLens template (``{L}`` = layer) and kind
    (``vector``, ``head`` for query heads, ``kv_head``, ``pattern``)."""

    template: str
    kind: str

    def hook(self, layer: int) -> str:
        return self.template.format(L=int(layer))


SITES: dict[str, Site] = {
    "resid_pre": Site("blocks.{L}.hook_resid_pre", "vector"),
    "resid_mid": Site("blocks.{L}.hook_resid_mid", "vector"),
    "resid_post": Site("blocks.{L}.hook_resid_post", "vector"),
    "attn_out": Site("blocks.{L}.hook_attn_out", "vector"),
    "mlp_out": Site("blocks.{L}.hook_mlp_out", "vector"),
    "mlp_pre": Site("blocks.{L}.mlp.hook_pre", "vector"),
    "mlp_post": Site("blocks.{L}.mlp.hook_post", "vector"),
    "z": Site("blocks.{L}.attn.hook_z", "head"),
    "q": Site("blocks.{L}.attn.hook_q", "head"),
    "k": Site("blocks.{L}.attn.hook_k", "kv_head"),
    "v": Site("blocks.{L}.attn.hook_v", "kv_head"),
    "pattern": Site("blocks.{L}.attn.hook_pattern", "pattern"),
}
SYNONYMS: dict[str, str] = {
    "head_z": "z", "head_out": "z", "head_q": "q", "head_k": "k", "head_v": "v",
    "head_pattern": "pattern", "mlp_in": "mlp_pre", "neurons": "mlp_post",
}
#: Sites that are one vector per position (what a harvest can store).
VECTOR_SITES = tuple(s for s, site in SITES.items() if site.kind != "pattern")
NOT_VECTORS = ("hook_pattern", "hook_attn_scores")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def site_kind(site: str) -> str:
    """``vector``, ``head``, ``kv_head`` or ``pattern`` for a canonical site name."""
    return SITES[site].kind


def hook_name(site: str, layer: int) -> str:
    """The full hook name of ``site`` (an alias or synonym) at ``layer``."""
    return SITES[canonical_site(site)[0]].hook(layer)


def canonical_site(site: str, layer: int | None = None) -> tuple[str, int | None]:
    """A site alias, synonym or full hook name -> ``(site, layer)``; ReplabError if unknown.

    ``blocks.3.hook_resid_pre`` gives ``("resid_pre", 3)``; an alias keeps ``layer``.
    """
    text = str(site).strip()
    if text == "resid":
        raise ReplabError("'resid' is ambiguous: use resid_pre (the residual entering a block, HF "
                          "hidden_states[L]) or resid_post (leaving it)")
    s = SYNONYMS.get(text, text)
    if s in SITES:
        return s, layer
    match = _BLOCK.match(text)
    if match:
        found = next((name for name, st in SITES.items() if st.hook(int(match.group(1))) == text), None)
        if found:
            return found, int(match.group(1))
    known = ", ".join(list(SITES) + list(SYNONYMS))
    raise ReplabError(f"unknown site {site!r} (known: {known}, or a hook name such as "
                      "blocks.3.hook_resid_pre)")


def parse_hook_name(name: str) -> tuple[str, int | None]:
    """``blocks.3.hook_resid_post`` -> ``("resid_post", 3)``; another per-block hook ->
    ``(rest, layer)`` (e.g. ``("ln1.hook_scale", 3)``); a global hook -> ``(name, None)``."""
    match = _BLOCK.match(name)
    if not match:
        return name, None
    layer, rest = int(match.group(1)), match.group(2)
    for alias, site in SITES.items():
        if site.hook(layer) == name:
            return alias, layer
    return rest, layer


def query_heads_of(kv_head: int, n_heads: int, n_kv_heads: int) -> list[int]:
    """Query heads that read KV head ``kv_head`` (TransformerLens's repeat_interleave layout)."""
    group = n_heads // n_kv_heads
    return list(range(kv_head * group, (kv_head + 1) * group))


def kv_head_of(head: int, n_heads: int, n_kv_heads: int) -> int:
    """The KV head that query head ``head`` reads."""
    return head // (n_heads // n_kv_heads)


#: How every command writes a query head: ``L5H3`` (also ``5.3``, ``5:3``, ``5H3``;
#: case-insensitive). The circuit components (``L5H3.v@-1``) and the head lists of
#: ``replab heads`` / ``replab patch patterns`` / ``--compare-heads`` all parse heads with it.
HEAD_PATTERN = r"L?(\d+)[.H:](\d+)"
_HEAD_NAME = re.compile(HEAD_PATTERN, re.IGNORECASE)


def head_label(layer: int, head: int) -> str:
    """``(5, 3)`` -> ``"L5H3"``, the canonical way a head is printed."""
    return f"L{int(layer)}H{int(head)}"


def parse_head(text) -> tuple[int, int]:
    """``"L5H3"`` (or ``"5.3"``, ``"5:3"``, ``"l5h3"``) -> ``(5, 3)``; ReplabError otherwise."""
    m = _HEAD_NAME.fullmatch(str(text).strip())
    if not m:
        raise ReplabError(f"bad head {text!r}; use L5H3 or 5.3 (LAYER.HEAD)")
    return int(m.group(1)), int(m.group(2))


def check_head(layer: int, head: int, n_layers: int, n_heads: int, name: str | None = None) -> None:
    """ReplabError naming ``name`` (default ``L5H3``) when the layer or query head does not exist."""
    name = name or head_label(layer, head)
    if not 0 <= layer < n_layers:
        raise ReplabError(f"{name} does not exist: layer {layer} is out of range (this model has layers "
                          f"0-{n_layers - 1})")
    if not 0 <= head < n_heads:
        raise ReplabError(f"{name} does not exist: head {head} is out of range (layer {layer} has query heads "
                          f"0-{n_heads - 1})")


def parse_head_list(spec, n_layers: int | None = None, n_heads: int | None = None) -> list[tuple[int, int]]:
    """Query heads from ``"L5H3,20.1"``, a list of names, or a list of ``(layer, head)`` pairs ->
    ``[(5, 3), (20, 1)]``, duplicates dropped (order kept). With ``n_layers`` and ``n_heads``
    every head is checked (:func:`check_head`). ReplabError on a bad name or an empty list."""
    if isinstance(spec, (list, tuple)) and spec and not isinstance(spec[0], str):
        heads = [(int(a), int(b)) for a, b in spec]
    else:
        items = spec if isinstance(spec, (list, tuple)) else str(spec if spec is not None else "").split(",")
        heads = [parse_head(item) for item in (str(s).strip() for s in items) if item]
    if not heads:
        raise ReplabError("no heads given")
    if n_layers is not None and n_heads is not None:
        for layer, h in heads:
            check_head(layer, h, n_layers, n_heads)
    return list(dict.fromkeys(heads))


def parse_layers(spec, n_layers: int) -> list[int]:
    """Parse a layer spec into sorted layer numbers.

    ``"all"`` (or None), ``"5"``, ``"-1"`` (from the end), ``"0-9"``, ``"10-"`` (to the last
    layer), ``"0,5,10-12"``, or a list of those. A reversed range (``"3-1"``), an empty spec or
    a layer outside ``0..n_layers-1`` is a ReplabError that quotes what was given.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(n_layers))
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    out: list[int] = []
    for item in items:
        text = str(item).strip()
        single = re.fullmatch(r"-?\d+", text)
        span = re.fullmatch(r"(-?\d+)-(-?\d+)?", text)
        if single:
            values = [_checked(int(text), text, n_layers)]
        elif span:
            lo = _checked(int(span.group(1)), text, n_layers)
            hi = _checked(int(span.group(2)), text, n_layers) if span.group(2) else n_layers - 1
            if hi < lo:
                raise ReplabError(f"layer range {text!r} is reversed (it runs from {lo} down to {hi}); "
                                  f"write {hi}-{lo}")
            values = list(range(lo, hi + 1))
        else:
            raise ReplabError(f"bad layer spec {text!r}; use all, 5, -1, 0-9, 10- or 0,5,10")
        out.extend(values)
    if not out:
        raise ReplabError(f"layer spec {spec!r} selects no layers")
    return sorted(set(out))


def _checked(value: int, given: str, n_layers: int) -> int:
    wrapped = value + n_layers if value < 0 else value
    if not 0 <= wrapped < n_layers:
        raise ReplabError(f"layer {value} (in {given!r}) is out of range: this model has layers "
                          f"0-{n_layers - 1} (or -{n_layers} to -1 from the end)")
    return wrapped


def resolve_hooks(model, hooks, layers="all") -> list[str]:
    """Full hook names for site aliases × layers, plus raw hook names, validated on ``model``.

    Args:
        model: anything with ``cfg.n_layers`` and ``hook_dict`` (a HookedTransformer).
        hooks: aliases (``resid_post``, ``attn_out``, ``z``...) and/or raw names
            (``blocks.3.hook_resid_pre``, ``hook_embed``), as a list or comma string.
        layers: a layer spec applied to the aliases (see :func:`parse_layers`).
    Returns:
        Unique names in the model's hook order.
    """
    if isinstance(hooks, str):
        hooks = [h for h in hooks.split(",") if h.strip()]
    if not hooks:
        raise ReplabError("no hooks given")
    valid = model.hook_dict
    layer_list = parse_layers(layers, model.cfg.n_layers)
    names: list[str] = []
    for raw in hooks:
        hook = raw.strip()
        if hook == "resid":
            canonical_site(hook)            # the ambiguity error
        alias = SYNONYMS.get(hook, hook)
        if alias in SITES:
            names.extend(SITES[alias].hook(layer) for layer in layer_list)
            continue
        if hook not in valid:
            raise ReplabError(
                f"unknown hook {hook!r}; use one of {', '.join(VECTOR_SITES)} or a full hook name "
                "such as blocks.0.hook_resid_post")
        names.append(hook)
    for name in names:
        if name.endswith(NOT_VECTORS):
            raise ReplabError(f"{name} is an attention pattern, not a per-position vector")
        if name not in valid:
            raise ReplabError(f"hook {name!r} does not exist on this model")
    order = {name: i for i, name in enumerate(valid)}
    return sorted(dict.fromkeys(names), key=lambda n: order[n])


def stop_at_layer(hook_names: list[str], n_layers: int) -> int | None:
    """The smallest ``stop_at_layer`` that still runs every hook (None: run to the end)."""
    last = -1
    for name in hook_names:
        _, layer = parse_hook_name(name)
        if layer is None:
            if name.startswith(("hook_embed", "hook_pos_embed", "hook_tokens")):
                continue
            return None  # ln_final / unembed hooks need the whole model
        last = max(last, layer)
    return max(last + 1, 1) if last + 1 < n_layers else n_layers

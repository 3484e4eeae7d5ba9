"""Hook names: friendly aliases, layer specs, and their TransformerLens names.

Hook names are replab's shared vocabulary (as in TransformerLens ``patching.py``):
every store, probe and intervention records full names such as
``blocks.14.hook_resid_post``.
"""

from __future__ import annotations

import re

from replab.errors import ReplabError

#: alias -> TransformerLens hook template (``{L}`` is the layer).
ALIASES: dict[str, str] = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "resid_post": "blocks.{L}.hook_resid_post",
    "attn_out": "blocks.{L}.hook_attn_out",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "mlp_pre": "blocks.{L}.mlp.hook_pre",
    "mlp_post": "blocks.{L}.mlp.hook_post",
    "z": "blocks.{L}.attn.hook_z",
    "q": "blocks.{L}.attn.hook_q",
    "k": "blocks.{L}.attn.hook_k",
    "v": "blocks.{L}.attn.hook_v",
}
SYNONYMS = {"head_z": "z", "head_q": "q", "head_k": "k", "head_v": "v", "mlp_in": "mlp_pre",
            "resid": "resid_post", "neurons": "mlp_post"}
NOT_VECTORS = ("hook_pattern", "hook_attn_scores")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def parse_layers(spec, n_layers: int) -> list[int]:
    """Parse a layer spec: ``"all"``, ``"5"``, ``"-1"``, ``"0-9"``, ``"10-"``, ``"0,5,10-12"``, or a list."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(n_layers))
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    out: list[int] = []
    for item in items:
        text = str(item).strip()
        single = re.fullmatch(r"-?\d+", text)
        span = re.fullmatch(r"(-?\d+)-(-?\d+)?", text)
        if single:
            values = [_wrap(int(text), n_layers)]
        elif span:
            lo = _wrap(int(span.group(1)), n_layers)
            hi = _wrap(int(span.group(2)), n_layers) if span.group(2) else n_layers - 1
            values = list(range(lo, hi + 1)) or [lo]
        else:
            raise ReplabError(f"bad layer spec {text!r}; use all, 5, -1, 0-9, 10- or 0,5,10")
        out.extend(values)
    if not out:
        raise ReplabError(f"layer spec {spec!r} selects no layers")
    bad = [v for v in out if not 0 <= v < n_layers]
    if bad:
        raise ReplabError(f"layer {bad[0]} is out of range: this model has layers 0-{n_layers - 1}")
    return sorted(set(out))


def _wrap(value: int, n_layers: int) -> int:
    return value + n_layers if value < 0 else value


def parse_hook_name(name: str) -> tuple[str, int | None]:
    """``blocks.3.hook_resid_post`` -> ``("resid_post", 3)``; other names -> ``(name, None)``."""
    match = _BLOCK.match(name)
    if not match:
        return name, None
    layer, rest = int(match.group(1)), match.group(2)
    for alias, template in ALIASES.items():
        if template.format(L=layer) == name:
            return alias, layer
    return rest, layer


def resolve_hooks(model, hooks, layers="all") -> list[str]:
    """Full hook names for aliases x layers, plus raw hook names, validated on ``model``.

    Args:
        hooks: aliases (``resid_post``, ``attn_out``, ``z``...) and/or raw names
            (``blocks.3.hook_resid_pre``, ``hook_embed``), as a list or comma string.
        layers: a layer spec applied to the aliases (see :func:`parse_layers`).
    """
    if isinstance(hooks, str):
        hooks = [h for h in hooks.split(",") if h.strip()]
    if not hooks:
        raise ReplabError("no hooks given")
    n_layers = model.cfg.n_layers
    layer_list = parse_layers(layers, n_layers)
    valid = model.hook_dict
    names: list[str] = []
    for raw in hooks:
        hook = raw.strip()
        alias = SYNONYMS.get(hook, hook)
        if alias in ALIASES:
            names.extend(ALIASES[alias].format(L=layer) for layer in layer_list)
            continue
        if hook not in valid:
            raise ReplabError(
                f"unknown hook {hook!r}; use one of {', '.join(ALIASES)} or a full hook name "
                "such as blocks.0.hook_resid_post"
            )
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

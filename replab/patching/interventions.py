"""Interventions as data: a serialisable spec of what to overwrite, where, and with what.

An :class:`Intervention` names a *site* (an alias or a TransformerLens hook name), a layer,
optionally a head (or several heads of that layer: ``head=(0, 2, 5)`` overwrites all of them
in one intervention, e.g. "every head of layer 7 but the sender"), positions and MLP
neurons, a *source*, and optionally a direction
(subspace). It is plain data: ``to_dict()`` / ``Intervention.from_dict()`` round-trip through
JSON, which is what lets a sweep pack hundreds of them into one batched forward and lets a
run be replayed from its config.

Sites are :mod:`replab.hooks`'s vocabulary (``resid_pre``, ``z``, ``k``, ``pattern`` ...; the
table of shapes is there). ``head`` indexes a query head for ``z``/``q``/``pattern`` and a **KV
head** for ``k``/``v``: under grouped-query attention (SmolLM2: 9 query heads share 3 KV heads)
a k/v patch changes the keys or values that *every* query head of its group reads
(:func:`replab.hooks.query_heads_of`); sweep tables report them in ``query_heads``. This
matches TransformerLens's ``get_act_patch_attn_head_v_all_pos`` (which iterates over
``n_key_value_heads``). ``positions`` are destination positions for ``pattern``.

Sources (what the selected entries become):

* ``clean`` / ``corrupt``: the same activation from the clean / corrupt run;
* ``zero``; ``mean``: the mean over the task's prompts (the dataset mean) of the *base* run, the
  run being patched (per position);
* ``resample``: the activation of another prompt of the source run (a fixed derangement,
  seeded);
* ``noise``: the base activation plus Gaussian noise with standard deviation ``scale``;
* ``steer``: the base activation plus ``scale`` × direction (needs ``direction``);
* ``custom:NAME``: values computed by the caller (e.g. an SAE latent patch), passed to
  :func:`~replab.patching.engine.run_variants` as ``sources={NAME: tensor}``, shaped like the
  hook's activation on the task's prompts, or ``sources={NAME: {hook name: tensor}}`` when one
  name covers several hooks (e.g. the mean over another prompt set at every ablated head).

With a ``direction`` (a unit vector, or a ``[k, d]`` basis of a subspace, over the site's
last axis) only the component in that subspace is replaced:
``a + (s − a) Pᵀ P`` — the orthogonal complement keeps the base run's value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from replab.errors import ReplabError
from replab.hooks import SITES, canonical_site

SOURCES = ("clean", "corrupt", "zero", "mean", "resample", "noise", "steer")


@dataclass(frozen=True)
class Intervention:
    """One overwrite of part of one activation (see the module docstring)."""

    site: str
    layer: int
    head: int | tuple[int, ...] | None = None    # one head, or several heads of this layer
    positions: tuple[int, ...] | None = None     # None: every position
    neurons: tuple[int, ...] | None = None       # mlp_pre / mlp_post only
    source: str = "clean"
    scale: float | None = None                   # noise std, or steering coefficient
    direction: tuple | None = field(default=None, compare=False)   # [d] or [k, d] as nested tuples
    seed: int = 0

    def __post_init__(self) -> None:
        site, layer = canonical_site(self.site, self.layer)
        object.__setattr__(self, "site", site)
        object.__setattr__(self, "layer", int(layer))
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        if isinstance(self.head, (list, tuple)):
            heads = tuple(sorted({int(h) for h in self.head}))
            if not heads:
                raise ReplabError(f"site {site}: an empty head list selects nothing")
            object.__setattr__(self, "head", heads)
        elif self.head is not None:
            object.__setattr__(self, "head", int(self.head))
        if self.neurons is not None:
            object.__setattr__(self, "neurons", tuple(int(n) for n in self.neurons))
            if site not in ("mlp_pre", "mlp_post"):
                raise ReplabError(f"neurons= applies to mlp_pre/mlp_post, not {site}")
        if self.source not in SOURCES and not str(self.source).startswith("custom:"):
            raise ReplabError(f"unknown source {self.source!r} (known: {', '.join(SOURCES)}, "
                              "or custom:NAME for values passed to run_variants(sources=...))")
        if self.source in ("noise", "steer") and self.scale is None:
            raise ReplabError(f"source {self.source!r} needs a scale")
        if self.source == "steer" and self.direction is None:
            raise ReplabError("source 'steer' needs a direction")
        kind = self.kind
        if kind in ("head", "kv_head", "pattern") and self.head is None:
            raise ReplabError(f"site {site} needs a head")
        if kind == "vector" and self.head is not None:
            raise ReplabError(f"site {site} has no heads")
        if self.direction is not None:
            if kind == "pattern":
                raise ReplabError("a direction cannot apply to an attention pattern")
            d = np.asarray(self.direction, dtype=np.float64)
            object.__setattr__(self, "direction", _as_tuple(d))

    @property
    def kind(self) -> str:
        return SITES[self.site].kind

    @property
    def hook(self) -> str:
        return SITES[self.site].hook(self.layer)

    @property
    def heads(self) -> tuple[int, ...]:
        """The selected heads as a tuple (empty for sites without heads)."""
        if self.head is None:
            return ()
        return self.head if isinstance(self.head, tuple) else (self.head,)

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(self.head, tuple):
            d["head"] = list(self.head)
        for k in ("positions", "neurons"):
            d[k] = list(d[k]) if d[k] is not None else None
        d["direction"] = np.asarray(self.direction).tolist() if self.direction is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Intervention:
        d = dict(d)
        for k in ("positions", "neurons", "head"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        if d.get("direction") is not None:
            d["direction"] = _as_tuple(np.asarray(d["direction"], dtype=np.float64))
        return cls(**d)

    def first_position(self) -> int:
        """Smallest patched (query/dest) position: everything before it is unchanged."""
        return 0 if self.positions is None else min(self.positions)

    def last_position(self, n_tokens: int) -> int:
        return n_tokens - 1 if self.positions is None else max(self.positions)


def _as_tuple(a: np.ndarray):
    return tuple(_as_tuple(x) for x in a) if a.ndim > 1 else tuple(float(x) for x in a)


def validate(model, iv: Intervention, n_tokens: int) -> None:
    """ReplabError if ``iv`` does not fit ``model`` (layer, head, neuron, position, direction)."""
    cfg = model.cfg
    if not 0 <= iv.layer < cfg.n_layers:
        raise ReplabError(f"layer {iv.layer} is out of range: this model has layers 0-{cfg.n_layers - 1}")
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    n_h = n_kv if iv.kind == "kv_head" else cfg.n_heads
    for h in iv.heads:
        if not 0 <= h < n_h:
            what = "KV heads" if iv.kind == "kv_head" else "heads"
            raise ReplabError(f"head {h} is out of range: {iv.site} has {n_h} {what}")
    if iv.positions is not None:
        bad = [p for p in iv.positions if not 0 <= p < n_tokens]
        if bad or not iv.positions:
            raise ReplabError(f"position {bad[0] if bad else '(none)'} is out of range 0-{n_tokens - 1}")
    if iv.neurons is not None:
        bad = [n for n in iv.neurons if not 0 <= n < cfg.d_mlp]
        if bad:
            raise ReplabError(f"neuron {bad[0]} is out of range 0-{cfg.d_mlp - 1}")
    if iv.direction is not None:
        width = {"vector": cfg.d_mlp if iv.site.startswith("mlp_") and iv.site != "mlp_out"
                 else cfg.d_model}.get(iv.kind, cfg.d_head)
        if np.asarray(iv.direction).shape[-1] != width:
            raise ReplabError(f"direction has {np.asarray(iv.direction).shape[-1]} dims; {iv.site} "
                              f"has {width}")


def basis(direction, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal basis ``[k, d]`` of the span of ``direction`` (``[d]`` or ``[k, d]``)."""
    d = torch.as_tensor(np.asarray(direction, dtype=np.float64))
    d = d[None] if d.ndim == 1 else d
    q, r = torch.linalg.qr(d.T)                      # [d, k]
    keep = r.diagonal().abs() > 1e-10 * max(1.0, float(r.diagonal().abs().max()))
    if not bool(keep.any()):
        raise ReplabError("direction is zero")
    return q[:, keep].T.to(dtype)


def select(act: torch.Tensor, iv: Intervention, offset: int) -> tuple:
    """Index tuple into ``act`` (rows of one variant) for ``iv``, with positions shifted by
    ``offset`` (the engine may run only positions ``offset..T-1``)."""
    if iv.positions is None:
        pos = slice(None)
    else:   # positions before ``offset`` are outside the computed window (no-ops by construction)
        kept = [p - offset for p in iv.positions if p >= offset]
        if not kept:
            return None
        pos = torch.tensor(kept)
    if isinstance(iv.head, tuple):     # several heads: index positions x heads as a grid
        heads = torch.tensor(iv.head)
        if iv.kind == "pattern":
            return (slice(None), heads, slice(None)) if iv.positions is None else (slice(None), heads[:, None], pos)
        return (slice(None), slice(None), heads) if iv.positions is None else (slice(None), pos[:, None], heads)
    if iv.kind == "pattern":
        return (slice(None), iv.head, pos)
    if iv.kind in ("head", "kv_head"):
        return (slice(None), pos, iv.head)
    if iv.neurons is not None:
        return (slice(None), pos if iv.positions is None else pos[:, None], torch.tensor(iv.neurons))
    return (slice(None), pos)


def apply(act: torch.Tensor, src: torch.Tensor | None, iv: Intervention, offset: int,
          noise: torch.Tensor | None = None) -> None:
    """Overwrite the entries of ``act`` selected by ``iv`` in place.

    ``act`` and ``src`` hold one variant's rows (all prompts), in the engine's coordinates
    (positions ``offset..``). ``src`` is the source activation (None for ``noise``/``steer``,
    which modify the base); ``noise`` is pre-drawn standard-normal noise shaped like ``act``.
    """
    idx = select(act, iv, offset)
    if idx is None:
        return
    a = act[idx]
    if iv.source == "noise":
        new = a + iv.scale * noise[idx]
    elif iv.source == "steer":   # along the given vector itself (first row), unit-normalised
        d = torch.as_tensor(np.asarray(iv.direction, dtype=np.float64))
        d = d[0] if d.ndim > 1 else d
        new = a + (iv.scale * d / d.norm()).to(act.device, act.dtype)
    else:
        new = src[idx].to(act.dtype)
        if iv.direction is not None:
            u = basis(iv.direction, act.dtype).to(act.device)   # [k, d]
            new = a + ((new - a) @ u.T) @ u
    act[idx] = new

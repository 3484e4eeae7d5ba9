"""Lens decoders: residual stream at every read-out point -> logits.

Read-out points (the ``layer`` convention, shared by both lenses and by tuned-lens):

* ``layer = l`` for ``0 <= l < n_layers``: the residual stream *entering* block ``l``
  (TL ``blocks.l.hook_resid_pre`` = HF ``hidden_states[l]``; ``layer 0`` is the
  embeddings). tuned-lens's translator ``l`` reads exactly this.
* ``layer = n_layers``: the final residual (TL ``blocks.{n-1}.hook_resid_post``), whose
  decoding is the model's own logits (HF ``hidden_states[-1]`` is already normed).
* with ``mid=True`` (logit lens only): also ``blocks.l.hook_resid_mid`` (after attention,
  before the MLP), with ``depth = l + 0.5``.

The logit lens decodes with the model's own final norm and unembedding
(``model.ln_final`` then ``model.unembed`` on the TransformerLens model: RMSNorm for
Llama-family, LayerNorm for GPT-2; with ``fold_ln`` the norm weight lives in ``W_U``).
The tuned lens runs on the HF model's hidden states, as tuned-lens does.
"""

from __future__ import annotations

import abc
import dataclasses

import torch

from replab.errors import ReplabError


@dataclasses.dataclass(frozen=True)
class Point:
    """One read-out point: ``layer`` (int), ``site`` (resid_pre/resid_mid/final), TL ``hook``."""

    layer: int
    site: str
    hook: str
    depth: float

    @property
    def label(self) -> str:
        return "final" if self.site == "final" else f"{self.layer}_{self.site.split('_')[1]}"


def lens_points(n_layers: int, mid: bool = False) -> list[Point]:
    """``[0_pre, (0_mid,) 1_pre, ..., (n-1)_mid, final]`` in depth order."""
    pts = []
    for layer in range(n_layers):
        pts.append(Point(layer, "resid_pre", f"blocks.{layer}.hook_resid_pre", float(layer)))
        if mid:
            pts.append(Point(layer, "resid_mid", f"blocks.{layer}.hook_resid_mid", layer + 0.5))
    pts.append(Point(n_layers, "final", f"blocks.{n_layers - 1}.hook_resid_post", float(n_layers)))
    return pts


class Decoder(abc.ABC):
    """A lens: ``logits(tokens)`` at every point of ``points``."""

    name: str
    points: list[Point]

    @abc.abstractmethod
    def iter_logits(self, tokens: torch.Tensor):
        """``tokens [batch, pos]`` -> yields ``logits [batch, pos, d_vocab]`` per point, in order."""

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [batch, pos]`` -> ``logits [n_points, batch, pos, d_vocab]`` (float32)."""
        return torch.stack([x.float() for x in self.iter_logits(tokens)])


class LogitLens(Decoder):
    """The logit lens on a TransformerLens model: ``unembed(ln_final(resid))`` at each point."""

    name = "logit"

    def __init__(self, model, mid: bool = False):
        self.model = model
        self.points = lens_points(model.cfg.n_layers, mid)

    def decode(self, resid: torch.Tensor) -> torch.Tensor:
        """``resid [..., pos, d_model]`` -> ``logits [..., pos, d_vocab]`` via the model's own norm + W_U."""
        shape = resid.shape
        flat = resid.reshape(-1, shape[-2], shape[-1])
        return self.model.unembed(self.model.ln_final(flat)).reshape(*shape[:-1], -1)

    @torch.no_grad()
    def residuals(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [batch, pos]`` -> ``resid [n_points, batch, pos, d_model]``."""
        hooks = {p.hook for p in self.points}
        _, cache = self.model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
        return torch.stack([cache[p.hook] for p in self.points])

    @torch.no_grad()
    def iter_logits(self, tokens: torch.Tensor):
        for resid in self.residuals(tokens):
            yield self.decode(resid)


class TunedLensDecoder(Decoder):
    """A tuned-lens ``TunedLens`` applied to the HF model's hidden states.

    Point ``l < n_layers`` -> ``lens(hidden_states[l], idx=l)``; the final point is the
    model's logits. Mid-layer points have no translators, so ``mid`` is refused.
    """

    name = "tuned"

    def __init__(self, hf_model, lens, mid: bool = False):
        if mid:
            raise ReplabError("the tuned lens has translators only at resid_pre points; "
                              "use `replab lens logit --mid` for mid-layer points")
        self.hf_model, self.lens = hf_model, lens
        n = hf_model.config.num_hidden_layers
        if len(lens) != n:
            raise ReplabError(f"tuned lens has {len(lens)} translators but the model has {n} layers")
        self.points = lens_points(n, False)

    @torch.no_grad()
    def iter_logits(self, tokens: torch.Tensor):
        out = self.hf_model(input_ids=tokens, output_hidden_states=True)
        for layer in range(len(self.lens)):
            yield self.lens(out.hidden_states[layer], idx=layer)
        yield out.logits

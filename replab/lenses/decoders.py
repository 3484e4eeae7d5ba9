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
(``model.ln_final`` then ``W_U``/``b_U`` of the TransformerLens model: RMSNorm for
Llama-family, LayerNorm for GPT-2; with ``fold_ln`` the norm weight lives in ``W_U``).
The tuned lens runs on the HF model's hidden states, as tuned-lens does.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING

import torch

from replab.errors import ReplabError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedModel


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
    """A lens: the residual vector at every point of ``points``, and how to decode it.

    :meth:`residuals` runs the model once; :meth:`decode_point` turns any set of one
    point's vectors into logits. Keeping the two apart lets callers decode one point (and
    any subset of cells) at a time, so ``n_points x vocab`` logits are never all in memory.
    """

    name: str
    points: list[Point]

    @abc.abstractmethod
    def residuals(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [batch, pos]`` -> ``resid [n_points, batch, pos, d_model]``."""

    @abc.abstractmethod
    def decode_point(self, resid: torch.Tensor, index: int) -> torch.Tensor:
        """``resid [..., d_model]`` of point ``points[index]`` -> ``logits [..., d_vocab]``."""

    @torch.no_grad()
    def decode_points(self, resid: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """``resid [m, ..., d_model]`` of points ``indices`` -> ``logits [m, ..., d_vocab]``.

        Subclasses batch the unembedding of several points into one matmul, which matters
        when few cells are decoded (reading ``W_U`` once per point dominates otherwise).
        """
        return torch.stack([self.decode_point(r, i) for r, i in zip(resid, indices, strict=True)])

    @torch.no_grad()
    def iter_logits(self, tokens: torch.Tensor):
        """``tokens [batch, pos]`` -> yields ``logits [batch, pos, d_vocab]`` per point, in order."""
        resid = self.residuals(tokens)
        for i in range(len(self.points)):
            yield self.decode_point(resid[i], i)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [batch, pos]`` -> ``logits [n_points, batch, pos, d_vocab]`` (float32)."""
        return self.decode_points(self.residuals(tokens), list(range(len(self.points)))).float()


class LogitLens(Decoder):
    """The logit lens on a TransformerLens model: ``unembed(ln_final(resid))`` at each point."""

    name = "logit"

    def __init__(self, model: HookedTransformer, mid: bool = False):
        self.model = model
        self.points = lens_points(model.cfg.n_layers, mid)

    @torch.no_grad()
    def decode(self, resid: torch.Tensor) -> torch.Tensor:
        """``resid [..., d_model]`` -> ``logits [..., d_vocab]`` via the model's own norm + W_U.

        ``model.ln_final``, then ``resid @ W_U + b_U`` (what ``model.unembed`` computes, without
        its per-call copy of ``W_U.T``, which made decoding 1.8x slower, and its hooks), then
        the model's output soft cap if it has one (Gemma 2), as the model's forward does.
        """
        from transformer_lens.utilities.activation_functions import apply_softcap

        flat = resid.reshape(1, -1, resid.shape[-1])  # TL modules want [batch, pos, d_model]
        has_norm = self.model.cfg.normalization_type is not None  # as the model's forward
        normed = (self.model.ln_final(flat) if has_norm else flat)[0]
        logits = torch.addmm(self.model.b_U, normed, self.model.W_U)
        logits = apply_softcap(logits, getattr(self.model.cfg, "output_logits_soft_cap", None))
        return logits.reshape(*resid.shape[:-1], -1)

    def decode_point(self, resid: torch.Tensor, index: int) -> torch.Tensor:
        return self.decode(resid)  # the same norm + unembedding at every point

    def decode_points(self, resid: torch.Tensor, indices: list[int]) -> torch.Tensor:
        return self.decode(resid)

    @torch.no_grad()
    def residuals(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [batch, pos]`` -> ``resid [n_points, batch, pos, d_model]`` (TL hooks)."""
        hooks = {p.hook for p in self.points}
        _, cache = self.model.run_with_cache(tokens, names_filter=lambda n: n in hooks,
                                             return_type=None)  # no unembedding here
        return torch.stack([cache[p.hook] for p in self.points])


class TunedLensDecoder(Decoder):
    """A tuned-lens ``TunedLens`` applied to the HF model's hidden states.

    Point ``l < n_layers`` -> ``lens(hidden_states[l], idx=l)``; the final point is the
    model's logits, ``lm_head(hidden_states[-1])`` (HF's last hidden state is already
    normed). Mid-layer points have no translators, so ``mid`` is refused.
    """

    name = "tuned"

    def __init__(self, hf_model: PreTrainedModel, lens, mid: bool = False):
        if mid:
            raise ReplabError("--mid has no tuned-lens equivalent (tuned-lens trains translators "
                              "only for the residual entering each block); use `replab lens logit --mid`")
        self.hf_model, self.lens = hf_model, lens
        n = hf_model.config.num_hidden_layers
        if len(lens) != n:
            raise ReplabError(f"tuned lens has {len(lens)} translators but the model has {n} layers")
        self.points = lens_points(n, False)

    @torch.no_grad()
    def residuals(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [batch, pos]`` -> ``stack(hidden_states) [n_layers + 1, batch, pos, d_model]``."""
        out = self.hf_model.base_model(input_ids=tokens, output_hidden_states=True)
        return torch.stack(out.hidden_states)

    @torch.no_grad()
    def decode_point(self, resid: torch.Tensor, index: int) -> torch.Tensor:
        if index == len(self.lens):
            return self.hf_model.get_output_embeddings()(resid)
        return self.lens(resid, idx=index)

    @torch.no_grad()
    def decode_points(self, resid: torch.Tensor, indices: list[int]) -> torch.Tensor:
        final = len(self.lens)
        at_final = [m for m, i in enumerate(indices) if i == final]
        if at_final:  # the model's own logits: lm_head only (hidden_states[-1] is normed)
            logits = self.decode_point(resid[at_final], final)
            inner = [m for m, i in enumerate(indices) if i != final]
            if not inner:
                return logits
            out = logits.new_empty(*resid.shape[:-1], logits.shape[-1])
            out[at_final] = logits
            out[inner] = self.decode_points(resid[inner], [indices[m] for m in inner])
            return out
        # translators per point, then one final norm + unembedding for all of them
        h = torch.stack([self.lens.transform_hidden(r, idx=i) for r, i in zip(resid, indices, strict=True)])
        return self.lens.unembed(h)

"""The model's own final norm, measured rather than assumed (for the least-squares init).

The least-squares initialisation of :mod:`replab.lenses.train` needs to *invert* the final
norm: from the model's final (post-norm) residual ``y = norm(h)`` it recovers the normalised
direction the translators must produce. :func:`probe_norm` measures the norm module the
lens itself applies (``lens.unembed.final_norm``, a copy of the model's) instead of
reading its ``weight`` attribute:

* it tests whether the module is invariant to a per-token shift (``norm(x + c) == norm(x)``:
  LayerNorm family, mean-centring) and to a positive per-token scale (both families);
* it then fits, per feature, the effective affine part ``y = gain * normalize(x) + bias``
  (so Gemma's ``(1 + w)`` gain or a LayerNorm bias come out as they are, whatever the
  parameter is called) and checks it on fresh inputs.

It returns ``None`` for any module that fails these checks (no norm, a norm with a zero
gain, or another kind); training then starts the KL phase from the identity (the logit
lens, tuned-lens's own start) and warns.
"""

from __future__ import annotations

import dataclasses

import torch

RMS = "rms"
LAYER = "layer"


@dataclasses.dataclass
class NormSpec:
    """A final norm ``y = gain * normalize(x) + bias`` of kind ``"rms"`` or ``"layer"``.

    ``gain, bias``: ``[d_model]`` float32 (the *effective* per-feature affine part).
    """

    kind: str
    gain: torch.Tensor
    bias: torch.Tensor

    def scale(self, h: torch.Tensor) -> torch.Tensor:
        """Per-token positive scale the norm divides by: ``[..., 1]`` (RMS, or centred std)."""
        if self.kind == LAYER:
            h = h - h.mean(-1, keepdim=True)
        return h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        """``h [..., d]`` -> the norm's normalised input (unit RMS; centred for LayerNorm)."""
        if self.kind == LAYER:
            h = h - h.mean(-1, keepdim=True)
        return h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()

    def target(self, y: torch.Tensor) -> torch.Tensor:
        """Invert the norm: ``y = norm(x) [..., d]`` -> ``normalize(x)`` (re-normalised, so
        that float error in ``y`` does not leak in). ``norm(target(norm(x))) == norm(x)``."""
        return self.normalize((y - self.bias.to(y.dtype)) / self.gain.to(y.dtype))


def _normalize(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == LAYER:
        x = x - x.mean(-1, keepdim=True)
    return x / x.pow(2).mean(-1, keepdim=True).sqrt()


@torch.no_grad()
def probe_norm(norm: torch.nn.Module | None, d_model: int, rtol: float = 1e-3) -> NormSpec | None:
    """Measure ``norm`` (a ``[..., d_model] -> [..., d_model]`` module); ``None`` if it is not
    an RMSNorm- or LayerNorm-family norm with an invertible gain (see the module docstring)."""
    if norm is None:
        return None
    param = next(iter(norm.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    gen = torch.Generator().manual_seed(0)

    def run(x: torch.Tensor) -> torch.Tensor:
        return norm(x.to(dtype).unsqueeze(0))[0].float()

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(((a - b).abs() <= rtol * (b.abs().max() + 1e-6)).all())

    try:
        # inputs with residual-like magnitudes (RMS ~30), far above any eps
        x = 30 * torch.randn(256, d_model, generator=gen) + 5 * torch.randn(256, 1, generator=gen)
        y = run(x)
        if y.shape != x.shape or not torch.isfinite(y).all():
            return None
        if not close(run(3.0 * x), y):
            return None  # not scale-invariant: not a norm we can invert
        kind = LAYER if close(run(x + 20 * torch.randn(256, 1, generator=gen)), y) else RMS
        z = _normalize(x, kind)
        # per-feature least squares y_j = gain_j * z_j + bias_j over the 256 samples
        zc, yc = z - z.mean(0), y - y.mean(0)
        gain = (zc * yc).sum(0) / zc.pow(2).sum(0)
        bias = y.mean(0) - gain * z.mean(0)
        if (gain.abs() < 1e-6).any():
            return None  # a zero gain cannot be inverted
        spec = NormSpec(kind, gain, bias if kind == LAYER else torch.zeros_like(bias))
        fresh = 10 * torch.randn(64, d_model, generator=gen) - 3.0
        if not close(spec.gain * _normalize(fresh, kind) + spec.bias, run(fresh)):
            return None
        return spec
    except (RuntimeError, TypeError, ValueError):
        return None

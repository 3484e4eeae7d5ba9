"""Encode, decode and splice an SAE into a forward pass (reconstruction + error term).

Every function takes a SAELens ``SAE`` (from :func:`replab.features.sae.load_sae`) and
activations ``x [..., d_in]`` at the SAE's hook; leading dimensions are free
(``[batch, pos, d]`` or ``[n, d]``).

The identity behind latent patching::

    x = decode(encode(x)) + error          # error = x - decode(encode(x)), exact
    x' = decode(z') + error                # z' = z with chosen latents replaced

so with the error term kept, the spliced model reproduces the clean forward exactly when
nothing is patched, and patching latents ``S`` changes the activation by exactly
``sum_{i in S} (z'_i - z_i) * d_i`` (``d_i`` = the effective decoder row of latent ``i``,
:func:`decoder_rows`). Positions outside ``positions`` are never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class Split(NamedTuple):
    """``x == recon + error`` (exactly, up to float rounding of one subtraction)."""

    latents: torch.Tensor   # [..., d_sae]
    recon: torch.Tensor     # [..., d_in]
    error: torch.Tensor     # [..., d_in]


def _as(x: torch.Tensor, sae) -> torch.Tensor:
    return x.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)


@torch.no_grad()
def sae_encode(sae, x: torch.Tensor) -> torch.Tensor:
    """Latent activations ``[..., d_sae]`` of ``x [..., d_in]`` (dense tensor)."""
    z = sae.encode(_as(x, sae))
    return z.to_dense() if z.is_sparse else z


@torch.no_grad()
def sae_decode(sae, latents: torch.Tensor) -> torch.Tensor:
    """Reconstruction ``[..., d_in]`` from latents ``[..., d_sae]`` (includes ``b_dec``)."""
    return sae.decode(_as(latents, sae))


@torch.no_grad()
def sae_split(sae, x: torch.Tensor) -> Split:
    """``Split(latents, recon, error)`` of ``x [..., d_in]``; ``recon + error == x``."""
    z = sae_encode(sae, x)
    recon = sae_decode(sae, z)
    return Split(z, recon, _as(x, sae) - recon)


def sae_splice(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reconstruction, error)`` of ``x [..., d_in]``; ``reconstruction + error == x``."""
    s = sae_split(sae, x)
    return s.recon, s.error


@torch.no_grad()
def decoder_rows(sae) -> torch.Tensor:
    """Effective decoder rows ``[d_sae, d_in]``: latent ``i`` at value ``a`` adds ``a * row_i``.

    Equals ``W_dec`` except for a TopK SAE with ``rescale_acts_by_decoder_norm``, whose
    decode divides by the row norm (SAEs saved by replab have that folded in already).
    """
    w = sae.W_dec.detach().float()
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        w = w / w.norm(dim=-1, keepdim=True)
    return w


def _pos_index(positions, n_pos: int):
    if positions is None:
        return slice(None)
    if isinstance(positions, slice):
        return positions
    idx = torch.as_tensor(list(positions) if not isinstance(positions, int) else [positions])
    return torch.where(idx < 0, idx + n_pos, idx)


def splice_hook(sae, keep_error: bool = False, positions: slice | Sequence[int] | None = None,
                cache: dict | None = None):
    """A TransformerLens forward hook that runs the activation through the SAE.

    Args:
        keep_error: add the error term back (the output then equals the input exactly;
            use it with ``cache`` to read latents without changing the model).
        positions: positions (of ``[batch, pos, d]`` activations) to splice; others keep
            the original activation. ``None`` = all.
        cache: if given, receives ``latents``, ``recon`` and ``error`` of the spliced positions.

    Use: ``model.run_with_hooks(tokens, fwd_hooks=[(hook_name, splice_hook(sae))])``.
    """
    def hook(act, hook=None):  # noqa: ARG001 - TransformerLens hook signature
        pos = _pos_index(positions, act.shape[1])
        s = sae_split(sae, act[:, pos])
        if cache is not None:
            cache.update(latents=s.latents, recon=s.recon, error=s.error)
        new = act.clone()
        new[:, pos] = (s.recon + s.error if keep_error else s.recon).to(act.dtype)
        return new

    return hook


def patch_latents_hook(sae, source_latents: torch.Tensor, latents: Sequence[int],
                       positions: slice | Sequence[int] | None = None, cache: dict | None = None):
    """A forward hook that patches chosen latents from a source run, keeping the error term.

    At the spliced positions the activation becomes ``decode(z') + error``, where ``z`` are
    this run's latents, ``z'`` equals ``z`` except ``z'[..., latents] =
    source_latents[..., latents]``, and ``error = act - decode(z)`` is this run's own error.

    Args:
        source_latents: latents of the source (e.g. clean) run at the same positions:
            ``[batch, n_spliced_pos, d_sae]`` (or anything broadcastable, e.g. ``[d_sae]``),
            typically ``sae_encode(sae, clean_act[:, positions])``.
        latents: latent indices to patch.
        positions: positions spliced (``None`` = all), as in :func:`splice_hook`.
        cache: if given, receives ``latents`` (before patching), ``patched`` and ``error``.

    With ``latents=[]`` the hook returns the activation unchanged (up to float rounding).
    """
    ids = torch.as_tensor(list(latents), dtype=torch.long)

    def hook(act, hook=None):  # noqa: ARG001 - TransformerLens hook signature
        pos = _pos_index(positions, act.shape[1])
        s = sae_split(sae, act[:, pos])
        z = s.latents.clone()
        if len(ids):
            src = _as(source_latents, sae).expand_as(z)
            z[..., ids] = src[..., ids]
        if cache is not None:
            cache.update(latents=s.latents, patched=z, error=s.error)
        new = act.clone()
        new[:, pos] = (sae_decode(sae, z) + s.error).to(act.dtype)
        return new

    return hook

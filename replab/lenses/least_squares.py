"""Phase 1 of tuned-lens training: one pass over the corpus, least-squares translators.

For each layer ``l`` we fit the ridge-regularised affine map ``W [d + 1, d]`` with

    [h_l / s(h_l), 1 / s(h_l)] @ W  ~  t = norm.target(hidden_states[-1])

where ``norm`` is the model's own final norm as measured by
:func:`replab.lenses.norms.probe_norm` (RMSNorm or LayerNorm family, any gain/bias),
``t`` is the normalised input that norm must have seen to produce the model's final
residual (``norm(t) == hidden_states[-1]``), and ``s`` is the per-token scale that norm
divides by (RMS, or the centred standard deviation for LayerNorm). Because the norm is
invariant to that scale (and, for LayerNorm, to a shift), a translator output
``h' = h W[:d] + W[d]`` with ``h' / s ~ t`` decodes, after the final norm, to about the
model's final residual. Dividing by ``s`` weights every position equally (SmolLM2's first
token has residual norm ~2e4). Ridge shrinks towards the identity (``W[:d] = I``,
``W[d] = 0``: the logit lens). Cost: normal equations ``[d + 1, d + 1]`` per layer and one
model forward per token; no unembedding.

The same pass caches a random pool of positions' hidden states (all layers) for the KL
phase, and the first chunks' positions as a validation set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from replab._progress import progress_bar
from replab.errors import ReplabError
from replab.lenses.norms import NormSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: positions per batch on which the progress bar's residual is measured
RESIDUAL_ROWS = 64
#: times the running solution is refreshed for the progress bar (besides the final solve)
REFRESHES = 3


def design(h: torch.Tensor, spec: NormSpec) -> torch.Tensor:
    """``h [n, d]`` -> regression inputs ``[h / s, 1 / s] [n, d + 1]`` (float64)."""
    s = spec.scale(h)
    return torch.cat([h / s, 1.0 / s], dim=-1).double()


def ridge_solve(xtx: torch.Tensor, xty: torch.Tensor, ridge: float) -> torch.Tensor:
    """``xtx [L, d+1, d+1], xty [L, d+1, d]`` -> ``W [L, d+1, d]``, ridge towards the identity
    (``ridge`` is relative to the mean diagonal of each layer's ``X^T X``)."""
    d = xty.shape[-1]
    prior = torch.zeros(d + 1, d, dtype=torch.float64)
    prior[:d] = torch.eye(d, dtype=torch.float64)
    eye = torch.eye(d + 1, dtype=torch.float64)
    out = torch.empty_like(xty)
    for layer in range(len(xtx)):
        lam = ridge * xtx[layer].diagonal().mean()
        out[layer] = torch.linalg.solve(xtx[layer] + lam * eye, xty[layer] + lam * prior)
    return out


def identity_maps(n_layers: int, d: int) -> torch.Tensor:
    """``W [L, d+1, d]`` of the identity translators (the logit lens)."""
    w = torch.zeros(n_layers, d + 1, d, dtype=torch.float64)
    w[:, :d] = torch.eye(d, dtype=torch.float64)
    return w


def relative_residual(w: torch.Tensor, xs: list[torch.Tensor], t: torch.Tensor) -> float:
    """Mean over layers of ``|x W_l - t|^2 / |t|^2`` (``xs[l] [n, d+1]``, ``t [n, d]``)."""
    t = t.double()
    den = t.pow(2).sum().clamp_min(1e-12)
    return float(sum(((x @ w[i] - t).pow(2).sum() / den).item() for i, x in enumerate(xs)) / len(xs))


def check_final_is_output(hf_model: PreTrainedModel, ids: torch.Tensor, out) -> None:
    """ReplabError unless the model's logits are ``lm_head(hidden_states[-1])`` (what the
    tuned lens decodes at the last point and what training matches), e.g. no logit soft cap."""
    head = hf_model.get_output_embeddings()
    got = head(out.hidden_states[-1]).float()
    ref = out.logits.float()
    if got.shape != ref.shape or (got - ref).abs().max() > 1e-3 * ref.abs().max() + 1e-4:
        raise ReplabError("this model's logits are not lm_head(hidden_states[-1]) (a logit soft "
                          "cap or an extra output transform?): the tuned-lens trainer cannot use it")


@torch.no_grad()
def fit_phase(hf_model: PreTrainedModel, chunks: torch.Tensor, cfg, progress: bool = True, n_val_chunks: int = 0,
              spec: NormSpec | None = None):
    """One pass over ``chunks [n, seq_len]``: normal equations, KL pool, validation positions.

    The first ``n_val_chunks`` chunks are held out: they add nothing to the normal
    equations and all their positions go to the validation set. With ``spec=None`` (a final
    norm :func:`replab.lenses.norms.probe_norm` cannot invert) no normal equations are built.
    The progress bar's loss is the mean relative residual ``|x W - t|^2 / |t|^2`` over layers
    of the current solution (the identity, then re-solved ``REFRESHES`` times) on each new
    batch *before* it is added (``RESIDUAL_ROWS`` positions).

    Returns ``(xtx [L, d+1, d+1] | None, xty [L, d+1, d] | None, pool [n, L+1, d],
    val [m, L+1, d], n_fit_tokens)``; ``pool[:, L]`` is HF ``hidden_states[-1]`` (post-norm).
    """
    gen = torch.Generator().manual_seed(cfg.seed)          # the KL pool
    gen_sub = torch.Generator().manual_seed(cfg.seed + 3)  # the progress bar's residual rows
    n_layers, d = hf_model.config.num_hidden_layers, hf_model.config.hidden_size
    fit = spec is not None
    xtx = torch.zeros(n_layers, d + 1, d + 1, dtype=torch.float64) if fit else None
    xty = torch.zeros(n_layers, d + 1, d, dtype=torch.float64) if fit else None
    w_now = identity_maps(n_layers, d) if fit else None
    pool, val, n_tok = [], [], 0
    starts = ([0] if n_val_chunks else []) + list(range(n_val_chunks, len(chunks), cfg.batch_size))
    n_fit = len(starts) - (1 if n_val_chunks else 0)
    refresh_at = {max(1, round(n_fit * k / (REFRESHES + 1))) for k in range(1, REFRESHES + 1)}
    label = "least squares (loss: residual)" if fit else "cache hidden states (no least squares)"
    with progress_bar(chunks.numel(), label, "tok", enabled=progress, show_loss=fit) as bar:
        for b, start in enumerate(starts):
            is_val = b == 0 and n_val_chunks > 0
            ids = chunks[start:start + (n_val_chunks if is_val else cfg.batch_size)]
            if b == 0:  # the full model once: its logits must be lm_head(last hidden state)
                out = hf_model(input_ids=ids, output_hidden_states=True)
                check_final_is_output(hf_model, ids, out)
            else:
                out = hf_model.base_model(input_ids=ids, output_hidden_states=True)
            hs = [h.reshape(-1, d).float() for h in out.hidden_states]
            if is_val:
                val.append(torch.stack(hs, dim=1))
                bar.advance(ids.numel())
                continue
            loss = None
            if fit:
                target = spec.target(hs[-1])
                xs = [design(hs[layer], spec) for layer in range(n_layers)]
                sub = torch.randperm(len(target), generator=gen_sub)[:RESIDUAL_ROWS]
                loss = relative_residual(w_now, [x[sub] for x in xs], target[sub])
                for layer, x in enumerate(xs):
                    xtx[layer] += x.T @ x
                    xty[layer] += x.T @ target.double()
                n_fit_done = b + 1 - (1 if n_val_chunks else 0)
                if n_fit_done in refresh_at and n_fit_done < n_fit:
                    w_now = ridge_solve(xtx, xty, cfg.ridge)
            keep = torch.rand(len(hs[-1]), generator=gen) < cfg.pool_fraction
            pool.append(torch.stack([h[keep] for h in hs], dim=1))
            n_tok += ids.numel()
            bar.advance(ids.numel(), loss=loss)
    if not pool:
        raise ReplabError("no training chunks left after the validation chunks")
    val = torch.cat(val) if val else torch.zeros(0, n_layers + 1, d)
    return xtx, xty, torch.cat(pool), val, n_tok


def set_translators(lens, w: torch.Tensor) -> None:
    """Set translator ``l`` to ``h + A h + b`` with ``A = W_l[:d]^T - I``, ``b = W_l[d]``."""
    d = w.shape[-1]
    eye = torch.eye(d, dtype=torch.float64)
    for layer, translator in enumerate(lens):
        translator.weight.data.copy_((w[layer, :d].T - eye).float())
        translator.bias.data.copy_(w[layer, d].float())


def solve_translators(lens, xtx: torch.Tensor, xty: torch.Tensor, ridge: float) -> None:
    """Set each translator to the ridge least-squares affine map (ridge pulls towards identity)."""
    set_translators(lens, ridge_solve(xtx, xty, ridge))

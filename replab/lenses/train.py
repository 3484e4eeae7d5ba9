"""Train a tuned lens (tuned-lens's ``TunedLens``) on CPU within minutes.

The per-layer unembedding (``d_model x d_vocab`` = 576 x 49152 for SmolLM2) dominates
the cost of KL training: about 0.11 GFLOP per token per layer for forward + backward,
so plain KL training sees only a few thousand tokens in 20 CPU minutes. We therefore
train in two phases, both on the HF model's hidden states (``hidden_states[l]`` = input
of block ``l``, the tuned-lens convention; translator ``l`` reads it):

1. **least squares** (cheap, many tokens; :mod:`replab.lenses.least_squares`): for each
   layer, the ridge-regularised least-squares affine map from the normalised hidden state
   to the input the model's *own* final norm must see to produce the model's final
   residual (the norm is measured by :func:`replab.lenses.norms.probe_norm`: RMSNorm or
   LayerNorm family, any gain and bias). Ridge shrinks towards the identity (the logit
   lens). For a final norm it cannot invert, training warns and starts phase 2 from the
   identity (tuned-lens's own start).
2. **kl** (expensive, few positions): the objective of the tuned-lens paper and of
   tuned-lens's own training loop (``tuned_lens/scripts/train_loop.py``, ``--loss kl``:
   ``sum(p_final * (log p_final - log p_lens)).mean()`` per layer, summed over layers),
   minimised with Adam from the phase-1 translators, on a pool of positions whose hidden
   states were cached during phase 1 (no further model forwards). The saved lens is the
   result of this phase for every layer; phase 1 is only its initialisation.

Why initialise with least squares: from the identity (the logit lens) a few dozen KL
steps barely move SmolLM2's validation KL, while the least-squares map starts more than
ten times lower (``bench/bench_lens.py --compare-init``; numbers in ``docs/lenses.md``).
Per-layer validation KL after each phase is recorded in the artifact's ``replab.json``.

Shapes: ``hidden [n_pos, n_layers + 1, d_model]`` (pool), translators are
``nn.Linear(d_model, d_model)`` applied residually (``h + A h + b``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING

import torch

from replab._progress import progress_bar
from replab.errors import ReplabError
from replab.lenses.least_squares import fit_phase, solve_translators
from replab.lenses.norms import probe_norm
from replab.prompts.corpus import read_corpus, token_chunks

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclasses.dataclass
class TrainConfig:
    """Hyperparameters of :func:`train_tuned_lens` (all recorded in the artifact)."""

    corpus: str = "builtin"
    seq_len: int = 128
    fit_tokens: int = 16384      # tokens through the model for the least-squares phase
    pool_fraction: float = 0.125  # fraction of fit positions cached for the KL phase
    val_positions: int = 256     # held-out positions: per-layer validation KL after each phase
    steps: int = 30              # Adam steps of the KL phase (0: least squares only)
    batch_positions: int = 32    # positions per KL step (each goes through every layer)
    lr: float = 1e-4
    ridge: float = 1e-3          # relative to the mean diagonal of X^T X
    batch_size: int = 8          # sequences per model forward in phase 1
    seed: int = 0

    def __post_init__(self):
        if self.fit_tokens < self.seq_len:
            raise ReplabError(f"--tokens ({self.fit_tokens}) must be at least seq_len ({self.seq_len})")
        if self.steps < 0 or self.batch_positions < 1 or self.lr <= 0 or self.ridge < 0:
            raise ReplabError("steps >= 0, batch_positions >= 1, lr > 0 and ridge >= 0 are required")
        if not 0 < self.pool_fraction <= 1:
            raise ReplabError("pool_fraction must be in (0, 1]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def lens_kl(lens, pool: torch.Tensor, layer: int, target_logp: torch.Tensor) -> torch.Tensor:
    """Mean ``KL(p_final || p_lens)`` in nats over the pool positions of one layer."""
    logq = lens(pool[:, layer], idx=layer).log_softmax(-1)
    return (target_logp.exp() * (target_logp - logq)).sum(-1).mean()


def final_logp(lens, pool: torch.Tensor) -> torch.Tensor:
    """Final log-probs of pool positions: ``log_softmax(W_U hidden_states[-1])`` [n, vocab]."""
    return lens.unembed.unembedding(pool[:, -1]).float().log_softmax(-1)


@torch.no_grad()
def per_layer_kl(lens, pool: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``[n_layers]`` mean KL of every translator on ``pool`` (chunked to bound memory)."""
    n_layers = pool.shape[1] - 1
    total = torch.zeros(n_layers, dtype=torch.float64)
    for s in range(0, len(pool), chunk):
        part = pool[s:s + chunk]
        tgt = final_logp(lens, part)
        for layer in range(n_layers):
            total[layer] += lens_kl(lens, part, layer, tgt).item() * len(part)
    return total / len(pool)


def kl_phase(lens, train_pool: torch.Tensor, cfg: TrainConfig, progress: bool = True) -> list[float]:
    """Phase 2: Adam on ``sum_l KL_l`` over random batches of pool positions; returns losses."""
    if cfg.steps == 0 or len(train_pool) == 0:
        return []
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    params = [p for t in lens for p in t.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    n_layers, losses = len(lens), []
    with progress_bar(cfg.steps, "kl (tuned-lens objective)", "step", enabled=progress,
                      show_loss=True) as bar:
        for _ in range(cfg.steps):
            idx = torch.randint(len(train_pool), (cfg.batch_positions,), generator=gen)
            part = train_pool[idx]
            with torch.no_grad():
                tgt = final_logp(lens, part)
            total = 0.0
            for layer in range(n_layers):
                loss = lens_kl(lens, part, layer, tgt)
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            losses.append(total / n_layers)
            bar.advance(1, loss=losses[-1])
    return losses


def train_tuned_lens(hf_model: PreTrainedModel, tokenizer, cfg: TrainConfig | None = None, progress: bool = True):
    """Train a tuned lens for ``hf_model`` on ``cfg.corpus``.

    Returns:
        ``(lens, stats)``: a ``tuned_lens.nn.TunedLens`` and a dict with timings, token
        counts, ``init`` (``"least_squares"``, or ``"identity"`` when the final norm is not
        one :func:`replab.lenses.norms.probe_norm` handles; then a warning is issued),
        ``final_norm`` (``"rms"``/``"layer"``/None), per-layer validation KL
        (``val_kl_logit``: the logit lens; ``val_kl_least_squares``: after the
        initialisation; ``val_kl_tuned``: the saved lens, after the KL phase) and the KL
        losses per step.
    """
    import warnings

    from tuned_lens.nn.lenses import TunedLens

    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    cpu0 = _cpu_seconds()
    hf_model.eval()
    hf_model.requires_grad_(False)
    t0 = time.perf_counter()
    # validation chunks come first and are extra to the fit budget
    n_val_chunks = max(1, math.ceil(cfg.val_positions / cfg.seq_len))
    budget = cfg.fit_tokens + n_val_chunks * cfg.seq_len
    chunks = token_chunks(read_corpus(cfg.corpus), tokenizer, cfg.seq_len, budget, cfg.seed)
    if len(chunks) <= n_val_chunks:
        raise ReplabError(f"the corpus has too few tokens ({chunks.numel()}) to train and validate")
    lens = TunedLens.from_model(hf_model)
    spec = probe_norm(lens.unembed.final_norm, hf_model.config.hidden_size)
    if spec is None:
        warnings.warn(f"the final norm ({type(lens.unembed.final_norm).__name__}) is neither an "
                      "RMSNorm- nor a LayerNorm-family norm replab can invert: skipping the "
                      "least-squares initialisation; the KL phase starts from the identity "
                      "(the logit lens), which needs far more --steps", stacklevel=2)
    xtx, xty, train_pool, val, n_tok = fit_phase(hf_model, chunks, cfg, progress, n_val_chunks,
                                                 spec)
    t_fit = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    val = val[torch.randperm(len(val), generator=gen)[:cfg.val_positions]]
    n_val = len(val)
    kl_logit = per_layer_kl(lens, val)  # translators are zero: this is the logit lens
    if spec is not None:
        solve_translators(lens, xtx, xty, cfg.ridge)
    kl_fit = per_layer_kl(lens, val) if spec is not None else kl_logit.clone()
    t1 = time.perf_counter()
    losses = kl_phase(lens, train_pool, cfg, progress)
    kl_final = per_layer_kl(lens, val) if losses else kl_fit.clone()
    stats = {
        "fit_tokens": n_tok,
        "kl_positions_seen": len(losses) * cfg.batch_positions,
        "pool_positions": len(train_pool),
        "val_positions": n_val,
        "init": "least_squares" if spec is not None else "identity",
        "final_norm": None if spec is None else spec.kind,
        "seconds_fit": round(t_fit, 1),
        "seconds_kl": round(time.perf_counter() - t1, 1),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(_cpu_seconds() - cpu0, 1),
        "torch_threads": torch.get_num_threads(),
        "val_kl_logit": [round(v, 5) for v in kl_logit.tolist()],
        "val_kl_least_squares": [round(v, 5) for v in kl_fit.tolist()],
        "val_kl_tuned": [round(v, 5) for v in kl_final.tolist()],
        "final_phase": "kl" if losses else ("least_squares" if spec is not None else "identity"),
        "kl_losses": [round(v, 5) for v in losses],
    }
    return lens, stats

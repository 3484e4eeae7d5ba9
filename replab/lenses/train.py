"""Train a tuned lens (tuned-lens's ``TunedLens``) on CPU within minutes.

The per-layer unembedding (``d_model x d_vocab`` = 576 x 49152 for SmolLM2) dominates
the cost of KL training: about 0.11 GFLOP per token per layer for forward + backward,
so plain KL training sees only a few thousand tokens in 20 CPU minutes. We therefore
train in two phases, both on the HF model's hidden states (``hidden_states[l]`` = input
of block ``l``, the tuned-lens convention; translator ``l`` reads it):

1. **fit** (cheap, many tokens): for each layer, the ridge-regularised least-squares
   affine map from the RMS-normalised hidden state ``[h_l / r_l, 1 / r_l]`` to the
   normalised final residual ``hidden_states[-1] / g`` (``g`` = final-norm weight,
   ``r`` = per-token RMS), i.e. a weighted affine regression whose output, after the
   final norm, approximates the model's final residual direction. Ridge shrinks towards
   the identity (the logit lens). It needs only normal equations (577 x 577 per layer)
   and one model forward per token; no unembedding.
2. **kl** (expensive, few positions): the objective of the tuned-lens paper and of
   tuned-lens's own training loop (``tuned_lens/scripts/train_loop.py``, ``--loss kl``:
   ``sum(p_final * (log p_final - log p_lens)).mean()`` per layer, summed over layers),
   minimised with Adam from the phase-1 translators, on a pool of positions whose hidden
   states were cached during phase 1 (no further model forwards). The saved lens is the
   result of this phase for every layer; phase 1 is only its initialisation.

Why initialise with least squares: from the identity (the logit lens; tuned-lens's own
start) the default 30 KL steps lower SmolLM2's mean validation KL only from 16.2 to 12.0
nats, while the least-squares map starts at ~1.3 and the same steps lower it further
(``bench/bench_lens.py --compare-init``). Per-layer validation KL after each phase is
recorded in the artifact's ``replab.json``; numbers in ``docs/lenses.md``.

Shapes: ``hidden [n_pos, n_layers + 1, d_model]`` (pool), translators are
``nn.Linear(d_model, d_model)`` applied residually (``h + A h + b``).
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from replab.errors import ReplabError
from replab._progress import progress_bar


@dataclasses.dataclass
class TrainConfig:
    """Hyperparameters of :func:`train_tuned_lens` (all recorded in the artifact)."""

    corpus: str = "builtin"
    seq_len: int = 128
    fit_tokens: int = 16384      # tokens through the model for the least-squares phase
    pool_fraction: float = 0.125  # fraction of fit positions cached for the KL phase
    val_positions: int = 256     # cached positions held out for per-layer model selection
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


def _rms(h: torch.Tensor) -> torch.Tensor:
    return h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


@torch.no_grad()
def fit_phase(hf_model, chunks: torch.Tensor, cfg: TrainConfig, progress: bool = True,
              n_val_chunks: int = 0):
    """Phase 1: accumulate normal equations, cache a pool of positions.

    The first ``n_val_chunks`` chunks are held out: they add nothing to the normal
    equations and all their positions go to the validation pool.

    Returns ``(xtx [L, d+1, d+1], xty [L, d+1, d], pool [n, L + 1, d], val [m, L + 1, d],
    n_fit_tokens)`` where ``L`` = n_layers and ``pool[:, L]`` is the final *post-norm*
    residual (HF ``hidden_states[-1]``).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    g = _final_norm_weight(hf_model)
    n_layers = hf_model.config.num_hidden_layers
    d = hf_model.config.hidden_size
    xtx = torch.zeros(n_layers, d + 1, d + 1, dtype=torch.float64)
    xty = torch.zeros(n_layers, d + 1, d, dtype=torch.float64)
    pool, val, n_tok = [], [], 0
    with progress_bar(chunks.numel(), "fit (least squares)", "tok", enabled=progress,
                      show_loss=True) as bar:
        starts = [0] if n_val_chunks else []
        starts += list(range(n_val_chunks, len(chunks), cfg.batch_size))
        for start in starts:
            is_val = start == 0 and n_val_chunks > 0
            ids = chunks[start:start + (n_val_chunks if is_val else cfg.batch_size)]
            hs = hf_model.model(input_ids=ids, output_hidden_states=True).hidden_states
            bar.advance(ids.numel())
            if is_val:
                val.append(torch.stack([h.reshape(-1, d) for h in hs], dim=1))
                continue
            final = hs[-1].reshape(-1, d)
            target = (final / g) / _rms(final / g)
            for layer in range(n_layers):
                h = hs[layer].reshape(-1, d)
                r = _rms(h)
                x = torch.cat([h / r, 1.0 / r], dim=-1).double()
                xtx[layer] += x.T @ x
                xty[layer] += x.T @ target.double()
            keep = torch.rand(final.shape[0], generator=gen) < cfg.pool_fraction
            pool.append(torch.stack([h.reshape(-1, d)[keep] for h in hs], dim=1))
            n_tok += ids.numel()
    val = torch.cat(val) if val else torch.zeros(0, n_layers + 1, d)
    return xtx, xty, torch.cat(pool), val, n_tok


def solve_translators(lens, xtx: torch.Tensor, xty: torch.Tensor, ridge: float) -> None:
    """Set each translator to the ridge least-squares affine map (ridge pulls towards identity)."""
    d = xty.shape[-1]
    prior = torch.zeros(d + 1, d, dtype=torch.float64)
    prior[:d] = torch.eye(d, dtype=torch.float64)
    for layer, translator in enumerate(lens):
        a = xtx[layer]
        lam = ridge * a.diagonal().mean()
        w = torch.linalg.solve(a + lam * torch.eye(d + 1, dtype=torch.float64),
                               xty[layer] + lam * prior)
        # h' = h + A h + b  with  A = W[:d]^T - I,  b = W[d]
        translator.weight.data.copy_((w[:d].T - torch.eye(d, dtype=torch.float64)).float())
        translator.bias.data.copy_(w[d].float())


def _final_norm_weight(hf_model) -> torch.Tensor:
    from tuned_lens import model_surgery

    norm = model_surgery.get_final_norm(hf_model)
    w = getattr(norm, "weight", None)
    if w is None:
        return torch.ones(hf_model.config.hidden_size)
    if (w.abs() < 1e-8).any():
        raise ReplabError("the final norm has zero weights; the least-squares phase cannot invert it")
    return w.detach().float()


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


def train_tuned_lens(hf_model, tokenizer, cfg: TrainConfig | None = None, progress: bool = True):
    """Train a tuned lens for ``hf_model`` on ``cfg.corpus``.

    Returns:
        ``(lens, stats)``: a ``tuned_lens.nn.TunedLens`` and a dict with timings, token
        counts, per-layer validation KL (``val_kl_logit``: the logit lens;
        ``val_kl_least_squares``: after the initialisation; ``val_kl_tuned``: the saved
        lens, after the KL phase) and the KL losses per step.
    """
    from tuned_lens.nn.lenses import TunedLens

    from replab.lenses.corpus import read_corpus, token_chunks

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
    xtx, xty, train_pool, val, n_tok = fit_phase(hf_model, chunks, cfg, progress, n_val_chunks)
    t_fit = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    val = val[torch.randperm(len(val), generator=gen)[:cfg.val_positions]]
    n_val = len(val)
    kl_logit = per_layer_kl(lens, val)  # translators are zero: this is the logit lens
    solve_translators(lens, xtx, xty, cfg.ridge)
    kl_fit = per_layer_kl(lens, val)    # after the least-squares initialisation
    t1 = time.perf_counter()
    losses = kl_phase(lens, train_pool, cfg, progress)
    kl_final = per_layer_kl(lens, val) if losses else kl_fit.clone()
    stats = {
        "fit_tokens": n_tok,
        "kl_positions_seen": len(losses) * cfg.batch_positions,
        "pool_positions": len(train_pool),
        "val_positions": n_val,
        "seconds_fit": round(t_fit, 1),
        "seconds_kl": round(time.perf_counter() - t1, 1),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(_cpu_seconds() - cpu0, 1),
        "torch_threads": torch.get_num_threads(),
        "val_kl_logit": [round(v, 5) for v in kl_logit.tolist()],
        "val_kl_least_squares": [round(v, 5) for v in kl_fit.tolist()],
        "val_kl_tuned": [round(v, 5) for v in kl_final.tolist()],
        "final_phase": "kl" if losses else "least_squares",
        "kl_losses": [round(v, 5) for v in losses],
    }
    return lens, stats

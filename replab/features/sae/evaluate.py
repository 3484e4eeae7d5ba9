"""SAE quality on held-out text: L0, FVU, CE loss recovered, ΔCE, KL, dead and dense latents.

Definitions (``docs/features.md``). Windows ``[n, seq_len]`` of held-out text are run
from their first token; the first ``skip_first`` positions (default 1: SmolLM2 has no BOS
and position 0 is an attention sink with a ~100x larger residual) are *not spliced* and
*not scored*. ``S`` below is the set of positions ``p >= skip_first``.

* ``l0`` — mean number of non-zero latents per token of ``S``.
* ``fvu`` — fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``
  over ``S`` (mean over all scored tokens); ``explained_variance = 1 - fvu`` (SAELens's
  ``explained_variance``).
* ``ce_clean`` / ``ce_sae`` / ``ce_zero`` — mean next-token cross-entropy (nats) of the
  predictions made at positions ``skip_first .. seq_len-2``, with the hook untouched, with
  ``x`` replaced by the SAE reconstruction at ``S``, and with ``x`` zeroed at ``S``.
* ``ce_loss_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)``; ``delta_ce = ce_sae - ce_clean``.
* ``kl_sae`` / ``kl_zero`` — mean ``KL(p_clean || p_spliced)`` (nats) over ``S``;
  ``kl_div_score = (kl_zero - kl_sae) / kl_zero`` (SAELens's name).
* per latent: ``frequency`` = fraction of tokens of ``S`` where it is non-zero. **Dead**:
  ``frequency <= dead_threshold`` (default 0: never fires on the evaluated tokens).
  **Dense**: ``frequency > dense_threshold`` (default 0.1: fires on more than 1 token in 10).

With ``skip_first=0`` every number equals SAELens's ``run_evals`` on the same tokens
(``exclude_special_tokens=False``); ``tests/test_sae_eval.py`` checks that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from replab._progress import progress_bar
from replab.errors import ReplabError
from replab.features.sae.splice import sae_split
from replab.hooks import parse_hook_name

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

DEAD_THRESHOLD = 0.0
DENSE_THRESHOLD = 0.1


def _continue_from(model: HookedTransformer, hook_name: str, tokens: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
    """Logits with the hook's activation replaced by ``x_new``.

    For ``resid_pre`` / ``resid_post`` hooks the forward restarts at the next block from
    ``x_new`` (``start_at_layer``), skipping the unchanged blocks before it.
    """

    alias, layer = parse_hook_name(hook_name)
    start = {"resid_pre": layer, "resid_post": None if layer is None else layer + 1}.get(alias)
    if start is not None and 0 < start < model.cfg.n_layers:
        return model(x_new, start_at_layer=start)
    if start == model.cfg.n_layers:
        return model.unembed(model.ln_final(x_new))

    def put(act, hook):  # noqa: ARG001
        return x_new.to(act.dtype)

    return model.run_with_hooks(tokens, fwd_hooks=[(hook_name, put)])


class _Acc:
    """Streaming sums in float64."""

    def __init__(self, d: int, d_sae: int):
        self.n = 0
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_sq = self.sum_res = self.sum_l0 = self.sum_cos = 0.0
        self.count = torch.zeros(d_sae, dtype=torch.float64)
        self.total = torch.zeros(d_sae, dtype=torch.float64)
        self.max = torch.zeros(d_sae, dtype=torch.float64)
        self.n_pred = self.n_kl = 0
        self.ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
        self.kl = {"sae": 0.0, "zero": 0.0}

    def add_acts(self, x, xh, z):
        x, xh, z = x.double(), xh.double(), z.double()
        self.n += len(x)
        self.sum_x += x.sum(0)
        self.sum_sq += x.pow(2).sum().item()
        self.sum_res += (x - xh).pow(2).sum().item()
        self.sum_cos += torch.nn.functional.cosine_similarity(x, xh, dim=-1).sum().item()
        active = z != 0
        self.sum_l0 += active.sum().item()
        self.count += active.sum(0)
        self.total += z.sum(0)
        self.max = torch.maximum(self.max, z.max(0).values)


def _ce(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Sum of next-token CE of ``logp [b, pos, V]`` (positions 0..pos-2)."""
    return -logp[:, :-1].gather(-1, tokens[:, 1:, None]).sum()


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return (logp.exp() * (logp - logq)).sum(-1).sum()


@torch.no_grad()
def evaluate_sae(sae, model: HookedTransformer, hook_name: str, windows: torch.Tensor, skip_first: int = 1,
                 batch_size: int = 4, dead_threshold: float = DEAD_THRESHOLD,
                 dense_threshold: float = DENSE_THRESHOLD, progress: bool = False
                 ) -> tuple[dict, pd.DataFrame]:
    """Score an SAE spliced into ``model`` at ``hook_name`` on token ``windows [n, seq_len]``.

    Returns:
        ``(metrics, latents)``: ``metrics`` has ``l0, fvu, explained_variance, mse, cossim,
        ce_clean, ce_sae, ce_zero, ce_loss_recovered, delta_ce, kl_sae, kl_zero,
        kl_div_score, dead_latents, dense_latents, frac_dead, frac_dense, tokens,
        predictions``; ``latents`` has one row per latent: ``latent, frequency,
        mean_activation`` (mean over tokens where it fires), ``max_activation, dead, dense``.
    """

    windows = torch.as_tensor(windows, dtype=torch.long)
    if windows.ndim != 2 or windows.shape[1] < skip_first + 2:
        raise ReplabError(f"need windows [n, seq_len > skip_first + 1], got {tuple(windows.shape)}")
    acc = _Acc(int(sae.cfg.d_in), int(sae.cfg.d_sae))
    with progress_bar(windows.numel(), "evaluate SAE", "tok", enabled=progress) as bar:
        for s in range(0, len(windows), batch_size):
            tokens = windows[s:s + batch_size].to(model.cfg.device)
            box = {}

            def grab(act, hook, box=box):  # noqa: ARG001
                box["x"] = act.detach().clone()

            clean = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, grab)])
            x = box["x"]
            if x.shape[-1] != sae.cfg.d_in:
                raise ReplabError(f"SAE width {sae.cfg.d_in} != activation width {x.shape[-1]} at {hook_name}")
            sp = sae_split(sae, x[:, skip_first:])
            acc.add_acts(x[:, skip_first:].reshape(-1, x.shape[-1]), sp.recon.reshape(-1, x.shape[-1]),
                         sp.latents.reshape(-1, sp.latents.shape[-1]))
            x_sae, x_zero = x.clone(), x.clone()
            x_sae[:, skip_first:] = sp.recon.to(x.dtype)
            x_zero[:, skip_first:] = 0
            lp = {"clean": clean.float().log_softmax(-1),
                  "sae": _continue_from(model, hook_name, tokens, x_sae).float().log_softmax(-1),
                  "zero": _continue_from(model, hook_name, tokens, x_zero).float().log_softmax(-1)}
            for key, logp in lp.items():
                acc.ce[key] += _ce(logp[:, skip_first:], tokens[:, skip_first:]).item()
            for key in ("sae", "zero"):
                acc.kl[key] += _kl(lp["clean"][:, skip_first:], lp[key][:, skip_first:]).item()
            acc.n_pred += tokens[:, skip_first + 1:].numel()
            acc.n_kl += tokens[:, skip_first:].numel()
            bar.advance(tokens.numel())
    return _finish(acc, dead_threshold, dense_threshold)


def _finish(acc: _Acc, dead_threshold: float, dense_threshold: float) -> tuple[dict, pd.DataFrame]:
    n = acc.n
    total_var = acc.sum_sq / n - (acc.sum_x / n).pow(2).sum().item()
    mse = acc.sum_res / n
    fvu = mse / total_var if total_var > 0 else float("nan")
    ce = {k: v / acc.n_pred for k, v in acc.ce.items()}
    kl = {k: v / acc.n_kl for k, v in acc.kl.items()}
    freq = (acc.count / n).cpu().numpy()
    mean_act = np.where(acc.count.cpu().numpy() > 0, (acc.total / acc.count.clamp_min(1)).cpu().numpy(), 0.0)
    latents = pd.DataFrame({"latent": np.arange(len(freq)), "frequency": freq,
                            "mean_activation": mean_act, "max_activation": acc.max.cpu().numpy(),
                            "dead": freq <= dead_threshold, "dense": freq > dense_threshold})
    denom = ce["zero"] - ce["clean"]
    metrics = {
        "l0": acc.sum_l0 / n, "fvu": fvu, "explained_variance": 1 - fvu, "mse": mse,
        "cossim": acc.sum_cos / n,
        "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["sae"]) / denom if denom != 0 else float("nan"),
        "delta_ce": ce["sae"] - ce["clean"],
        "kl_sae": kl["sae"], "kl_zero": kl["zero"],
        "kl_div_score": (kl["zero"] - kl["sae"]) / kl["zero"] if kl["zero"] > 0 else float("nan"),
        "dead_latents": int(latents["dead"].sum()), "dense_latents": int(latents["dense"].sum()),
        "frac_dead": float(latents["dead"].mean()), "frac_dense": float(latents["dense"].mean()),
        "dead_threshold": dead_threshold, "dense_threshold": dense_threshold,
        "tokens": int(n), "predictions": int(acc.n_pred),
    }
    return metrics, latents

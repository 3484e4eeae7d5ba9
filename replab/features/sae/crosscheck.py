"""Cross-check replab's SAE metrics against SAELens's own ``sae_lens.evals.run_evals``.

Both run on the *same* token windows with every position scored (``skip_first=0`` here,
``exclude_special_tokens=False`` there), since ``run_evals`` has no way to skip a position.
On SmolLM2 that includes position 0, the attention sink outside the SAE's training
distribution, so these numbers are an implementation check, not the headline metrics
(which skip it). ``replab sae eval --sae-lens`` stores the pairs in ``eval.json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from replab.errors import ReplabError
from replab.features.sae.evaluate import evaluate_sae

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

#: replab metric -> (run_evals section, key)
PAIRS = {"ce_clean": ("model_performance_preservation", "ce_loss_without_sae"),
         "ce_sae": ("model_performance_preservation", "ce_loss_with_sae"),
         "ce_zero": ("model_performance_preservation", "ce_loss_with_ablation"),
         "ce_loss_recovered": ("model_performance_preservation", "ce_loss_score"),
         "kl_sae": ("model_behavior_preservation", "kl_div_with_sae"),
         "kl_zero": ("model_behavior_preservation", "kl_div_with_ablation"),
         "kl_div_score": ("model_behavior_preservation", "kl_div_score"),
         "l0": ("sparsity", "l0"),
         "explained_variance": ("reconstruction_quality", "explained_variance"),
         "mse": ("reconstruction_quality", "mse"),
         "cossim": ("reconstruction_quality", "cossim")}


class _TokenStore:
    """Just enough of SAELens's ``ActivationsStore`` for ``run_evals``: fixed token batches."""

    def __init__(self, windows: torch.Tensor, batch: int):
        self.w, self.i, self.context_size, self.store_batch_size_prompts = windows, 0, windows.shape[1], batch

    def get_batch_tokens(self, n=None):
        n = n or self.store_batch_size_prompts
        out, self.i = self.w[self.i:self.i + n], self.i + n
        return out

    def reset_input_dataset(self):
        self.i = 0


def sae_lens_crosscheck(sae, model: HookedTransformer, hook_name: str, windows: torch.Tensor,
                        batch_size: int = 4) -> dict:
    """``{metric: {"replab", "sae_lens", "rel_diff"}}`` plus ``max_rel_diff``, ``tokens`` and the
    latent-density agreement, on ``windows [n, seq_len]`` (``n`` a multiple of ``batch_size``)."""
    import numpy as np
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    n = (len(windows) // batch_size) * batch_size
    if n == 0:

        raise ReplabError(f"the SAELens cross-check needs at least {batch_size} windows")
    windows = windows[:n]
    ours, latents = evaluate_sae(sae, model, hook_name, windows, skip_first=0, batch_size=batch_size)
    cfg = EvalConfig(batch_size_prompts=batch_size, n_eval_reconstruction_batches=n // batch_size,
                     n_eval_sparsity_variance_batches=n // batch_size, compute_kl=True, compute_ce_loss=True,
                     compute_sparsity_metrics=True, compute_variance_metrics=True,
                     compute_featurewise_density_statistics=True)
    with torch.no_grad():
        res, feats = run_evals(sae, _TokenStore(windows, batch_size), model, ActivationScaler(), cfg,
                               exclude_special_tokens=False)
    out = {}
    for key, (section, name) in PAIRS.items():
        a, b = float(ours[key]), float(res[section][name])
        out[key] = {"replab": a, "sae_lens": b, "rel_diff": abs(a - b) / max(abs(b), 1e-12)}
    dens = np.asarray(feats["feature_density"], dtype=np.float64)
    return {"metrics": out, "max_rel_diff": max(v["rel_diff"] for v in out.values()),
            "density_max_abs_diff": float(np.abs(latents["frequency"].to_numpy() - dens).max()),
            "tokens": int(windows.numel()), "skip_first": 0, "exclude_special_tokens": False}

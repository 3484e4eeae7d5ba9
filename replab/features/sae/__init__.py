"""Sparse autoencoders with SAELens: train, evaluate, decompose a direction, splice.

* :func:`train_sae` (:class:`SAETrainConfig`) — harvest a hook's vectors over an offline
  corpus, train a TopK / BatchTopK / ReLU+L1 SAE with SAELens's ``SAETrainer``, save it
  in SAELens's format + ``replab.json`` (default: the per-model cache,
  :func:`cached_sae_dir`).
* :func:`load_sae` — ``(sae_lens.SAE, meta)`` from a directory.
* :func:`evaluate_sae` / :func:`run_sae_eval` — L0, FVU, CE loss recovered, ΔCE, KL,
  dead / dense latents on held-out text.
* :func:`decompose_direction` / :func:`run_decompose` — a Direction onto latents: cosines,
  class attribution from a store, top latents with examples and logit effects.
* :func:`sae_encode`, :func:`sae_decode`, :func:`sae_split`, :func:`sae_splice`,
  :func:`splice_hook`, :func:`patch_latents_hook` — the SAE on a batch of activations and
  spliced into a forward pass with its error term (latent patching).

Formats and metric definitions: ``docs/features.md``.
"""

from replab.features.sae.artifact import cached_sae_dir, load_sae, read_meta, save_sae
from replab.features.sae.config import ARCHS, SAETrainConfig
from replab.features.sae.decompose import decompose_direction, read_direction
from replab.features.sae.evaluate import evaluate_sae
from replab.features.sae.run import run_decompose, run_sae_eval
from replab.features.sae.splice import (
                                        Split,
                                        decoder_rows,
                                        patch_latents_hook,
                                        sae_decode,
                                        sae_encode,
                                        sae_splice,
                                        sae_split,
                                        splice_hook,
)
from replab.features.sae.train import fit_sae, train_sae

__all__ = [
    "ARCHS", "SAETrainConfig", "Split", "cached_sae_dir", "decoder_rows", "decompose_direction",
    "evaluate_sae", "fit_sae", "load_sae", "patch_latents_hook", "read_direction", "read_meta",
    "run_decompose", "run_sae_eval", "sae_decode", "sae_encode", "sae_splice", "sae_split",
    "save_sae", "splice_hook", "train_sae",
]

"""SAE training configuration (:class:`SAETrainConfig`) and the SAELens config it builds.

Architectures (``arch``), all SAELens 6.54 training classes:

* ``"topk"`` — :class:`sae_lens.TopKTrainingSAE`: exactly ``k`` latents per token, the
  TopK auxiliary loss (dead latents reconstruct the residual) and decoder-norm rescaling;
  saved as an inference ``TopKSAE`` (architecture ``"topk"``).
* ``"batchtopk"`` — :class:`sae_lens.BatchTopKTrainingSAE`: ``k`` latents per token *on
  average over a batch*; saved as a ``JumpReLUSAE`` (architecture ``"jumprelu"``) with
  the learned global threshold.
* ``"relu"`` — :class:`sae_lens.StandardTrainingSAE`: ReLU with an L1 penalty
  (``l1_coefficient``, decoder-norm weighted, linearly warmed up over
  ``l1_warm_up_steps``); saved as a ``StandardSAE`` (architecture ``"standard"``).
"""

from __future__ import annotations

import dataclasses

from replab.errors import ReplabError

ARCHS = ("topk", "batchtopk", "relu")
EXECUTION_FIELDS = ("threads", "harvest_batch")


@dataclasses.dataclass
class SAETrainConfig:
    """Hyperparameters of :func:`replab.features.sae.train_sae` (all recorded in ``replab.json``).

    Token budget: ``tokens`` is the number of activation vectors the SAE is trained on
    (counting repeats); the corpus gives at most ``corpus_tokens`` distinct positions
    (``None``: the whole corpus), which are cycled through in reshuffled epochs.
    """

    layer: int = 15
    hook: str = "resid_post"          # alias (resid_pre/mid/post, attn_out, mlp_out, mlp_post) or full name
    arch: str = "topk"
    d_sae: int = 4096
    k: float = 64                     # topk / batchtopk: latents per token
    l1_coefficient: float = 5.0       # relu: L1 strength (activations scaled to mean norm sqrt(d))
    l1_warm_up_steps: int | None = None  # relu: default 5% of the steps
    tokens: int = 800_000             # training samples (activation vectors seen, with repeats)
    corpus: str = "builtin"
    corpus_tokens: int | None = None  # cap on distinct corpus tokens harvested (None: all)
    store: str | None = None          # train on this activation store's vectors instead of the corpus
    seq_len: int = 128
    skip_first: int = 1               # positions excluded from every window (SmolLM2: no BOS)
    batch_size: int = 1024            # activation vectors per SAE step
    lr: float = 1e-3
    lr_warm_up_steps: int = 50
    lr_decay_fraction: float = 0.2    # linear decay to 0 over the last fraction of steps
    dead_feature_window: int = 250    # steps without firing -> dead (TopK aux loss)
    aux_loss_coefficient: float = 1.0 / 32
    harvest_batch: int = 16           # windows per model forward while harvesting
    threads: int | None = None        # torch intra-op threads for the run (None: unchanged)
    seed: int = 0

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ReplabError(f"unknown SAE architecture {self.arch!r}; use one of {', '.join(ARCHS)}")
        if self.d_sae < 1 or self.batch_size < 1 or self.harvest_batch < 1:
            raise ReplabError("d_sae, batch_size and harvest_batch must be positive")
        if self.arch in ("topk", "batchtopk") and not 0 < self.k <= self.d_sae:
            raise ReplabError(f"k must be in (0, d_sae={self.d_sae}], got {self.k}")
        if self.arch == "topk" and float(self.k) != int(self.k):
            raise ReplabError("topk needs an integer k (batchtopk accepts a fractional k)")
        if self.tokens < self.batch_size:
            raise ReplabError(f"--tokens ({self.tokens}) must be at least one batch ({self.batch_size})")
        if self.lr <= 0 or self.l1_coefficient < 0:
            raise ReplabError("lr must be > 0 and l1_coefficient >= 0")
        if not 0 <= self.skip_first < self.seq_len - 1:
            raise ReplabError(f"skip_first must be in [0, seq_len - 1), got {self.skip_first}")
        if self.corpus_tokens is not None and self.corpus_tokens < self.seq_len:
            raise ReplabError(f"corpus_tokens must be at least seq_len ({self.seq_len})")
        if self.threads is not None and self.threads < 1:
            raise ReplabError("threads must be at least 1")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise ReplabError("lr_decay_fraction must be in [0, 1]")

    @property
    def steps(self) -> int:
        """Number of SAE optimiser steps (``tokens // batch_size``)."""
        return self.tokens // self.batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def cache_key(self) -> dict:
        """The fields that decide the trained weights (execution details such as ``threads``
        and ``harvest_batch`` left out): an SAE with the same key is reused, not retrained."""
        return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}


def training_sae_config(cfg: SAETrainConfig, d_in: int, metadata: dict, device: str = "cpu"):
    """The SAELens ``TrainingSAEConfig`` for ``cfg`` (``metadata`` goes to ``cfg.metadata``)."""
    from sae_lens import BatchTopKTrainingSAEConfig, StandardTrainingSAEConfig, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    common = dict(d_in=d_in, d_sae=cfg.d_sae, dtype="float32", device=device,
                  apply_b_dec_to_input=True, normalize_activations="none",
                  metadata=SAEMetadata(**metadata))
    if cfg.arch == "topk":
        return TopKTrainingSAEConfig(k=int(cfg.k), aux_loss_coefficient=cfg.aux_loss_coefficient,
                                     rescale_acts_by_decoder_norm=True, **common)
    if cfg.arch == "batchtopk":
        return BatchTopKTrainingSAEConfig(k=float(cfg.k), aux_loss_coefficient=cfg.aux_loss_coefficient,
                                          rescale_acts_by_decoder_norm=True, **common)
    warm = cfg.l1_warm_up_steps if cfg.l1_warm_up_steps is not None else max(1, cfg.steps // 20)
    return StandardTrainingSAEConfig(l1_coefficient=cfg.l1_coefficient, lp_norm=1.0,
                                     l1_warm_up_steps=warm, **common)


def trainer_config(cfg: SAETrainConfig, device: str = "cpu"):
    """SAELens ``SAETrainerConfig``: Adam, warm-up, linear decay ("constant" + decay steps)."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    steps = cfg.steps
    decay = int(round(steps * cfg.lr_decay_fraction))
    return SAETrainerConfig(
        total_training_samples=steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr, lr_end=0.0, lr_scheduler_name="constant",
        lr_warm_up_steps=min(cfg.lr_warm_up_steps, max(0, steps - decay - 1)),
        lr_decay_steps=decay, device=device, autocast=False,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=max(steps + 1, 1), n_checkpoints=0, save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False))

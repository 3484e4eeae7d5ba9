"""Train an SAE with SAELens on one hook's activations over an offline text corpus.

Route (why not ``LanguageModelSAETrainingRunner``): replab harvests the hook's vectors
once (a forward with ``stop_at_layer``, no unembedding) into memory, then drives SAELens's
own :class:`sae_lens.SAETrainer` (its ``step`` / ``maybe_reset_sparsity`` /
``set_final_sae_metadata`` seams, so the training step, TopK auxiliary loss, dead-latent
tracking, L1 warm-up, Adam and LR schedule are SAELens's) with a data provider that cycles
through the cached vectors in reshuffled epochs. On a 2-core CPU the model forward is the
expensive part (~130-280 tok/s to layer 15 of SmolLM2 under load), while an SAE step on
1024 cached vectors (d_sae 4096) costs ~0.5 CPU-s. The runner's ``ActivationsStore`` re-runs
the model to refill its buffer, so ~7 epochs over the 117k-token builtin corpus would pay
for ~7 model passes; caching pays for one. It also needs an HF ``datasets`` dataset, a
wandb-shaped config and tqdm output, none of which help here. Everything is seeded
(``torch.manual_seed(seed)`` for the initial weights, a seeded generator for the epoch
shuffles), so the same config, corpus and thread count give the same SAE.

Activation scaling: vectors are multiplied by ``s = sqrt(d) / mean ||x||`` (SAELens's
``expected_average_only_in`` factor, set on the trainer's ``ActivationScaler``) and the
factor is folded back into the weights at the end, so the saved SAE reads raw activations.
``b_dec`` starts at the (scaled) mean activation.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from replab._progress import progress_bar
from replab.errors import ReplabError
from replab.features.sae.acts import corpus_windows, harvest_acts, sae_hook_name
from replab.features.sae.artifact import META, cached_sae_dir, check_replaceable, read_meta, save_sae
from replab.features.sae.config import SAETrainConfig, trainer_config, training_sae_config
from replab.hooks import parse_hook_name
from replab.models import current_options
from replab.models.coerce import as_model
from replab.prompts.corpus import corpus_sha256
from replab.store import open_store
from replab.threads import limit_threads

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _batches(acts: torch.Tensor, batch_size: int, gen: torch.Generator, device: str = "cpu"):
    """Endless data provider: reshuffled epochs of ``[batch_size, d]`` batches (on ``device``)."""
    while True:
        perm = torch.randperm(len(acts), generator=gen)
        for s in range(0, len(perm) - batch_size + 1, batch_size):
            yield acts[perm[s:s + batch_size]].to(device)


def train_device() -> str:
    """Where SAEs train: the ``--device`` / :func:`replab.models.model_options` device, else CUDA
    when available, else CPU (the CPU path is unchanged)."""

    return str(current_options()["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))


def _training_sae(cfg: SAETrainConfig, d_in: int, metadata: dict, device: str = "cpu"):
    from sae_lens import BatchTopKTrainingSAE, StandardTrainingSAE, TopKTrainingSAE

    cls = {"topk": TopKTrainingSAE, "batchtopk": BatchTopKTrainingSAE,
           "relu": StandardTrainingSAE}[cfg.arch]
    return cls(training_sae_config(cfg, d_in, metadata, device))


def fit_sae(acts: torch.Tensor, cfg: SAETrainConfig, metadata: dict | None = None,
            progress: bool = True):
    """Train a SAELens training SAE on activation vectors.

    Args:
        acts: ``FloatTensor [n, d]`` (CPU); ``n >= cfg.batch_size``.
        cfg: hyperparameters (``arch``, ``d_sae``, ``k``, ``tokens``, ``lr``, ``seed``...).
        metadata: goes to ``sae.cfg.metadata`` (``hook_name``, ``model_name``...).

    Returns:
        ``(sae, stats)``: the trained ``TrainingSAE`` (scaling folded in: it reads raw
        activations) and a dict with ``steps``, ``tokens_trained``, ``epochs``,
        ``scaling_factor``, ``train_fvu_last`` (mean training FVU over the last 10% of
        steps), ``dead_latents_train`` and the loss curve ``curve``
        (``[{"step", "mse", "fvu", "l0"}]`` every ~1% of steps). The progress bar's
        "loss" column shows the training-batch FVU.
    """
    from sae_lens import SAETrainer

    acts = acts.float().contiguous()
    if acts.ndim != 2 or len(acts) < cfg.batch_size:
        raise ReplabError(f"need at least one batch ({cfg.batch_size}) of activation vectors, "
                          f"got {tuple(acts.shape)}")
    if not torch.isfinite(acts).all():
        raise ReplabError("activations contain NaN or inf")
    d_in = acts.shape[1]
    gen = torch.Generator().manual_seed(cfg.seed)
    mean_norm = float(acts.norm(dim=-1).mean())
    if mean_norm == 0:
        raise ReplabError("activations are all zero")
    scale = math.sqrt(d_in) / mean_norm
    device = train_device()
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        sae = _training_sae(cfg, d_in, metadata or {}, "cpu")
    if device != "cpu":           # same seeded init, then moved
        sae = sae.to(device)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0) * scale)
    tcfg = trainer_config(cfg, device)
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=_batches(acts, cfg.batch_size, gen, device))
    trainer.activation_scaler.scaling_factor = scale
    steps = cfg.steps
    every = max(1, steps // 100)
    curve, tail = [], []
    with progress_bar(steps * cfg.batch_size, f"train SAE ({cfg.arch}, {cfg.d_sae})", "tok",
                      enabled=progress, show_loss=True) as bar:
        for step in range(steps):
            trainer.maybe_reset_sparsity()
            out = trainer.step(next(trainer.data_provider))
            trainer.n_training_steps += 1
            if step % every == 0 or step == steps - 1 or step >= steps - max(1, steps // 10):
                with torch.no_grad():
                    x, xh = out.sae_in, out.sae_out
                    mse = (x - xh).pow(2).sum(-1).mean().item()
                    fvu = mse / (x - x.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12).item()
                    l0 = (out.feature_acts != 0).float().sum(-1).mean().item()
                if step >= steps - max(1, steps // 10):
                    tail.append(fvu)
                if step % every == 0 or step == steps - 1:
                    curve.append({"step": step, "mse": mse, "fvu": fvu, "l0": l0})
                bar.advance(cfg.batch_size, loss=fvu)
            else:
                bar.advance(cfg.batch_size)
    trainer.set_final_sae_metadata()
    dead = int(trainer.dead_neurons.sum())
    sae.fold_activation_norm_scaling_factor(scale)
    if device != "cpu":
        sae = sae.to("cpu")
    sae.eval()
    stats = {"steps": steps, "tokens_trained": steps * cfg.batch_size,
             "unique_vectors": int(len(acts)), "epochs": round(steps * cfg.batch_size / len(acts), 3),
             "scaling_factor": scale, "train_fvu_last": float(sum(tail) / len(tail)),
             "dead_latents_train": dead, "curve": curve}
    return sae, stats


def _source(cfg: SAETrainConfig, hook_name: str, model_sha: str | None) -> tuple[dict, object]:
    """What the SAE is trained on, with a content hash: ``({"kind", "sha256", ...}, store or None)``.

    A corpus is hashed by its files (:func:`replab.prompts.corpus.corpus_sha256`, the key of
    cached lenses and SAE evaluations too); a store by its manifest's sha256 of the hook's tensor.
    """
    if cfg.store:

        st = open_store(cfg.store)
        if hook_name not in st.hooks:
            raise ReplabError(f"store {cfg.store} has no {hook_name}; harvest it with --hooks "
                              f"{hook_name.split('.')[-1].removeprefix('hook_')} --layers {hook_name.split('.')[1]}")
        if model_sha and st.model.get("weights_sha256") != model_sha:
            raise ReplabError(f"store {cfg.store} was harvested from another model ({st.model.get('name')})")
        tensor = next(t for t in st.manifest["tensors"] if t["hook"] == hook_name)
        return {"kind": "store", "store": str(cfg.store), "sha256": tensor["sha256"],
                "rows": int(st.n_rows)}, st

    return {"kind": "corpus", "corpus": cfg.corpus, "sha256": corpus_sha256(cfg.corpus)}, None


def cached_training(path: Path, cfg: SAETrainConfig, identity: dict, source: dict) -> dict | None:
    """``replab.json`` of an SAE at ``path`` trained with the same config (:meth:`cache_key`),
    model weights and training data, or None."""

    if not (path / META).exists():
        return None
    try:
        meta = read_meta(path)
    except ReplabError:
        return None
    old = SAETrainConfig(**{k: v for k, v in meta.get("config", {}).items()
                            if k in SAETrainConfig.__dataclass_fields__})
    same = (old.cache_key() == cfg.cache_key()
            and meta.get("model", {}).get("weights_sha256") == identity.get("weights_sha256")
            and (meta.get("stats", {}).get("source") or {}).get("sha256") == source.get("sha256"))
    return meta if same else None


def train_sae(model: HookedTransformer | str | None = None, config: SAETrainConfig | None = None,
              out: str | os.PathLike | None = None, activations: torch.Tensor | None = None,
              progress: bool = True, force: bool = False,
              **overrides) -> tuple[Path, dict]:
    """Train an SAE on ``model``'s ``config.hook`` at ``config.layer`` and save it.

    Args:
        model: a loaded model (:func:`replab.load_model`), a model name, or None (default).
        config: :class:`SAETrainConfig`; keyword ``overrides`` replace its fields
            (``train_sae(layer=15, arch="topk", k=32, d_sae=4096, tokens=1_000_000)``).
        out: directory to write (default: the per-model cache,
            :func:`replab.features.sae.artifact.cached_sae_dir`).
        activations: train on these vectors ``[n, d]`` instead of harvesting the corpus
            (``config.store`` does this from an activation store's tensor at the hook).
        force: train even when ``out`` (or the cache) already holds an SAE trained with the
            same config (:meth:`SAETrainConfig.cache_key`), model weights and training data
            (corpus text / store tensor sha256). With ``force=False`` such an SAE is reused:
            the stats come back with ``cached: True``. (Arrays passed as ``activations``
            have no recorded hash, so they always train.)

    Returns:
        ``(path, stats)``: the SAE directory (SAELens ``cfg.json`` +
        ``sae_weights.safetensors``, plus ``replab.json``) and training stats, including
        ``corpus_tokens`` (distinct tokens run through the model), ``tokens_trained``,
        ``seconds`` (wall, total), ``cpu_seconds`` (this process, all threads),
        ``seconds_harvest`` and ``seconds_train``.
    """
    import dataclasses

    cfg = dataclasses.replace(config or SAETrainConfig(), **overrides)
    if out is not None:  # fail before an expensive run, not after it
        check_replaceable(Path(out), META, "an SAE directory")
    model = as_model(model)
    identity = model.replab_identity.to_dict()
    hook_name = sae_hook_name(model, cfg.hook, cfg.layer)

    path = Path(out) if out is not None else cached_sae_dir(identity, hook_name)
    source, store = _source(cfg, hook_name, identity.get("weights_sha256")) if activations is None else (
        {"kind": "array", "sha256": None}, None)
    if not force and activations is None:
        meta = cached_training(path, cfg, identity, source)
        if meta is not None:
            return path, {**meta.get("stats", {}), "cached": True}
    if store is not None:
        import numpy as np

        activations = torch.from_numpy(np.array(store.acts(hook_name), dtype=np.float32))

    with limit_threads(cfg.threads):
        path, stats = _train(model, cfg, identity, hook_name, path, activations, progress, source)
    return path, {**stats, "cached": False}


def _train(model: HookedTransformer, cfg, identity, hook_name, path, activations, progress, source):

    t0, c0 = time.perf_counter(), _cpu_seconds()
    corpus_tokens = None
    if activations is None:
        windows = corpus_windows(model.tokenizer, cfg.corpus, cfg.seq_len, cfg.corpus_tokens,
                                 seed=cfg.seed)
        corpus_tokens = int(windows.numel())
        acts = harvest_acts(model, hook_name, windows, cfg.skip_first, cfg.harvest_batch, progress)
    else:
        acts = torch.as_tensor(activations, dtype=torch.float32)
    t1 = time.perf_counter()
    metadata = {"model_name": identity["name"], "hook_name": hook_name, "hook_head_index": None,
                "context_size": cfg.seq_len, "prepend_bos": bool(model.cfg.default_prepend_bos),
                "seqpos_slice": [cfg.skip_first, None], "exclude_special_tokens": False}
    sae, stats = fit_sae(acts, cfg, metadata, progress)
    t2 = time.perf_counter()
    stats.update(corpus_tokens=corpus_tokens, seconds_harvest=round(t1 - t0, 1),
                 seconds_train=round(t2 - t1, 1), seconds=round(t2 - t0, 1),
                 cpu_seconds=round(_cpu_seconds() - c0, 1), torch_threads=torch.get_num_threads(),
                 source=source)
    save_sae(sae, path, identity=identity, hook_name=hook_name, layer=parse_hook_name(hook_name)[1],
             config=cfg.to_dict(), stats=stats)
    return path, stats

"""Tuned lens: train once per (model, training config), cache, and reuse.

>>> path, stats = train_lens(None)          # doctest: +SKIP  (the default lens; ~3 CPU min)
>>> path, stats = train_lens(None)          # doctest: +SKIP  (cached: returns at once)
>>> lens = load_tuned_lens(None, hf_model)  # doctest: +SKIP  (reads the default lens)

The cache directory of a lens is keyed by the model identity *and* the training config
(:func:`replab.lenses.cache.cached_lens_dir`); ``replab lens tuned`` / ``lens eval`` read
the lens of the default ``TrainConfig()`` unless given ``--lens DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from replab.errors import ReplabError
from replab.lenses.cache import (
    cached_lens_dir,
    cached_lenses,
    check_lens_dir,
    config_key,
    export_tuned_lens,
    is_current,
    load_lens,
    read_meta,
    save_lens,
)
from replab.lenses.train import TrainConfig, train_tuned_lens
from replab.models import TINY, embedded, load_hf_model, load_model, load_tokenizer
from replab.models.identity import sha256_files
from replab.models.loading import _local_source
from replab.threads import limit_threads

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def model_identity(model_name: str | None) -> dict:
    """``replab_identity.to_dict()`` of a model (loads the cached TL model: ~2 s)."""

    return load_model(model_name, device="cpu").replab_identity.to_dict()


def weights_identity(model_name: str | None) -> dict | None:
    """``{"name", "weights_sha256"}`` of a model without loading it (the two fields a lens's
    cache directory and :func:`replab.lenses.cache.is_current` read), or None when only
    loading tells (the random ``tiny`` model). The same values as
    :func:`model_identity`: the embedded model's GGUF sha256, a local directory's weight
    files' :func:`~replab.models.identity.sha256_files` (both memoised on disk)."""

    if model_name == TINY:
        return None
    if embedded.is_default(model_name):
        return {"name": embedded.DEFAULT_MODEL, "weights_sha256": embedded.model_root()[1]}
    src = _local_source(model_name)
    weights = sorted(src.glob("*.safetensors")) or sorted(src.glob("*.bin"))
    return {"name": str(model_name), "weights_sha256": sha256_files(weights)} if weights else None


def default_lens_dir(identity: dict) -> Path:
    """Cache directory of the default lens (``TrainConfig()``) of ``identity``."""
    return cached_lens_dir(identity, TrainConfig().to_dict())


def train_lens(model_name: str | None = None, config: TrainConfig | None = None,
               out: str | os.PathLike | None = None, progress: bool = True,
               identity: dict | None = None, hf_model: PreTrainedModel = None,
               threads: int | None = 1, force: bool = False) -> tuple[Path, dict]:
    """Train a tuned lens for ``model_name`` with ``config`` and save it, unless it exists.

    Args:
        out: directory to write; default the cache directory of this model and config
            (:func:`replab.lenses.cache.cached_lens_dir`). The default config's directory is
            the one ``replab lens tuned`` reads; other configs never overwrite it.
        threads: torch threads while training (default 1, the fastest on a shared CPU;
            ``None`` leaves torch's setting). Recorded as ``stats["torch_threads"]``.
        force: retrain even when ``out`` (or the cache) already holds a lens of this model
            trained with this config (same corpus content, same settings).

    Returns:
        ``(path, stats)``; ``stats["cached"]`` is True when nothing was trained (the stats
        are then the recorded ones of that lens).
    """

    config = config or TrainConfig()
    if identity is None and not force:   # a cached lens is found without loading the model
        light = weights_identity(model_name)
        if light is not None:
            path = Path(out) if out is not None else cached_lens_dir(light, config.to_dict())
            if is_current(path, light, config_key(config.to_dict())):
                return path, {**read_meta(path)["stats"], "cached": True}
    identity = identity or model_identity(model_name)
    path = Path(out) if out is not None else cached_lens_dir(identity, config.to_dict())
    if not force and is_current(path, identity, config_key(config.to_dict())):
        return path, {**read_meta(path)["stats"], "cached": True}
    hf_model = hf_model if hf_model is not None else quiet_hf_model(model_name)
    tokenizer = load_tokenizer(model_name)
    with limit_threads(threads):
        lens, stats = train_tuned_lens(hf_model, tokenizer, config, progress=progress)
    save_lens(lens, path, identity, config.to_dict(), stats)
    return path, {**stats, "cached": False}


def load_tuned_lens(model_name: str | None = None, hf_model: PreTrainedModel = None,
                    path: str | os.PathLike | None = None, identity: dict | None = None):
    """The tuned lens at ``path`` or the cached default lens of ``model_name``.

    Raises ReplabError (naming the command to run) when no lens has been trained.
    """

    identity = identity or model_identity(model_name)
    path = check_lens_dir(tuned_lens_path(model_name, path, identity))
    hf_model = hf_model if hf_model is not None else quiet_hf_model(model_name)
    return load_lens(path, hf_model, identity)


def tuned_lens_path(model_name: str | None, path, identity: dict) -> Path:
    """``path`` if given, else the default lens of ``identity`` (ReplabError if not cached;
    the message lists this model's other cached lenses, which need ``--lens DIR``)."""
    if path is not None:
        return Path(path)
    path = default_lens_dir(identity)
    if not path.exists():
        flag = "" if model_name is None else " --model tiny" if "tiny-hf" in str(model_name) \
            else f" --model {model_name}"
        others = cached_lenses(identity)
        hint = f"; cached lenses with other settings (pass one with --lens): " \
               f"{', '.join(map(str, others))}" if others else " (or pass --lens DIR)"
        raise ReplabError(f"no default tuned lens cached for this model; train it with "
                          f"`replab lens train{flag}`{hint}")
    return path


def export_lens(out: str | os.PathLike, model_name: str | None = None, lens: str | os.PathLike | None = None) -> Path:
    """Write a cached tuned lens (``lens``, or the default lens of ``model_name``) into ``out`` in
    tuned-lens's own format, for ``TunedLens.from_model_and_pretrained(hf_model, lens_resource_id=out)``
    (:func:`replab.lenses.cache.export_tuned_lens`: adds ``params.pt``, a tensor-only pickle)."""
    identity = None if lens is not None else (weights_identity(model_name) or model_identity(model_name))
    return export_tuned_lens(tuned_lens_path(model_name, lens, identity), out)


def quiet_hf_model(model_name: str | None):
    """``load_hf_model`` without transformers' "Loading weights" progress bar on stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return load_hf_model(model_name)

"""Tuned lens: train once per model identity, cache, and reuse.

>>> path = train_lens(None, TrainConfig())          # doctest: +SKIP  (~15 CPU min)
>>> lens = load_tuned_lens(None, hf_model)          # doctest: +SKIP  (reads the cache)
"""

from __future__ import annotations

import os
from pathlib import Path

from replab.errors import ReplabError
from replab.lenses.cells import torch_threads
from replab.lenses.store import cached_lens_dir, load_lens, save_lens
from replab.lenses.train import TrainConfig, train_tuned_lens


def model_identity(model_name: str | None) -> dict:
    """``replab_identity.to_dict()`` of a model (loads the cached TL model: ~2 s)."""
    from replab.models import load_model

    return load_model(model_name, device="cpu").replab_identity.to_dict()


def train_lens(model_name: str | None = None, config: TrainConfig | None = None,
               out: str | os.PathLike | None = None, progress: bool = True,
               identity: dict | None = None, hf_model=None,
               threads: int | None = 1) -> tuple[Path, dict]:
    """Train a tuned lens for ``model_name`` and save it.

    Args:
        out: directory to write; default the per-identity cache
            (:func:`replab.lenses.store.cached_lens_dir`), which ``replab lens tuned`` reads.
        threads: torch threads while training (default 1, the fastest on a shared CPU;
            ``None`` leaves torch's setting). Recorded as ``stats["torch_threads"]``.

    Returns:
        ``(path, stats)``.
    """
    from replab.models import load_tokenizer

    config = config or TrainConfig()
    identity = identity or model_identity(model_name)
    hf_model = hf_model if hf_model is not None else quiet_hf_model(model_name)
    tokenizer = load_tokenizer(model_name)
    with torch_threads(threads):
        lens, stats = train_tuned_lens(hf_model, tokenizer, config, progress=progress)
    path = Path(out) if out is not None else cached_lens_dir(identity)
    save_lens(lens, path, identity, config.to_dict(), stats)
    return path, stats


def load_tuned_lens(model_name: str | None = None, hf_model=None,
                    path: str | os.PathLike | None = None, identity: dict | None = None):
    """The tuned lens at ``path`` or the cached one for ``model_name``.

    Raises ReplabError (naming the command to run) when no lens has been trained.
    """
    from replab.lenses.store import check_lens_dir

    identity = identity or model_identity(model_name)
    path = check_lens_dir(tuned_lens_path(model_name, path, identity))
    hf_model = hf_model if hf_model is not None else quiet_hf_model(model_name)
    return load_lens(path, hf_model, identity)


def tuned_lens_path(model_name: str | None, path, identity: dict) -> Path:
    """``path`` if given, else the cached lens of ``identity`` (ReplabError if none is cached)."""
    if path is not None:
        return Path(path)
    path = cached_lens_dir(identity)
    if not path.exists():
        flag = "" if model_name is None else " --model tiny" if "tiny-hf" in str(model_name) \
            else f" --model {model_name}"
        raise ReplabError(f"no tuned lens cached for this model; train one with "
                          f"`replab lens train{flag}` (or pass --lens DIR)")
    return path


def quiet_hf_model(model_name: str | None):
    """``load_hf_model`` without transformers' "Loading weights" progress bar on stderr."""
    from transformers.utils import logging as hf_logging

    from replab.models import load_hf_model

    hf_logging.disable_progress_bar()
    return load_hf_model(model_name)

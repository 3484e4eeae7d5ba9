"""SAE artifacts on disk, and the per-model cache.

An SAE directory holds:

* ``cfg.json`` + ``sae_weights.safetensors`` — SAELens's own on-disk format (an inference
  SAE: ``topk``, ``jumprelu`` for BatchTopK, or ``standard`` for ReLU+L1), so
  ``sae_lens.SAE.load_from_disk(DIR)`` loads it. ``cfg.json["metadata"]`` carries
  ``hook_name``, ``model_name``, ``context_size``, ``prepend_bos`` and ``seqpos_slice``.
* ``replab.json`` — ``format: "replab.sae"``, the hook name and layer, the model identity
  (``model.replab_identity``), the training config, the token budget and times
  (``stats``), the creation time and the replab and sae_lens versions. Written last.

Directories are written to a temporary sibling and renamed, so a crashed run never leaves
a directory that looks complete. Cache: ``cache_dir()/saes/<model>-<sha16>/<hook name>/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from replab._version import __version__
from replab.errors import ReplabError
from replab.features.sae.acts import sae_hook_name
from replab.io import atomic_dir, inside, read_json
from replab.lenses.cache import identity_key
from replab.models.cache import cache_dir
from replab.models.coerce import as_model

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from replab.features.sae.config import SAETrainConfig

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
META = "replab.json"
FORMAT = "replab.sae"


def cached_sae_dir(identity: dict, hook_name: str, config: SAETrainConfig | None = None) -> Path:
    """``cache_dir()/saes/<model>-<sha16>/<hook_name>`` (may not exist yet): ``replab sae train``'s
    entry. With a ``config``, that config's own entry beside it,
    ``<hook_name>-<arch><d_sae>-<sha256 of config.cache_key()[:12]>``, which never replaces it."""
    base = cache_dir() / "saes" / identity_key(identity) / hook_name
    if config is None:
        return base
    key = hashlib.sha256(json.dumps(config.cache_key(), sort_keys=True).encode()).hexdigest()[:12]
    return base.with_name(f"{base.name}-{config.arch}{config.d_sae}-{key}")


def save_sae(sae, path: str | os.PathLike, identity: dict, hook_name: str, layer: int | None,
             config: dict, stats: dict) -> Path:
    """Write a trained SAELens ``TrainingSAE`` (inference form) + ``replab.json`` atomically."""
    import sae_lens

    path = Path(path)
    check_replaceable(path, META, "an SAE directory")
    with atomic_dir(path) as tmp:
        sae.save_inference_model(tmp)
        arch = json.loads((tmp / CFG).read_text()).get("architecture")
        meta = {"format": FORMAT, "hook_name": hook_name, "layer": layer, "architecture": arch,
                "training_architecture": config.get("arch"), "d_in": int(sae.cfg.d_in),
                "d_sae": int(sae.cfg.d_sae), "model": identity, "config": config, "stats": stats,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "replab_version": __version__, "sae_lens_version": sae_lens.__version__}
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return path


def check_replaceable(path: Path, marker: str, what: str) -> None:
    """ReplabError unless ``path`` is absent, empty, or already holds ``marker`` (our output)."""
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / marker).exists())):
        raise ReplabError(f"{path} exists and is not {what}; choose another --out")


def read_meta(path: str | os.PathLike) -> dict:
    """The ``replab.json`` of an SAE directory (ReplabError if missing or incomplete)."""

    path = Path(path)
    if not path.is_dir():
        raise ReplabError(f"{path}: no such SAE directory")
    for name in (CFG, WEIGHTS, META):
        if not inside(path, name, "SAE file").exists():   # a symlink out of the directory is refused
            raise ReplabError(f"{path} is not a complete replab SAE directory ({name} is missing)")
    meta = read_json(path / META, "SAE metadata")
    if meta.get("format") != FORMAT:
        raise ReplabError(f"{path / META}: not a replab SAE")
    return meta


def load_sae(path: str | os.PathLike, device: str = "cpu"):
    """Load an SAE directory with SAELens. Returns ``(sae, meta)``.

    ``sae`` is a ``sae_lens.SAE`` in eval mode with gradients off; ``meta`` is ``replab.json``.
    """
    import torch
    from sae_lens import SAE

    meta = read_meta(path)
    try:
        sae = SAE.load_from_disk(str(path), device=device)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a broken artifact
        raise ReplabError(f"{path}: SAELens could not load this SAE ({exc.__class__.__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    sae.to(torch.float32)
    return sae, meta


def resolve_sae_dir(path: str | os.PathLike | None, model: HookedTransformer | None = None, hook: str = "resid_post",
                    layer: int | None = None) -> Path:
    """``path`` if given, else the cached SAE of ``model`` at ``hook``/``layer``."""
    if path is not None:
        return Path(path)
    if model is None:
        raise ReplabError("give an SAE directory, or a model and --layer for the cached SAE")

    hook_name = sae_hook_name(model, hook, layer)
    cached = cached_sae_dir(model.replab_identity.to_dict(), hook_name)
    if not (cached / META).exists():
        raise ReplabError(f"no SAE cached for this model at {hook_name}; train one with "
                          f"`replab sae train --layer {layer} --hook {hook}` (or pass a directory)")
    return cached


def model_for(meta: dict, model: HookedTransformer | str | None = None):
    """The model an SAE was trained on (``model`` if given; checked against ``meta``)."""

    ident = meta.get("model", {})
    model = as_model(ident.get("name") if model is None else model)
    got = model.replab_identity.to_dict()
    if got.get("weights_sha256") != ident.get("weights_sha256"):
        raise ReplabError(f"this SAE was trained on model {ident.get('name')!r} "
                          f"({str(ident.get('weights_sha256'))[:12]}), not {got.get('name')!r} "
                          f"({str(got.get('weights_sha256'))[:12]})")
    if meta["hook_name"] not in model.hook_dict:
        raise ReplabError(f"hook {meta['hook_name']} does not exist on this model")
    return model

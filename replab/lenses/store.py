"""Tuned-lens artifacts on disk, and the per-model cache.

A lens directory holds:

* ``config.json`` + ``params.pt``: tuned-lens's own format (``TunedLens.save``), so
  ``TunedLens.from_model_and_pretrained(hf_model, lens_resource_id=DIR)`` loads it.
  ``params.pt`` is a ``torch.save`` pickle of a plain state dict of tensors; tuned-lens
  reads it with ``torch.load(path)``, which in torch >= 2.6 defaults to
  ``weights_only=True`` (a restricted unpickler that executes no arbitrary code).
* ``translators.safetensors``: the same tensors; replab itself loads only this file.
* ``replab.json``: model identity, training config, replab version, training stats.

Cache: ``cache_dir()/lenses/<name>-<weights_sha256[:16]>/`` (:func:`cached_lens_dir`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from replab._version import __version__
from replab.errors import ReplabError

PARAMS = "params.pt"
CONFIG = "config.json"
SAFETENSORS = "translators.safetensors"
META = "replab.json"


def identity_key(identity: dict) -> str:
    """Directory name for a model identity: ``<name>-<sha16>`` (filesystem-safe)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(identity["name"]))[-60:]
    return f"{name}-{identity['weights_sha256'][:16]}"


def cached_lens_dir(identity: dict) -> Path:
    """Where the cached tuned lens of a model lives (may not exist yet)."""
    from replab.models.cache import cache_dir

    return cache_dir() / "lenses" / identity_key(identity)


def save_lens(lens, path: str | os.PathLike, identity: dict, config: dict, stats: dict) -> Path:
    """Write ``lens`` (a ``TunedLens``) to ``path`` atomically (temp dir + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    lens.save(tmp, ckpt=PARAMS, config=CONFIG)
    state = {k: v.detach().contiguous().cpu() for k, v in lens.layer_translators.state_dict().items()}
    save_file(state, str(tmp / SAFETENSORS))
    meta = {"kind": "tuned_lens", "format": "tuned-lens 0.2 (config.json + params.pt) + safetensors",
            "model": identity, "config": config, "stats": stats, "replab_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (tmp / META).write_text(json.dumps(meta, indent=1))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def read_meta(path: str | os.PathLike) -> dict:
    """The ``replab.json`` of a lens directory."""
    f = Path(path) / META
    if not f.exists():
        raise ReplabError(f"{path} is not a replab tuned-lens directory (no {META})")
    return json.loads(f.read_text())


def check_lens_dir(path: str | os.PathLike) -> Path:
    """``Path(path)``; ReplabError unless it holds config.json, safetensors and replab.json."""
    path = Path(path)
    for name in (CONFIG, SAFETENSORS, META):
        if not (path / name).exists():
            raise ReplabError(f"tuned lens at {path} is incomplete: {name} is missing")
    return path


def load_lens(path: str | os.PathLike, hf_model, identity: dict | None = None):
    """Load a tuned lens for ``hf_model`` from ``path`` (safetensors; no pickle).

    Raises ReplabError when the directory is incomplete or, if ``identity`` is given,
    was trained for different weights.
    """
    from safetensors.torch import load_file
    from tuned_lens.nn.lenses import TunedLens, TunedLensConfig
    from tuned_lens.nn.unembed import Unembed

    path = check_lens_dir(path)
    meta = read_meta(path)
    if identity is not None:
        got = meta.get("model", {})
        if got.get("weights_sha256") != identity.get("weights_sha256"):
            raise ReplabError(f"tuned lens at {path} was trained for model {got.get('name')!r} "
                              f"({str(got.get('weights_sha256'))[:12]}), not this one")
    import logging

    cfg_dict = json.loads((path / CONFIG).read_text())
    logging.getLogger().setLevel(logging.ERROR)  # tuned-lens warns on unknown keys
    lens = TunedLens(Unembed(hf_model), TunedLensConfig.from_dict(cfg_dict))
    lens.layer_translators.load_state_dict(load_file(str(path / SAFETENSORS)))
    lens.requires_grad_(False)
    return lens.eval()

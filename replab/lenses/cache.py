"""Tuned-lens artifacts on disk, and the per-model cache.

A lens directory holds:

* ``config.json``: tuned-lens's ``TunedLensConfig`` (as ``TunedLens.save`` writes it).
* ``translators.safetensors``: the translators' weights; the only weights file replab
  writes into the cache or loads (no pickle anywhere in a lens directory).
* ``replab.json``: model identity, training config, its cache key and corpus hash,
  replab version, training stats.

Cache: ``cache_dir()/lenses/<name>-<weights_sha256[:16]>/<corpus>-<config key>/``
(:func:`cached_lens_dir`). The config key (:func:`config_key`) hashes every training
setting, the corpus *content* and :data:`TRAINER`, so each configuration has its own
directory: the *default lens* (the one ``replab lens tuned`` / ``lens eval`` use) is the
one at the key of the default ``TrainConfig()``, and a lens trained with another corpus
or other settings never replaces it.

tuned-lens's own loader (``TunedLens.from_model_and_pretrained(hf_model, lens_resource_id=DIR)``)
also needs ``params.pt``, a ``torch.save`` pickle: :func:`export_tuned_lens` writes it into a
separate directory on request (``replab lens export``); the cache never holds one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from replab._version import __version__
from replab.errors import ReplabError
from replab.io import atomic_dir, inside, read_json
from replab.lenses.train import TrainConfig
from replab.models.cache import cache_dir
from replab.prompts.corpus import corpus_sha256

PARAMS = "params.pt"
CONFIG = "config.json"
SAFETENSORS = "translators.safetensors"
META = "replab.json"
#: part of every cache key: bump when a training change alters the lens for the same config
TRAINER = "replab-tuned-lens/2 (norm-probed least squares + KL)"


def identity_key(identity: dict) -> str:
    """Directory name for a model identity: ``<name>-<sha16>`` (filesystem-safe)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(identity["name"]))[-60:]
    return f"{name}-{identity['weights_sha256'][:16]}"


def config_key(config: dict) -> str:
    """12 hex digits identifying a training config: sha256 of the config (the corpus replaced
    by its content hash, :func:`replab.prompts.corpus.corpus_sha256`) and :data:`TRAINER`."""

    blob = {k: v for k, v in config.items() if k != "corpus"}
    blob["corpus_sha256"] = corpus_sha256(config["corpus"])
    blob["trainer"] = TRAINER
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def cached_lens_dir(identity: dict, config: dict | None = None) -> Path:
    """Where the lens of ``identity`` trained with ``config`` (a ``TrainConfig.to_dict()``;
    default: the default config, i.e. the default lens) is cached (may not exist yet)."""

    config = config if config is not None else TrainConfig().to_dict()
    corpus = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(config["corpus"])).stem)[-40:] or "corpus"
    return cache_dir() / "lenses" / identity_key(identity) / f"{corpus}-{config_key(config)}"


def cached_lenses(identity: dict) -> list[Path]:
    """Every cached lens directory of ``identity`` (any config), sorted."""

    root = cache_dir() / "lenses" / identity_key(identity)
    return sorted(p.parent for p in root.glob(f"*/{META}")) if root.is_dir() else []


def is_current(path: str | os.PathLike, identity: dict, key: str) -> bool:
    """True when ``path`` holds a complete lens for ``identity`` trained with config ``key``."""
    try:
        meta = read_meta(check_lens_dir(path))
    except (ReplabError, ValueError, OSError):
        return False
    return (meta.get("config_key") == key
            and meta.get("model", {}).get("weights_sha256") == identity.get("weights_sha256"))


def save_lens(lens, path: str | os.PathLike, identity: dict, config: dict, stats: dict) -> Path:
    """Write ``lens`` (a ``TunedLens``) to ``path`` atomically (:func:`replab.io.atomic_dir`).

    ``path`` must be absent, empty or an older lens directory (it is replaced); anything
    else is refused with ReplabError, so ``--out`` never deletes unrelated files.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / META).exists())):
        raise ReplabError(f"{path} exists and is not a tuned-lens directory; choose another --out")
    with atomic_dir(path) as tmp:   # readers never see a half-written lens
        (tmp / CONFIG).write_text(json.dumps(lens.config.to_dict()))
        state = {k: v.detach().contiguous().cpu() for k, v in lens.layer_translators.state_dict().items()}
        save_file(state, str(tmp / SAFETENSORS))
        meta = {"kind": "tuned_lens", "format": "tuned-lens 0.2 config.json + translators.safetensors",
                "model": identity, "config": config, "config_key": config_key(config),
                "corpus_sha256": corpus_sha256(config["corpus"]), "trainer": TRAINER,
                "stats": stats, "replab_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / META).write_text(json.dumps(meta, indent=1))
    return path


def export_tuned_lens(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the lens at ``path`` in tuned-lens's own format into ``out``: ``config.json``,
    ``params.pt`` (``torch.save`` of the translators' state dict, what tuned-lens's loader reads)
    and copies of ``translators.safetensors`` and ``replab.json`` (with ``exported_from``:
    ``path``), so that ``TunedLens.from_model_and_pretrained(hf_model, lens_resource_id=out)``
    loads it (and replab's ``--lens out`` too).

    ``params.pt`` is a pickle: tuned-lens reads it with ``torch.load``, which with torch >= 2.6
    (replab pins 2.13) unpickles tensors only (``weights_only=True``). replab never reads it;
    the cache keeps safetensors. ``out`` must be absent, empty or an earlier export (replaced).
    """
    import torch
    from safetensors.torch import load_file

    path, out = check_lens_dir(path), Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / PARAMS).exists())):
        raise ReplabError(f"{out} exists and is not an exported tuned lens; choose another --out")
    meta = {**read_meta(path), "exported_from": str(path.resolve()),
            "format": "tuned-lens 0.2 (config.json + params.pt)"}
    with atomic_dir(out) as tmp:
        (tmp / CONFIG).write_text((path / CONFIG).read_text())
        shutil.copyfile(path / SAFETENSORS, tmp / SAFETENSORS)
        torch.save(load_file(str(path / SAFETENSORS)), tmp / PARAMS)
        (tmp / META).write_text(json.dumps(meta, indent=1))
    return out


def read_meta(path: str | os.PathLike) -> dict:
    """The ``replab.json`` of a lens directory."""

    f = inside(path, META, "lens metadata")
    if not f.exists():
        raise ReplabError(f"{path} is not a replab tuned-lens directory (no {META})")
    return read_json(f, "lens metadata")


def check_lens_dir(path: str | os.PathLike) -> Path:
    """``Path(path)``; ReplabError unless it holds config.json, safetensors and replab.json."""

    path = Path(path)
    for name in (CONFIG, SAFETENSORS, META):
        if not inside(path, name, "lens file").exists():   # a symlink out of the directory is refused
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

    cfg_dict = read_json(path / CONFIG, "tuned-lens config")
    # only the fields tuned-lens knows (its from_dict would log a root-logger warning per
    # unknown key, e.g. from a newer tuned-lens); no logging state is touched
    known = {f.name for f in dataclasses.fields(TunedLensConfig)}
    lens = TunedLens(Unembed(hf_model), TunedLensConfig(**{k: v for k, v in cfg_dict.items()
                                                          if k in known}))
    lens.layer_translators.load_state_dict(load_file(str(path / SAFETENSORS)))
    lens.requires_grad_(False)
    return lens.eval()

"""A local Hugging Face model directory: where it is, whether it is sound, what keys its cache.

Everything here reads files only (no model is built), so a broken directory fails in one line
before any conversion starts:

* ``config.json`` must be valid JSON naming an architecture;
* weights must be safetensors (every shard an index names must exist); each file's header is
  parsed and its size checked against the tensors it declares, so a truncated download is
  named here rather than deep inside ``transformers``;
* a directory with only ``pytorch_model*.bin`` (pickle) files is refused unless the caller
  passes ``allow_bin=True``; those files are then read with ``torch.load(weights_only=True)``
  (no code runs) and the converted model is cached as safetensors, so later loads of the same
  files (same cache key) read no pickle and need no flag.

The conversion cache key (:func:`cache_key`) covers the weights, ``config.json``, the
tokenizer files and replab's conversion version, so editing any of them reconverts.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from replab.errors import ReplabError
from replab.io import inside

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja")
# config.json keys that record who wrote the file, not what the model computes.
_CONFIG_NOISE = ("transformers_version", "_name_or_path")


@dataclass(frozen=True)
class ModelSource:
    """A checked local model directory.

    Attributes:
        path: the resolved directory.
        config: ``config.json`` as a dict.
        architecture: ``config["architectures"][0]``.
        weights: the weight files (safetensors, or ``.bin`` when allowed).
        pickle_weights: True when ``weights`` are ``.bin`` files.
    """

    path: Path
    config: dict
    architecture: str
    weights: tuple[Path, ...]
    pickle_weights: bool


def read_config(path: Path) -> dict:
    """``config.json`` of a model directory, or a one-line ReplabError saying what is wrong."""
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ReplabError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReplabError(f"{cfg_path}: invalid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ReplabError(f"{cfg_path}: expected a JSON object")
    archs = config.get("architectures")
    if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
        raise ReplabError(f"{cfg_path}: no 'architectures' entry, so the model type is unknown")
    return config


def check_safetensors(path: Path) -> None:
    """Raise a one-line ReplabError if ``path`` is not a complete safetensors file.

    Reads the 8-byte header length and the JSON header only, and checks that the file is
    exactly as long as the tensors the header declares (so truncation is caught without
    reading the data).
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise ValueError("header length exceeds the file")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise ReplabError(f"{path}: not a valid safetensors file ({exc}); re-download it") from None
    if size != 8 + n + end:
        raise ReplabError(f"{path}: truncated or damaged safetensors file ({size} bytes, its header "
                          f"declares {8 + n + end}); re-download it")


def _indexed(path: Path, index_name: str) -> list[Path] | None:
    index = path / index_name
    if not index.exists():
        return None
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReplabError(f"{index}: invalid shard index ({exc})") from None
    # shard names come from the index: they must stay in the model directory (hub snapshots
    # link their files into ../../blobs, so links are allowed, names that leave are not)
    shards = [inside(path, f, f"shard named by {index_name}", follow_links=False) for f in files]
    missing = [f for f, p in zip(files, shards, strict=True) if not p.exists()]
    if missing:
        raise ReplabError(f"{index} names {len(missing)} missing shard(s), e.g. {missing[0]}; "
                          "the download is incomplete")
    return shards


def weight_files(path: Path) -> tuple[list[Path], bool]:
    """``(files, pickle)``: the model's weight files and whether they are ``.bin`` pickles
    (only when there is no safetensors file). Nothing is unpickled here."""
    st = _indexed(path, "model.safetensors.index.json") or sorted(path.glob("*.safetensors"))
    if st:
        for f in st:
            check_safetensors(f)
        return st, False
    bins = _indexed(path, "pytorch_model.bin.index.json") or sorted(path.glob("*.bin"))
    bins = [b for b in bins if b.name != "training_args.bin"]
    if not bins:
        raise ReplabError(f"{path} has no weight files (*.safetensors)")
    return bins, True


def refuse_pickle(source: ModelSource) -> None:
    """The one-line error for a directory whose only weights are pickles."""
    raise ReplabError(
        f"{source.path} has only PyTorch pickle weights ({source.weights[0].name}); replab loads no "
        "pickle by default: convert them to safetensors, or convert once with --allow-bin "
        "(allow_bin=True), which reads them with torch.load(weights_only=True)")


def open_source(path: Path) -> ModelSource:
    """Check the model directory ``path`` (see the module docstring)."""
    config = read_config(path)
    files, pickled = weight_files(path)
    return ModelSource(path=path, config=config, architecture=config["architectures"][0],
                       weights=tuple(files), pickle_weights=pickled)


def config_sha256(config: dict) -> str:
    """sha256 of a model config, canonical JSON (sorted keys), ignoring who wrote it
    (``transformers_version``, ``_name_or_path``)."""
    clean = {k: v for k, v in config.items() if k not in _CONFIG_NOISE}
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()


def tokenizer_sha256(path: Path) -> str:
    """sha256 over the tokenizer files present in ``path`` (name and content)."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = path / name
        if f.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


def cache_key(weights_sha: str, config_sha: str, tokenizer_sha: str, version: int) -> str:
    """The conversion cache key: weights, config, tokenizer and replab's conversion version."""
    text = f"weights:{weights_sha}\nconfig:{config_sha}\ntokenizer:{tokenizer_sha}\nconversion:{version}"
    return hashlib.sha256(text.encode()).hexdigest()

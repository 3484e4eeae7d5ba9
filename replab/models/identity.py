"""Model identity: what every artifact records about the model that made it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from replab._version import __version__
from replab.io import sha256_file as plain_sha256
from replab.models.cache import cache_dir

STABLE_PARITY_KEYS = ("conversion_max_abs_logit_diff", "conversion_tolerance", "passed", "prompt")


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """Identity of a loaded model, written into the metadata of every artifact.

    ``weights_sha256`` is the sha256 of the weights file(s) the model came from
    (the GGUF for the embedded model; the concatenated per-file hashes for a
    multi-file checkpoint; a hash of the seed and config for the tiny model).
    ``config_sha256`` hashes the model's ``config.json`` (canonical JSON, see
    :func:`replab.models.source.config_sha256`); ``architecture`` is its HF class name;
    ``device`` where it was loaded; ``parity`` the load-time check against the Hugging Face
    model (:mod:`replab.models.parity`: ``max_abs_logit_diff``, ``tolerance``, ...; None for
    the random ``tiny`` model, which has no HF counterpart).
    """

    name: str
    source: str
    weights_sha256: str
    dtype: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_vocab: int
    prepend_bos: bool
    processing: dict
    architecture: str = ""
    config_sha256: str | None = None
    device: str = "cpu"
    parity: dict | None = None
    replab_version: str = __version__

    def to_dict(self) -> dict:
        """What artifacts record: every field except the load's ``device`` and, of ``parity``,
        only the parts that do not change from one load to the next (the float32 conversion
        check; ``passed``), so that resuming a harvest or reusing a cached result does not
        depend on the device or thread count of the load. The full load-time check stays
        on ``.parity``."""
        out = dataclasses.asdict(self)
        out.pop("device", None)
        if self.parity is not None:
            out["parity"] = {k: self.parity[k] for k in STABLE_PARITY_KEYS if k in self.parity}
        return out

    def same_model(self, other: dict) -> bool:
        """True when ``other`` (a dict from an artifact) names the same weights, config and
        processing. (Artifacts written before replab recorded ``config_sha256`` are compared
        without it.)"""
        keys = ("name", "weights_sha256", "dtype", "processing", "prepend_bos")
        if other.get("config_sha256") is not None:
            keys += ("config_sha256",)
        return all(other.get(k) == getattr(self, k) for k in keys)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a (large weights) file, memoised on (path, size, mtime) in the replab cache."""
    path = Path(path).resolve()
    st = path.stat()
    memo = cache_dir() / "hashes.json"
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    table: dict = {}
    if memo.exists():
        try:
            table = json.loads(memo.read_text())
        except (OSError, json.JSONDecodeError):
            table = {}
    if key in table:
        return table[key]

    table[key] = plain_sha256(path, chunk)
    tmp = memo.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(table, indent=0))
    os.replace(tmp, memo)
    return table[key]


def sha256_files(paths) -> str:
    """One hash for a set of weight files: sha256 over 'name:sha256' lines, sorted by name."""
    lines = sorted(f"{Path(p).name}:{sha256_file(p)}" for p in paths)
    if len(lines) == 1:
        return lines[0].split(":", 1)[1]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()

"""Reading an activation store: :func:`open_store` and :class:`ActivationStore`."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from replab.errors import ReplabError
from replab.io import sha256_file
from replab.store import format as fmt


class ActivationStore:
    """A finished activation store on disk.

    Attributes:
        path: the store directory.
        manifest: the parsed ``manifest.json`` (model identity, dataset, config, tensors).
        index: DataFrame with one row per stored vector, aligned with every tensor.
    """

    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ReplabError(f"{self.path}: no such store directory")
        if not (self.path / fmt.MANIFEST).exists():
            if (self.path / fmt.PROGRESS).exists():
                raise ReplabError(
                    f"{self.path}: harvest was interrupted and the store is incomplete; "
                    "rerun the same harvest command to resume it"
                )
            raise ReplabError(f"{self.path}: not an activation store (no {fmt.MANIFEST})")
        self.manifest = fmt.read_json(self.path / fmt.MANIFEST, "manifest")
        if self.manifest.get("format") != fmt.FORMAT or self.manifest.get("status") != "complete":
            raise ReplabError(f"{self.path / fmt.MANIFEST}: not a complete replab activation store")
        self._tensors = {t["hook"]: t for t in self.manifest["tensors"]}
        self.check(verify=verify)

    def check(self, verify: bool = False) -> None:
        """Check every file's size and header; with ``verify`` also its sha256."""
        index = self.manifest["index"]
        path = self.path / index["file"]
        if not path.exists():
            raise ReplabError(f"{path}: index file is missing")
        if verify and sha256_file(path) != index["sha256"]:
            raise ReplabError(f"{path}: checksum mismatch (file is corrupted)")
        for t in self._tensors.values():
            fmt.check_tensor_file(
                self.path / t["file"], t["shape"], t["dtype"], t["sha256"] if verify else None
            )

    @property
    def hooks(self) -> list[str]:
        """Full TransformerLens hook names stored, e.g. ``blocks.14.hook_resid_post``."""
        return list(self._tensors)

    @property
    def model(self) -> dict:
        """Identity of the model that produced the store."""
        return self.manifest["model"]

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @cached_property
    def index(self) -> pd.DataFrame:
        """One row per stored vector: row, example_id, position, token_id, token, labels..."""
        try:
            return pd.read_parquet(self.path / self.manifest["index"]["file"])
        except Exception as exc:  # noqa: BLE001 - any parquet failure is a corrupted file
            raise ReplabError(
                f"{self.path / self.manifest['index']['file']}: unreadable index ({exc})"
            ) from None

    def acts(self, hook: str) -> np.ndarray:
        """Memory-mapped ``[rows, d]`` array for a full hook name, aligned with :attr:`index`."""
        if hook not in self._tensors:
            raise ReplabError(
                f"hook {hook!r} is not in this store; it has: {', '.join(self.hooks)}"
            )
        return np.load(self.path / self._tensors[hook]["file"], mmap_mode="r", allow_pickle=False)

    def layer_acts(self, site: str = "resid_post") -> dict[int, np.ndarray]:
        """``{layer: acts}`` for every stored block hook of one site (e.g. ``resid_post``)."""
        from replab.hooks import parse_hook_name

        out = {}
        for hook in self.hooks:
            alias, layer = parse_hook_name(hook)
            if alias == site and layer is not None:
                out[layer] = self.acts(hook)
        if not out:
            raise ReplabError(f"no {site!r} hooks in this store; it has: {', '.join(self.hooks)}")
        return dict(sorted(out.items()))

    def summary(self) -> dict:
        """A JSON-friendly summary (used by ``replab store info``)."""
        m = self.manifest
        size = sum((self.path / t["file"]).stat().st_size for t in self._tensors.values())
        labels = m["dataset"].get("label_columns", [])
        counts = {c: self.index[c].value_counts().to_dict() for c in labels if c in self.index
                  and self.index[c].nunique() <= 20}
        return {
            "path": str(self.path),
            "model": m["model"]["name"],
            "model_sha256": m["model"]["weights_sha256"],
            "dataset": m["dataset"]["name"],
            "n_prompts": m["dataset"]["n_prompts"],
            "n_rows": m["n_rows"],
            "positions": m["config"]["positions"],
            "hooks": len(self._tensors),
            "layers": m["config"]["layers"],
            "dtype": m["config"]["dtype"],
            "bytes": size,
            "label_counts": {k: {str(a): int(b) for a, b in v.items()} for k, v in counts.items()},
            "replab_version": m["replab_version"],
        }

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, rows={self.n_rows}, hooks={len(self.hooks)})"


def open_store(path: str | Path, verify: bool = False) -> ActivationStore:
    """Open a finished activation store.

    Args:
        path: the store directory written by :func:`replab.harvest`.
        verify: also check every file's sha256 against the manifest (reads everything).

    Raises:
        ReplabError: naming the file, if the store is incomplete, truncated or corrupted.
    """
    return ActivationStore(path, verify=verify)

"""Where replab keeps converted models and other per-machine caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The replab cache directory: ``$REPLAB_CACHE`` or ``~/.cache/replab`` (created)."""
    root = os.environ.get("REPLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "replab"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path

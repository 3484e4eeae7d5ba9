"""A per-machine cache for :func:`check_dataset` results.

Scores depend only on the model's weights and processing, the prompt set's
content, the scoring rule and the replab version, so they are cached under
``<replab cache>/checks/<key>/`` (Parquet + JSON). ``make demo`` uses this to be
fast on a second run.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pandas as pd

from replab._version import __version__
from replab.io import atomic_dir
from replab.models.cache import cache_dir
from replab.prompts.check import check_dataset
from replab.prompts.schema import PromptSet


def check_dataset_cached(model, ps: PromptSet, scoring: str = "first_token",
                         batch_size: int = 32, progress=None) -> tuple[pd.DataFrame, dict]:
    """Like :func:`check_dataset`, reusing an earlier identical check when there is one.

    The summary gains ``"cached": True`` when it was read from the cache.
    """

    ident = model.replab_identity.to_dict()
    key = hashlib.sha256(json.dumps(
        {"model": ident, "dataset": ps.content_hash(), "scoring": scoring,
         "version": __version__}, sort_keys=True).encode()).hexdigest()[:32]
    folder = cache_dir() / "checks" / key
    if (folder / "summary.json").exists():
        try:
            scores = pd.read_parquet(folder / "scores.parquet")
            summary = json.loads((folder / "summary.json").read_text())
            return scores, {**summary, "cached": True}
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
            shutil.rmtree(folder, ignore_errors=True)
    scores, summary = check_dataset(model, ps, scoring=scoring, batch_size=batch_size,
                                    progress=progress)
    try:
        with atomic_dir(folder) as tmp:
            scores.to_parquet(tmp / "scores.parquet", index=False)
            (tmp / "summary.json").write_text(json.dumps(summary))
    except Exception:  # noqa: BLE001 - caching is best effort (e.g. unusual label types)
        pass
    return scores, summary

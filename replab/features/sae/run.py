"""Run directories for ``replab sae decompose`` (tables, figure, summary.json)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path


def _write_table(df, out: Path, name: str) -> list[str]:
    if df is None:
        return []
    df.to_parquet(out / f"{name}.parquet", index=False)
    df.to_csv(out / f"{name}.csv", index=False)
    return [f"{name}.parquet", f"{name}.csv"]


def run_decompose(sae_dir=None, direction=None, store=None, label: str | None = None,
                  positive_class: str | None = None, top: int = 10, n_examples: int = 5,
                  n_tokens: int = 10, out=None, where: str | None = None, model=None) -> dict:
    """:func:`decompose_direction` + a run directory.

    ``sae_dir`` None: the cached SAE at the Direction's hook and layer. Writes (atomically:
    temp dir, then rename) ``cosine``, ``attribution`` (with a store), ``top_latents``,
    ``examples`` and ``logit_effects`` as Parquet + CSV, ``top_latents.png`` and
    ``summary.json`` to ``out`` (default ``runs/sae-decompose``). Returns the summary.
    """
    from replab._version import __version__
    from replab.errors import ReplabError
    from replab.features.sae import plots
    from replab.features.sae.artifact import check_replaceable, replace_dir
    from replab.features.sae.decompose import decompose_direction, read_direction

    t0 = time.perf_counter()
    if direction is None:
        raise ReplabError("give a direction (--direction PATH)")
    out = Path(out or "runs/sae-decompose")
    check_replaceable(out, "summary.json", "a decompose run directory")
    if sae_dir is None:
        from replab.features.sae.artifact import resolve_sae_dir
        from replab.models import load_model

        _, prov = read_direction(direction)
        if prov.get("hook") is None:
            raise ReplabError("a raw vector has no hook or layer: give the SAE directory")
        model = model if model is not None and not isinstance(model, str) else load_model(model)
        sae_dir = resolve_sae_dir(None, model, prov["hook"], prov["layer"])
    res = decompose_direction(sae_dir, direction, store, label, positive_class, top, n_examples,
                              n_tokens, model=model, where=where)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = []
    for key, name in (("cosine", "cosine"), ("attribution", "attribution"), ("top", "top_latents"),
                      ("examples", "examples"), ("logits", "logit_effects")):
        files += _write_table(res[key], tmp, name)
    s = res["summary"]
    what = f"{s.get('positive_class') or s['direction'].get('positive_class') or 'direction'}"
    value = "contribution" if res["attribution"] is not None else "cosine"
    plots.top_latents_plot(res["top"], tmp / "top_latents.png", value,
                           f"{what}: top SAE latents at {s['hook_name']} by {value}",
                           examples=res["examples"])
    files.append("top_latents.png")
    summary = {"kind": "sae_decompose", **s, "config": {
        "top": top, "n_examples": n_examples, "n_tokens": n_tokens, "label": label,
        "positive_class": positive_class, "where": where,
        "direction": str(direction) if isinstance(direction, (str, os.PathLike)) else None},
        "top": res["top"].to_dict(orient="records"), "files": files,
        "replab_version": __version__, "seconds": round(time.perf_counter() - t0, 1), "out": str(out)}
    (tmp / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    replace_dir(tmp, out)
    return summary

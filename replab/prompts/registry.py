"""Finding, listing and loading prompt sets (builtin specs and user files)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from replab.errors import ReplabError
from replab.io import inside
from replab.models import load_tokenizer
from replab.prompts.builders import BUILDER_META, BUILDERS
from replab.prompts.io import read_user_rows, read_yaml
from replab.prompts.schema import PromptSet, default_groups, normalize_rows
from replab.prompts.tokens import check_pairs

#: spec keys that are not copied into ``PromptSet.meta`` (the data itself)
_NOT_META = ("params",)


def datasets_dir() -> Path:
    """Directory of the builtin dataset specs.

    ``$REPLAB_DATASETS`` if set; else ``<repo>/datasets`` (source checkout); else
    ``replab/_data/datasets`` inside the installed package (wheel installs).
    """
    env = os.environ.get("REPLAB_DATASETS")
    if env:
        return Path(env).expanduser()
    pkg = Path(__file__).resolve().parents[1]  # .../replab (works for namespace packages too)
    repo = pkg.parent / "datasets"
    if repo.is_dir():
        return repo
    return pkg / "_data" / "datasets"


def _builtin_specs() -> dict[str, Path]:
    d = datasets_dir()
    if not d.is_dir():
        return {}
    return {p.stem: p for p in sorted(d.glob("*.yaml"))}


def _needs_tokenizer(spec: dict) -> bool:
    b = spec.get("builder")
    return b in BUILDERS and BUILDERS[b][1]


def list_datasets(tokenizer=None) -> pd.DataFrame:
    """One row per builtin set: name, description, n_prompts, n_pairs, labels, path.

    Sets whose expansion pairs prompts by token length need a tokenizer: pass one to
    count them (otherwise their ``n_prompts`` / ``n_pairs`` are None).
    """
    out = []
    for name, path in _builtin_specs().items():
        try:
            spec = _read_spec(path)
        except ReplabError as e:
            out.append({"name": name, "description": f"(unreadable: {e})", "n_prompts": None,
                        "labels": [], "path": str(path)})
            continue
        n = pairs = None
        if tokenizer is not None or not _needs_tokenizer(spec):
            try:
                ps = _expand_spec(spec, path, tokenizer, False)
                n, pairs = len(ps), sum(bool(r.get("corrupt_prompt")) for r in ps)
            except ReplabError:
                n = pairs = None
        out.append({"name": spec.get("name", name), "description": spec.get("description", ""),
                    "n_prompts": n, "n_pairs": pairs, "labels": list(spec.get("labels", [])),
                    "path": str(path)})
    return pd.DataFrame(out, columns=["name", "description", "n_prompts", "n_pairs", "labels",
                                      "path"])


def _read_spec(path: Path) -> dict:
    spec = read_yaml(path)
    if not isinstance(spec, dict) or "builder" not in spec:
        raise ReplabError(f"{path}: a dataset spec needs a 'builder' key")
    return spec


def _default_tokenizer():
    try:
        pass
    except ImportError as e:
        raise ReplabError(f"this dataset needs a tokenizer to expand; pass tokenizer=... ({e})") from None
    return load_tokenizer()


def _expand_spec(spec: dict, path: Path, tokenizer, prepend_bos: bool) -> list[dict[str, Any]]:
    builder = spec["builder"]
    if builder == "rows":
        f = spec.get("file")
        if not f:
            raise ReplabError(f"{path}: builder 'rows' needs a 'file:' (a JSONL/CSV next to the spec)")
        target = inside(path.parent, f, "rows file of the spec")     # next to the spec, never elsewhere
        if not target.is_file():
            raise ReplabError(f"{path}: rows file {f} does not exist")
        return read_user_rows(target)
    if builder not in BUILDERS:
        known = ", ".join(sorted(list(BUILDERS) + ["rows"]))
        raise ReplabError(f"{path}: unknown builder {builder!r} (known: {known})")
    fn, _ = BUILDERS[builder]
    return fn(spec.get("params") or {}, tokenizer, prepend_bos)


def load_prompts(name_or_path: str, tokenizer=None, prepend_bos: bool = False) -> PromptSet:
    """Load a builtin set by name (``datasets/<name>.yaml``) or a user ``.jsonl``/``.csv``/``.yaml`` file.

    Builders that pair prompts by token length need a tokenizer; if none is given,
    ``replab.models.load_tokenizer()`` is tried. When the set has clean/corrupt pairs and a
    tokenizer is available, :func:`check_pairs` is run. Every user error is a ReplabError.
    """
    key = str(name_or_path)
    path = Path(key).expanduser()
    builtins = _builtin_specs()
    looks_like_path = path.suffix.lower() in (".jsonl", ".csv", ".yaml", ".yml") or os.sep in key
    if key in builtins and not (looks_like_path and path.exists()):
        path, name = builtins[key], key
    elif looks_like_path or path.exists():
        if not path.is_file():
            raise ReplabError(f"prompt file {key} does not exist")
        name = path.stem
    else:
        known = ", ".join(builtins) or "(none found in " + str(datasets_dir()) + ")"
        raise ReplabError(f"unknown dataset {key!r}; builtin sets: {known}; or pass a .jsonl/.csv/.yaml path")

    meta: dict = {}
    if path.suffix.lower() in (".yaml", ".yml"):
        doc = read_yaml(path)
        if isinstance(doc, dict) and "builder" in doc:
            name = str(doc.get("name", name))
            meta = {k: v for k, v in doc.items() if k not in _NOT_META}
            if doc["builder"] in BUILDER_META:
                meta.update(BUILDER_META[doc["builder"]](doc.get("params") or {}))
            if tokenizer is None and _needs_tokenizer(doc):
                tokenizer = _default_tokenizer()
            records = _expand_spec(doc, path, tokenizer, prepend_bos)
        elif isinstance(doc, dict) and isinstance(doc.get("rows"), list):
            meta = {k: v for k, v in doc.items() if k != "rows"}
            name = str(doc.get("name", name))
            records = doc["rows"]
        elif isinstance(doc, list):
            records = doc
        elif doc is None:
            records = []
        else:
            raise ReplabError(f"{path}: YAML must be a dataset spec (with 'builder'), a list of rows, "
                              "or a mapping with 'rows'")
    else:
        records = read_user_rows(path)
    if not records:
        raise ReplabError(f"{path}: dataset {name} is empty (no rows)")
    rows = normalize_rows(records, where=str(path))
    if default_groups(rows):
        meta["group_source"] = "entity"
    meta.setdefault("scoring", "first_token")
    meta.setdefault("positions", "last")
    ps = PromptSet(name=name, rows=rows, source=str(path), meta=meta)
    if ps.has_pairs and tokenizer is not None:
        check_pairs(ps, tokenizer, prepend_bos)
    return ps

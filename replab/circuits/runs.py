"""What every circuit command shares: loading, the run directory, ``config.yaml`` and replay.

Every ``replab circuit ...`` run writes, before anything else, ``<out>/config.yaml``::

    kind: necessity                       # which run_* call made it
    command: replab circuit necessity --task next_day --components L23H3,L29H1 ...
    replay: replab circuit replay runs/x/config.yaml
    options: {task: next_day, components: [L23H3, L29H1], ablation: mean, seed: 0, ...}
    replab_version: ...

``options`` are the call's resolved keyword arguments (components in canonical form, every
default filled in), so ``replab circuit replay DIR/config.yaml [--out NEW]`` (or
:func:`replab.circuits.replay.replay_run` in Python) repeats the run exactly: same model, task, prompts, seeds. Then
the tables (Parquet + CSV), figures (PNG + SVG) and ``summary.json`` last
(:mod:`replab.rundir`), which repeats the config and adds the model identity.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

from replab.errors import ReplabError
from replab.io import inside, json_plain, read_text
from replab.rundir import finish_run, start_run

CONFIG = "config.yaml"
#: ``kind -> run_* function``; filled by :func:`runner` in the modules that define them
#: (:mod:`replab.circuits.replay` imports them all).
RUNNERS: dict[str, Callable[..., dict]] = {}
#: options that are not part of the experiment (they never go into config.yaml)
_VOLATILE = ("out", "progress")


def runner(kind: str):
    """Register a ``run_*`` function under ``kind`` (what a replay calls)."""
    def wrap(fn):
        RUNNERS[kind] = fn
        return fn
    return wrap


def load(model=None, task: str = "next_day", dataset: str | None = None,
         classes: str | None = None, template: str | None = None, limit: int | None = None):
    """``(model, PatchTask)``: the model (a name, default SmolLM2, loaded on the CPU; or an
    already loaded model, used as it is) and a task on its tokenizer
    (:func:`replab.patching.catalog.load_task`)."""
    from replab.models.coerce import as_model
    from replab.patching.catalog import load_task

    m = as_model(model, device="cpu")
    return m, load_task(task, m.tokenizer, template=template, limit=limit,
                        prepend_bos=bool(m.cfg.default_prepend_bos), classes=classes, dataset=dataset)


def model_option(model):
    """The ``model`` option as ``config.yaml`` records it: a name as given (None: the default
    model), or, for an already loaded model, the name that loads it again (None for the
    embedded default)."""
    if model is None or isinstance(model, (str, Path)):
        return None if model is None else str(model)
    from replab.models.embedded import is_default

    name = model.replab_identity.name
    return None if is_default(name) else name


def command_line(kind: str, options: dict, flags: dict | None = None) -> str:
    """The ``replab circuit KIND --opt value ...`` line equivalent to ``options`` (``flags``:
    option name -> command-line flag where they differ, e.g. ``{"n_top": "--top"}``)."""
    parts = ["replab", "circuit", kind]
    for key, value in options.items():
        if value is None or key in _VOLATILE:
            continue
        flag = (flags or {}).get(key) or "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            parts += [flag, ",".join(map(str, value))]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def start(out, kind: str, options: dict, flags: dict | None = None) -> Path:
    """Create the run directory and write ``config.yaml`` (module docstring); ``flags`` as in
    :func:`command_line`."""
    import yaml

    from replab._version import __version__

    out = start_run(out)
    opts = {k: json_plain(model_option(v) if k == "model" else v) for k, v in options.items()
            if k not in _VOLATILE}
    config = {"kind": kind, "command": command_line(kind, opts, flags),
              "replay": shlex.join(["replab", "circuit", "replay", str(out / CONFIG)]),
              "options": opts, "replab_version": __version__}
    (out / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return out


def finish(out: Path, summary: dict, model) -> dict:
    """Write ``summary.json`` last (with the config and model identity); return it plus ``out``."""
    import yaml

    config = yaml.safe_load((out / CONFIG).read_text())
    summary = {"kind": f"circuit_{config['kind']}", **summary, "config": config}
    return {**finish_run(out, json_plain(summary), model), "out": str(out)}


def read_config(path) -> dict:
    """A run's ``config.yaml`` (given the file or its directory)."""
    import yaml

    p = Path(path)
    if p.is_dir():
        p = inside(p, CONFIG, "run config")
    if not p.is_file():
        raise ReplabError(f"{path}: no {CONFIG} (give a circuit run directory or its config.yaml)")
    try:
        config = yaml.safe_load(read_text(p, "run config")) or {}
    except yaml.YAMLError as exc:
        raise ReplabError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict) or "kind" not in config or not isinstance(config.get("options"), dict):
        raise ReplabError(f"{p} is not a circuit run config (it needs kind and options)")
    return config

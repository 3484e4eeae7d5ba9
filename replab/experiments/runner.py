"""Run an experiment: resolve its config, run (or reuse) each stage, write the report.

The run directory::

    config.yaml          every option, resolved (replayed by ``replab run --config``)
    <stage>/             one per stage: the library call's own run directory, then
    <stage>/stage.json   written last: the stage's cache key, result and timing
    report.html          one self-contained file (figures embedded)
    summary.json         written last of all: headline numbers, every stage's result,
                         provenance (model identity, versions, seeds, stage times)

**Caching and resuming.** A stage's key hashes the model identity (name, weights and config
hash), the replab version, the values of the options it reads and the key of the stage before
it (the stage's code is not hashed: after changing an experiment's code within one version, use
``force``). A rerun reuses a
stage whose ``stage.json`` holds the same key; ``force`` recomputes every stage; a run that was
interrupted resumes at the first stage without a matching ``stage.json``. ``summary.json`` is
removed when a run starts and written when it ends, so an unfinished run never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from replab._version import __version__
from replab.errors import ReplabError
from replab.experiments.catalog import get_experiment
from replab.experiments.report import write_report
from replab.experiments.spec import Experiment
from replab.io import DirLock, json_plain, write_json_atomic, write_text_atomic
from replab.models import load_model

CONFIG = "config.yaml"
STAGE_FILE = "stage.json"
PACKAGES = ("torch", "transformer-lens", "transformers", "numpy", "pandas", "scikit-learn", "sae-lens",
            "tuned-lens", "concept-erasure", "umap-learn", "matplotlib", "seaborn", "jinja2")


@dataclass
class StageContext:
    """What a stage's ``run`` gets: the resolved ``config``, its own directory ``out``, the
    ``results`` of the stages before it, the run directory ``run_dir`` and the loaded
    ``model`` (one load per run, shared by every stage). ``memo``: values that several stages
    of one run derive the same way (computed by the first that needs them; never saved)."""

    config: dict
    out: Path
    run_dir: Path
    results: dict
    model_name: str | None
    progress: bool = True
    _model: object = field(default=None, repr=False)
    memo: dict = field(default_factory=dict, repr=False)

    @property
    def model(self):
        if self._model is None:
            self._model = load_model(self.model_name)
        return self._model


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity_key(identity: dict) -> dict:
    """The part of a model identity a cached stage depends on."""
    return {k: identity.get(k) for k in ("name", "weights_sha256", "config_sha256", "dtype", "processing")}


def read_config(path) -> dict:
    """An experiment run's ``config.yaml`` (the file or its run directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG
    if not p.is_file():
        raise ReplabError(f"{path}: no {CONFIG} (give an experiment run directory or its config.yaml)")
    try:
        config = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ReplabError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict) or "experiment" not in config or not isinstance(config.get("options"), dict):
        raise ReplabError(f"{p} is not an experiment config (it needs experiment and options)")
    return config


def package_versions() -> dict:
    """Installed versions of the packages results depend on (None where not installed)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def default_out(name: str, quick: bool) -> Path:
    return Path("runs") / (f"{name}-quick" if quick else name)


def run_experiment(name: str | None = None, model: str | None = None, config=None, out=None,
                   quick: bool = False, force: bool = False, options: dict | None = None,
                   progress: bool = True, echo=None) -> dict:
    """Run the experiment ``name`` (``fact-recall``, ``next-day``, ``superset``, ``sequences``,
    ``lenses``) and return its summary (also ``<out>/summary.json``).

    Args:
        name: the experiment; may be omitted when ``config`` is given.
        model: the model (default: the embedded SmolLM2; ``config``'s model when replaying).
        config: a finished run's ``config.yaml`` (or run directory) to replay exactly: same
            experiment, model, profile and options.
        out: the run directory (default ``runs/NAME`` or ``runs/NAME-quick``).
        quick: the small profile (CI); recorded in ``config.yaml``.
        force: recompute every stage instead of reusing finished ones.
        options: overrides of the experiment's options (unknown names are an error).
        progress: progress bars of the library calls; ``echo`` receives one line per stage
            (``None``: nothing).

    Raises:
        ReplabError: unknown experiment or option, a bad config file, or a run directory
            used by another process.
    """
    replay = read_config(config) if config is not None else None
    if replay is not None:
        if name is not None and name != replay["experiment"]:
            raise ReplabError(f"{config} is a {replay['experiment']!r} run, not {name!r}")
        name = replay["experiment"]
        model = model if model is not None else replay.get("model")
        quick = replay.get("profile") == "quick"
        options = {**replay["options"], **(options or {})}
    if name is None:
        raise ReplabError("name an experiment (or give --config)")
    exp = get_experiment(name)
    resolved = exp.resolve(options, quick=quick)
    out = Path(out) if out is not None else default_out(exp.name, quick)
    out.mkdir(parents=True, exist_ok=True)
    lock = DirLock(out).acquire(f"{out}: another replab run is using this directory")
    try:
        return _run_locked(exp, model, resolved, out, quick, force, progress, echo)
    finally:
        lock.release()


def _run_locked(exp: Experiment, model_name, config: dict, out: Path, quick: bool, force: bool,
                progress: bool, echo) -> dict:
    say = echo or (lambda line: None)
    (out / "summary.json").unlink(missing_ok=True)          # the completion marker goes first
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    cmd = ["replab", "run", exp.name] + (["--model", str(model_name)] if model_name else []) \
        + (["--quick"] if quick else []) + ["--out", str(out)]
    run_config = {"experiment": exp.name, "model": model_name, "profile": "quick" if quick else "full",
                  "options": config, "command": shlex.join(cmd),
                  "replay": shlex.join(["replab", "run", "--config", str(out / CONFIG)]),
                  "replab_version": __version__}
    write_text_atomic(out / CONFIG, yaml.safe_dump(run_config, sort_keys=False, allow_unicode=True))
    ctx = StageContext(config=config, out=out, run_dir=out, results={}, model_name=model_name,
                       progress=progress)
    identity = ctx.model.replab_identity.to_dict()
    key = _hash({"model": identity_key(identity), "experiment": exp.name, "replab": __version__})
    timings = []
    for i, stage in enumerate(exp.stages, 1):
        key = _hash({"previous": key, "stage": stage.name, "options": {k: config[k] for k in stage.keys}})
        sdir = out / stage.name
        marker = sdir / STAGE_FILE
        cached = _read_stage(marker) if not force else None
        label = f"[{i}/{len(exp.stages)}] {stage.title}"
        if cached is not None and cached.get("key") == key:
            ctx.results[stage.name] = cached["result"]
            timings.append({"stage": stage.name, "seconds": cached["seconds"], "reused": True})
            say(f"{label}: reused ({cached['seconds']:.0f} s when computed)")
            continue
        if sdir.exists():
            shutil.rmtree(sdir)                          # a stale or unfinished stage
        sdir.mkdir(parents=True)
        say(f"{label} ..." + (" (slow)" if stage.slow else ""))
        s0 = time.perf_counter()
        ctx.out = sdir
        result = json_plain(stage.run(ctx))
        seconds = round(time.perf_counter() - s0, 2)
        write_json_atomic(marker, {"key": key, "stage": stage.name, "seconds": seconds, "result": result,
                                   "replab_version": __version__})
        ctx.results[stage.name] = result
        timings.append({"stage": stage.name, "seconds": seconds, "reused": False})
        say(f"{label}: done in {seconds:.0f} s")
    summary = {
        "experiment": exp.name, "workflow": exp.workflow, "title": exp.title, "status": "complete",
        "headline": json_plain(exp.headline(ctx.results, config)),
        "stages": ctx.results,
        "config": run_config,
        "model": identity,
        "replab_version": __version__,
        "provenance": {"model": identity, "replab_version": __version__, "packages": package_versions(),
                       "seeds": {k: v for k, v in config.items() if k == "seed" or k.endswith("_seed")},
                       "stages": timings, "started": started.isoformat(timespec="seconds"),
                       "seconds": round(time.perf_counter() - t0, 2), "platform": platform.platform(),
                       "argv": sys.argv[1:]},
        "report": "report.html",
    }
    write_report(exp, summary, out)
    write_json_atomic(out / "summary.json", summary)
    return {**summary, "out": str(out)}


def _read_stage(marker: Path) -> dict | None:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "key" in data and "result" in data else None


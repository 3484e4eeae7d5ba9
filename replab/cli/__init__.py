"""The ``replab`` command line: a thin layer over the library.

Every command's work is a documented Python call; the modules here only parse
options, call the library, and print (tables for people, ``--json`` for scripts).
User errors (:class:`replab.ReplabError`) print one line and exit with code 2.
"""

from __future__ import annotations

import os
import sys

import typer

from replab.cli import (  # noqa: F401 (sae_patch adds `sae patch`, circuit_* add `circuit ...` commands; circuit_edges `circuit edges|discover`)
    circuit,
    circuit_blocks,
    circuit_edges,
    circuit_path,
    circuit_prune,
    circuit_report,
    circuit_validate,
    datasets,
    experiments,
    features,
    heads,
    lens,
    models,
    patch,
    plot,
    probe,
    sae,
    sae_patch,
    store,
)
from replab.cli._common import add_verify_options, examples
from replab.cli.harvest import HARVEST_EPILOG, harvest_cmd

app = typer.Typer(
    name="replab",
    help="replab: representation probing and feature analysis for transformer LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    epilog=examples("replab datasets check next_day",
                    "replab harvest --dataset superset --positions entity_last --out runs/superset",
                    "replab store info runs/superset"),
)
app.add_typer(datasets.app, name="datasets")
app.add_typer(store.app, name="store")
app.add_typer(probe.app, name="probe")
app.add_typer(plot.app, name="plot")
app.add_typer(lens.app, name="lens")
app.add_typer(patch.app, name="patch")
app.add_typer(patch.attribute_app, name="attribute")
app.add_typer(features.app, name="features")
app.add_typer(sae.app, name="sae")
app.add_typer(heads.app, name="heads")
app.add_typer(circuit.app, name="circuit")
app.command("test-prompt", epilog=patch.TEST_PROMPT_EPILOG)(patch.test_prompt_cmd)
app.command("harvest", epilog=HARVEST_EPILOG)(harvest_cmd)
app.add_typer(models.app, name="models")
app.command("run", epilog=experiments.RUN_EPILOG)(experiments.run_cmd)
app.add_typer(experiments.runs_app, name="runs")
models.add_model_options(app)   # --dtype/--device/--n-devices on every model-running command
add_verify_options(app)   # --verify on every command that reads a store

INTERRUPTED = "interrupted; rerun the same command to resume"


def _interrupted(exc: BaseException) -> bool:
    """True when ``exc`` (typer turns Ctrl-C into ``Exit(130)``) comes from a KeyboardInterrupt."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {str(message).splitlines()[0] if str(message) else category.__name__}\n"


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    from replab.errors import ReplabError

    old_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        app()
    except ReplabError as exc:
        message = str(exc).splitlines()[0] if str(exc) else "failed"
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write(f"error: {INTERRUPTED}\n")
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130 and _interrupted(exc):
            sys.stderr.write(f"error: {INTERRUPTED}\n")
        raise
    except OSError as exc:
        # a file-system failure nothing below turned into a ReplabError (disk full, a
        # permission, a vanished file): still one line, not a traceback
        if os.environ.get("REPLAB_DEBUG"):
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        sys.stderr.write(f"error: {where}{exc.strerror or exc}\n")
        sys.exit(2)
    finally:
        warnings.formatwarning = old_format

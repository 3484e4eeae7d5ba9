"""Shared CLI plumbing: JSON output, one-line errors, examples in --help."""

from __future__ import annotations

import json
import sys

import typer

from replab.errors import ReplabError
from replab.io import json_plain

JSON_OPT = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
MODEL_OPT = typer.Option(None, "--model", "-m",
                         help="Model: default SmolLM2-135M-Instruct, 'tiny', or a local HF dir.")
N_BOOT_OPT = typer.Option(1000, "--n-boot", help="Bootstrap resamples (over prompts) for the CIs.")

# The Ray engine (docs/scaling.md): shared by `harvest`, `patch sweep`, `circuit prune` and
# `circuit edges` (any command whose library call passes `engine` down to run_plan).
ENGINE_OPT = typer.Option("local", "--engine",
                          help="local (this process) or ray (Ray workers, one model each; needs "
                               "pip install 'replab[ray]'). Results are identical.")
ADDRESS_OPT = typer.Option(None, "--address",
                           help="Ray cluster: auto (started with `ray start`), ray://HOST:10001, or "
                                "HOST:6379; default: a new local cluster.")
WORKERS_OPT = typer.Option(None, "--workers", min=1,
                           help="Ray workers (default: as many as the cluster's free CPUs hold, each taking "
                                "the driver's torch thread count; one per GPU for a CUDA model).")


def examples(*lines: str) -> str:
    """A help epilog listing example invocations."""
    return "Examples:\n\n" + "\n\n".join(f"  $ {line}" for line in lines)


def print_json(data) -> None:
    """Print ``data`` as JSON (NaN -> null, numpy scalars -> Python)."""
    sys.stdout.write(json.dumps(json_plain(data), indent=1, default=str) + "\n")


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error on stderr and exit non-zero."""
    sys.stderr.write(f"error: {message.splitlines()[0] if message else 'failed'}\n")
    raise typer.Exit(code)


def run_guarded(func, *args, **kwargs):
    """Call ``func``; turn a :class:`ReplabError` into a one-line error and exit 2."""
    try:
        return func(*args, **kwargs)
    except ReplabError as exc:
        fail(str(exc))


VERIFY_OPT = typer.Option(False, "--verify",
                          help="Check every file of the store against its sha256 sums (and every "
                               "value for NaN/inf) before using it; reads the whole store.")


def _with_verify(func):
    """``func`` with a ``--verify`` option: the store(s) it opens are verified
    (:func:`replab.store.verifying`)."""
    import functools
    import inspect

    sig = inspect.signature(func)
    if "verify" in sig.parameters:
        return func

    @functools.wraps(func)
    def wrapper(*args, verify: bool = False, **kwargs):
        from replab.store import verifying

        with verifying(verify):
            return func(*args, **kwargs)

    extra = inspect.Parameter("verify", inspect.Parameter.KEYWORD_ONLY, default=VERIFY_OPT, annotation=bool)
    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])
    return wrapper


def add_verify_options(app: typer.Typer) -> None:
    """Give every command of ``app`` (and its sub-apps) that takes a ``store`` a ``--verify``
    option, so any command that reads an activation store can verify it first."""
    import inspect

    for info in app.registered_commands:
        cb = info.callback
        if cb is not None and cb.__name__ != "verify" and "store" in inspect.signature(cb).parameters:
            info.callback = _with_verify(cb)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            add_verify_options(group.typer_instance)


def human_console():
    """A rich console for human output: the terminal's width, or 160 columns when stdout is
    not a terminal (a log file, a pipe), where rich would otherwise cut tables at 80."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


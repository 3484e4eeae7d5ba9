"""``replab run NAME`` and ``replab runs list|show``: one command per research workflow.

Only parses options and prints; the work is :func:`replab.experiments.run_experiment`,
:func:`replab.experiments.list_runs` and :func:`replab.experiments.show_run`.
"""

from __future__ import annotations

import typer

from replab.cli._common import JSON_OPT, MODEL_OPT, examples, human_console, print_json

RUN_EPILOG = examples(
    "replab run superset                       # W3 on the embedded SmolLM2: runs/superset/report.html",
    "replab run next-day --quick               # the small CI profile: runs/next-day-quick",
    "replab run lenses --set dataset=fact_recall --set limit=20",
    "replab run --config runs/superset/config.yaml --out runs/superset-replay   # replay exactly",
    "replab run fact-recall --force            # recompute every stage")

runs_app = typer.Typer(help="Find past experiment runs.", no_args_is_help=True,
                       epilog=examples("replab runs list", "replab runs show runs/superset"))


def _parse_sets(sets: list[str] | None) -> dict:
    import yaml

    from replab.errors import ReplabError

    out = {}
    for item in sets or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ReplabError(f"--set takes KEY=VALUE, not {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else None
    return out


def run_cmd(name: str = typer.Argument(None, help="fact-recall | next-day | superset | sequences | lenses "
                                                   "(omit with --config)."),
            model: str = MODEL_OPT,
            config: str = typer.Option(None, "--config", "-c", help="A run's config.yaml (or its directory): "
                                                                   "replay it exactly."),
            out: str = typer.Option(None, "--out", "-o", help="Run directory (default runs/NAME[-quick])."),
            quick: bool = typer.Option(False, "--quick", help="The small profile (minutes; used in CI)."),
            force: bool = typer.Option(False, "--force", help="Recompute every stage."),
            sets: list[str] = typer.Option(None, "--set", help="Override an option: KEY=VALUE (repeatable; "
                                                               "see config.yaml for the names)."),
            json_out: bool = JSON_OPT) -> None:
    """Run one research workflow end to end: every stage cached by model identity and config,
    tables, figures, summary.json and a self-contained report.html."""
    from replab.experiments import run_experiment

    console = human_console()
    echo = None if json_out else (lambda line: console.print(line, highlight=False))
    s = run_experiment(name, model=model, config=config, out=out, quick=quick, force=force,
                       options=_parse_sets(sets) or None, progress=not json_out, echo=echo)
    if json_out:
        print_json({k: s[k] for k in ("experiment", "status", "headline", "out", "report")}
                   | {"stages": s["provenance"]["stages"], "seconds": s["provenance"]["seconds"]})
        return
    for key, value in s["headline"].items():
        console.print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}", highlight=False)
    console.print(f"report: {s['out']}/report.html", highlight=False)


@runs_app.command("list", epilog=examples("replab runs list", "replab runs list runs/ci --json"))
def list_cmd(root: str = typer.Argument("runs", help="Directory to search (recursively)."),
             json_out: bool = JSON_OPT) -> None:
    """Every experiment run under ROOT: experiment, model, date, status, headline number."""
    from replab.experiments import list_runs

    df = list_runs(root)
    if json_out:
        print_json({"records": df.to_dict("records")})
        return
    console = human_console()
    if df.empty:
        console.print(f"no experiment runs under {root}", highlight=False)
        return
    from rich.table import Table

    table = Table()
    for col in df.columns:
        table.add_column(col)
    for row in df.itertuples(index=False):
        table.add_row(*["" if v is None else str(v) for v in row])
    console.print(table)


@runs_app.command("show", epilog=examples("replab runs show runs/superset", "replab runs show runs/lenses --json"))
def show_cmd(run: str = typer.Argument(..., help="A run directory."), json_out: bool = JSON_OPT) -> None:
    """One run: status, headline numbers, stages (time, reused) and where its report is."""
    from replab.experiments import show_run

    s = show_run(run)
    if json_out:
        print_json(s)
        return
    console = human_console()
    console.print(f"{s['experiment']} on {s['model']}: {s['status']}", highlight=False)
    for key, value in s["headline"].items():
        console.print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}", highlight=False)
    for st in s["stages"]:
        how = "" if st["seconds"] is None else f"{st['seconds']:.1f} s" + (" (reused)" if st["reused"] else "")
        console.print(f"  stage {st['stage']}: {how or 'done'}", highlight=False)
    console.print(f"report: {s['report'] or '(not written yet)'}", highlight=False)

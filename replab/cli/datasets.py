"""``replab datasets ...``: list, check and export prompt sets."""

from __future__ import annotations

from pathlib import Path

import typer

from replab.cli._common import JSON_OPT, MODEL_OPT, examples, human_console, print_json

app = typer.Typer(help="List, check and export prompt sets.", no_args_is_help=True)


@app.command("list", epilog=examples("replab datasets list", "replab datasets list --json"))
def list_cmd(model: str = MODEL_OPT, json_out: bool = JSON_OPT):
    """List the builtin prompt sets (counts use the model's tokenizer)."""
    from replab.models import load_tokenizer
    from replab.prompts import list_datasets

    table = list_datasets(tokenizer=load_tokenizer(model))
    if json_out:
        print_json(table.to_dict(orient="records"))
        return
    short = table["description"].str.split(r"(?<=[.:(])\s", regex=True).str[0].str.rstrip(":(")
    table = table.assign(description=short.str.slice(0, 60))
    _print_table(table[["name", "n_prompts", "n_pairs", "labels", "description"]],
                 f"builtin prompt sets (in {table['path'].iloc[0].rsplit('/', 1)[0]})")


@app.command("check", epilog=examples(
    "replab datasets check next_day",
    "replab datasets check superset --known-only --out runs/superset_known.jsonl",
    "replab datasets check all --json",
))
def check_cmd(
    name: str = typer.Argument(..., help="Builtin set name, JSONL/CSV path, or 'all'."),
    model: str = MODEL_OPT,
    scoring: str = typer.Option("first_token", "--scoring",
                                help="first_token (default) or sum_logprob for multi-token answers."),
    known_only: bool = typer.Option(False, "--known-only",
                                    help="Keep only the items the model knows (see --out)."),
    out: Path = typer.Option(None, "--out", help="Write the (filtered) set as JSONL here."),
    per_prompt: Path = typer.Option(None, "--per-prompt",
                                    help="Write the per-prompt scores here (.csv or .parquet)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute even if cached."),
    json_out: bool = JSON_OPT,
):
    """Score a prompt set on the model: accuracy, median answer rank, known items."""
    from replab.cli._checks import check_sets

    summaries = check_sets(name, model, scoring, known_only, out, per_prompt, batch_size,
                           cache=not no_cache, progress=not json_out)
    if json_out:
        print_json(summaries if name == "all" else summaries[0])
        return
    import pandas as pd

    cols = {"name": "set", "n_prompts": "prompts", "n_with_answer": "answered",
            "accuracy": "top-1", "candidate_accuracy": "beats foils", "known_fraction": "known",
            "median_rank": "median rank", "n_multi_token_answers": "multi-token"}
    table = pd.DataFrame(summaries)[list(cols)].rename(columns=cols)
    _print_table(table, f"dataset check on {summaries[0].get('model', 'the model')} "
                        f"({scoring} scoring)")
    for s in summaries:
        for warning in s.get("warnings", []):
            typer.secho(f"warning [{s['name']}]: {warning}", fg="yellow", err=True)
        if s.get("written"):
            typer.echo(f"wrote {s['written']}")


@app.command("export", epilog=examples("replab datasets export next_day --out next_day.jsonl"))
def export_cmd(
    name: str = typer.Argument(..., help="Builtin set name or path."),
    out: Path = typer.Option(..., "--out", help="JSONL file to write."),
    model: str = MODEL_OPT,
):
    """Expand a builtin set (with the model's tokenizer) and write it as JSONL."""
    from replab.models import load_tokenizer
    from replab.prompts import load_prompts

    ps = load_prompts(name, tokenizer=load_tokenizer(model))
    ps.to_jsonl(out)
    typer.echo(f"wrote {len(ps)} prompts to {out}")


def _print_table(df, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(df.columns):
        table.add_column(str(col), no_wrap=(i == 0))
    for _, row in df.iterrows():
        table.add_row(*[_fmt(v) for v in row])
    human_console().print(table)


def _fmt(value) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "-" if value is None else str(value)

"""Options shared by the ``replab circuit ...`` commands (task, metric, ablation, output)."""

from __future__ import annotations

import typer

from replab.cli._common import N_BOOT_OPT, human_console, print_json

TASK = typer.Option("next_day", "--task", "-t",
                    help="Task: next_day, fact_recall, superclass (superclass:A,B), sequences "
                         "(sequences:TYPE,TYPE/shift|repeat|random), or a prompt set name.")
DATASET = typer.Option(None, "--dataset", "-d",
                       help="A JSONL/CSV/YAML prompt file with corrupt_prompt (replaces --task; for superclass "
                            "and sequences: their source set).")
CLASSES = typer.Option(None, "--classes", help="Super-classes A,B of the superclass task (clean, corrupt).")
TEMPLATE = typer.Option(None, "--template", help="Keep one template (sequences: the number of items shown).")
LIMIT = typer.Option(None, "--limit", help="Use at most N prompts (pairs).")
METRIC = typer.Option("logit_diff", "--metric",
                      help="logit_diff | margin | logprob | prob | kl | class_mass (superclass).")
ABLATION = typer.Option("mean", "--ablation",
                        help="zero | mean (over the clean prompts, per position) | resample | mean-other "
                             "(with --mean-over) | corrupt.")
MEAN_OVER = typer.Option(None, "--mean-over",
                         help="For --ablation mean-other: the prompts to average over (a task, prompt set or "
                              "file; add #corrupt for its corrupt prompts, e.g. sequences/random#corrupt).")
SEED = typer.Option(0, "--seed", help="Seed for random sets, resample ablation and the bootstrap.")
N_BOOT = N_BOOT_OPT
OUT = typer.Option(None, "--out", "-o", help="Run directory.")
COMPONENTS = typer.Option(..., "--components", "-c",
                          help="Components: L5H3, L5H3.q|.k|.v, L7MLP, L7ATTN, L7RESID, EMBED, with optional "
                               "positions (L5H3@-1, L5H3@3,4); a comma list or a JSON file.")


def done(summary: dict, json_out: bool, lines: list[str], keys=None) -> None:
    """Print ``--json`` (the summary, or its ``keys``) or the human ``lines`` and the run directory."""
    if json_out:
        print_json(summary if keys is None else {k: summary.get(k) for k in keys})
        return
    console = human_console()
    for line in lines:
        console.print(line, highlight=False)
    console.print(f"wrote {summary['out']}/ (replay: replab circuit replay {summary['out']}/config.yaml)",
                  highlight=False)

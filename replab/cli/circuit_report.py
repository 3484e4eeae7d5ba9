"""``replab circuit report``: the W1 component report (registers on :data:`replab.cli.circuit.app`).

Only parses options and prints; the work is :func:`replab.circuits.report_files.run_component_report`.
"""

from __future__ import annotations

import typer

from replab.cli._common import JSON_OPT, MODEL_OPT, examples, human_console, print_json
from replab.cli.circuit import app

JSON_KEYS = ("target", "corruption", "candidates", "grad_norms", "prompt", "ranking", "lora", "checks", "per",
             "layers", "seconds", "out")


@app.command("report", epilog=examples(
    "replab circuit report --task fact_recall --prompt-index 0",
    "replab circuit report --dataset my_facts.jsonl --prompt-index 3 --corruption mean --json",
    "replab circuit report --task fact_recall --prompt-index 0 --corruption zero --scoring sum_logprob --top 15"))
def report_cmd(dataset: str = typer.Option(None, "--dataset", "-d", help="A JSONL/CSV/YAML prompt file (prompt, "
                                                                           "answer, optionally corrupt_prompt)."),
               task: str = typer.Option(None, "--task", "-t", help="A builtin prompt set, e.g. fact_recall."),
               prompt_index: int = typer.Option(0, "--prompt-index", "-i", help="Which prompt of the set (0-based)."),
               corruption: str = typer.Option("other-prompt", "--corruption",
                                              help="other-prompt | zero | mean (recorded in the report)."),
               scoring: str = typer.Option("first_token", "--scoring",
                                           help="first_token (logit of the first target token) | sum_logprob."),
               top: int = typer.Option(10, "--top", help="Components to report as candidates."),
               layers: str = typer.Option("all", "--layers", help="Patch only these layers (all, 20-29, ...); "
                                                                    "gradient norms cover every layer."),
               out: str = typer.Option(None, "--out", "-o", help="Run directory."),
               model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Which heads and MLPs recall this fact: answer check, head z / MLP post patching, v / pre
    refinement, activation and gradient-norm evidence, a ranked JSON + Markdown report with the
    exact named_parameters() names (LoRA target_modules)."""
    from replab.circuits.report_files import run_component_report

    r = run_component_report(dataset=dataset, task=task, prompt_index=prompt_index, corruption=corruption,
                             scoring=scoring, top=top, out=out, model=model, layers=layers, progress=not json_out)
    if json_out:
        print_json({k: r[k] for k in JSON_KEYS})
        return
    t, c = r["target"], r["corruption"]
    console = human_console()
    console.print(f"{r['prompt']['text']!r} -> {t['text']!r}: logit {t['logit']:.3f}, prob {t['prob']:.4f}, "
                  f"rank {t['rank']}", highlight=False)
    console.print(f"corruption {c['kind']}: {t['metric']} clean {c['clean']:.3f}, fully corrupted "
                  f"{c['fully_corrupted']:.3f}", highlight=False)
    for cand in r["candidates"]:
        e = cand["evidence"]
        rd = e["refinement"]["drop"]
        console.print(f"{cand['rank']:>2}. {cand['component']:<8} drop {e['patch']['drop']:+.3f}  "
                      f"{e['refinement']['site']} {rd if rd is not None else float('nan'):+.3f}  "
                      f"grad {e['grad_norm']:.3g}  combined {e['combined_score']:.3f}", highlight=False)
    console.print(f"LoRA target_modules: {r['lora']['target_modules']}", highlight=False)
    console.print(f"wrote {r['out']}/ (report.json, report.md)", highlight=False)

"""``replab circuit edges`` and ``replab circuit discover``: edge-level circuits from the shell.

Registered on :data:`replab.cli.circuit.app`; each command parses options and calls one
library function (:func:`replab.circuits.edge_runs.run_edges` / ``run_discover``).
"""

from __future__ import annotations

import typer

from replab.cli._common import (
    ADDRESS_OPT,
    ENGINE_OPT,
    JSON_OPT,
    MODEL_OPT,
    WORKERS_OPT,
    examples,
    human_console,
    print_json,
)
from replab.cli.circuit import app

_TASK = typer.Option("next_day", "--task", "-t", help="Task: a builtin task (next_day, fact_recall) or prompt set.")
_DATASET = typer.Option(None, "--dataset", "-d", help="A JSONL/CSV/YAML prompt file with corrupt_prompt.")
_TEMPLATE = typer.Option(None, "--template", help="Keep one template (positions must line up).")
_LIMIT = typer.Option(None, "--limit", help="Use only the first N prompts.")
_OUT = typer.Option(None, "--out", "-o", help="Run directory.")
_METRIC = typer.Option("logit_diff", "--metric", help="logit_diff | margin | logprob | prob (kl: eap-ig only)")
_STEPS = typer.Option(5, "--steps", help="Integration steps (gradient passes) of eap-ig.")
_RULE = typer.Option("gauss-legendre", "--rule",
                     help="eap-ig integration rule: gauss-legendre (default: the most accurate per step) | "
                          "midpoint | riemann (Hanna et al.'s right Riemann sum; with --steps 1 it is EAP).")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


@app.command("edges", epilog=examples(
    "replab circuit edges --task next_day --method eap",
    "replab circuit edges --task next_day --method eap-ig --steps 5 --json",
    "replab circuit edges --task sequence_edges --method eap-ig --steps 5 --rule riemann",
    "replab circuit edges --task next_day --method 'atp*'",
    "replab circuit edges --task next_day --method exact --edges 'L23H3->LOGITS,EMBED->L0KV1.v'",
    "replab circuit edges --model tiny --task next_day --method eap --top 20 --random 50",
    "replab circuit edges --task next_day --method exact --edges all --engine ray --address auto --workers 8"))
def edges_cmd(task: str = _TASK, dataset: str = _DATASET, template: str = _TEMPLATE, limit: int = _LIMIT,
              method: str = typer.Option("eap", "--method", "-M", help="eap | eap-ig | atp* | exact"),
              steps: int = _STEPS, rule: str = _RULE, metric: str = _METRIC,
              edges: str = typer.Option(None, "--edges", help="Edges to patch exactly (SENDER->RECEIVER,...; "
                                                               "'all' on small models). Needed by --method exact."),
              top: int = typer.Option(50, "--top", help="Verification sample: the top N edges by |score|."),
              random: int = typer.Option(200, "--random", help="Verification sample: N more edges at random."),
              seed: int = typer.Option(0, "--seed", help="Seed of the random sample and the bootstrap."),
              verify: bool = typer.Option(True, "--verify/--no-verify", help="Patch the sample exactly."),
              graddrop: bool = typer.Option(True, "--graddrop/--no-graddrop",
                                            help="atp*: GradDrop magnitudes (one backward pass per layer)."),
              engine: str = ENGINE_OPT, address: str = ADDRESS_OPT, workers: int = WORKERS_OPT,
              out: str = _OUT, model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Score every edge of the model's graph (EAP, EAP-IG, AtP*) and check a sample exactly in the
    same run: Spearman/Pearson against exact edge patching and sign disagreements."""
    from replab.circuits.edge_runs import run_edges

    s = run_edges(task, method, out, model, steps=steps, rule=rule, metric=metric, edges=edges, graddrop=graddrop,
                  n_top=top, n_random=random, seed=seed, verify=verify, template=template, limit=limit,
                  dataset=dataset, progress=not json_out, engine=engine, workers=workers, address=address)
    if json_out:
        print_json(s)
        return
    console = human_console()
    g, v = s["graph"], s["verification"]
    console.print(f"{s['method']} on {s['task']['name']}: {g['edges']:,} edges ({g['senders']} senders, "
                  f"{g['receivers']} receivers)")
    if s.get("attribution"):
        a = s["attribution"]
        console.print(f"attribution: {a['passes']['forwards']} forwards + {a['passes']['backwards']} backwards "
                      f"in {a['seconds']:.1f} s")
    if s.get("exact"):
        checks = ", ".join(f"{k} {c['value']:.4g}" for k, c in s["exact"]["checks"].items())
        console.print(f"exact: {s['exact']['n_edges']} edges patched in {s['exact']['seconds']:.1f} s; "
                      f"checks passed: {checks}")
    sc = v.get("score", {})
    if v.get("status") == "ran":
        line = (f"verification ({sc['n']} edges): Spearman {_fmt(sc['spearman'])}, Pearson {_fmt(sc['pearson'])}, "
                f"sign disagreements {sc['sign_disagreements']} ({sc['sign_disagreements_material']} with "
                f"|exact| >= {sc['material_threshold']})")
        console.print(line)
        if "atp" in v and v["atp"].get("status") == "ran":
            console.print(f"  plain AtP on the same sample: Spearman {_fmt(v['atp']['spearman'])}")
        if "graddrop" in v and v["graddrop"].get("status") == "ran":
            console.print(f"  GradDrop magnitude vs |exact|: Spearman {_fmt(v['graddrop']['spearman'])}")
    else:
        console.print(f"verification: {v.get('status')}")
    for e in s["top_edges"][:8]:
        ex = "" if e["exact"] is None else f"  exact {e['exact']:+.4f}"
        sc_txt = "" if e["score"] != e["score"] else f"{e['score']:+.4f}"
        console.print(f"  {e['edge']:<22} {sc_txt}{ex}")
    console.print(f"wrote {s['out']}/")


@app.command("discover", epilog=examples(
    "replab circuit discover --task next_day --method eap-ig --edges 50,100,200,500,1000,2000",
    "replab circuit discover --task next_day --method eap,eap-ig,'atp*' --edges 100,1000,5000 --json",
    "replab circuit discover --task next_day --method eap-ig --compare-heads L23H3,L29H1,L23H0"))
def discover_cmd(task: str = _TASK, dataset: str = _DATASET, template: str = _TEMPLATE, limit: int = _LIMIT,
                 method: str = typer.Option("eap-ig", "--method", "-M",
                                            help="Comma list of eap | eap-ig | atp* (one curve each)."),
                 sizes: str = typer.Option("50,100,200,500,1000,2000,5000", "--edges",
                                           help="Circuit sizes (edges kept), comma list."),
                 steps: int = _STEPS, rule: str = _RULE, metric: str = _METRIC,
                 graddrop: bool = typer.Option(False, "--graddrop/--no-graddrop",
                                               help="Rank atp* circuits by GradDrop magnitude."),
                 threshold: float = typer.Option(0.8, "--threshold", help="Faithfulness to report the smallest "
                                                                           "circuit reaching."),
                 compare_heads: str = typer.Option(None, "--compare-heads",
                                                   help="Heads to compare the circuit's heads with (L5H3,... or a "
                                                        "JSON file with a 'heads' list, e.g. a pruning circuit)."),
                 out: str = _OUT, model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Keep the top edges, patch every other edge from the corrupt run, and measure each circuit's
    faithfulness exactly; a curve per method, each circuit as JSON and a layered figure."""
    from replab.circuits.discover import parse_sizes
    from replab.circuits.edge_runs import run_discover

    s = run_discover(task, method, parse_sizes(sizes), out, model, steps=steps, rule=rule, metric=metric,
                     graddrop=graddrop,
                     threshold=threshold, compare_heads=compare_heads, template=template, limit=limit,
                     dataset=dataset, progress=not json_out)
    if json_out:
        print_json(s)
        return
    console = human_console()
    checks = ", ".join(f"{k} {c['value']:.4g}" for k, c in s["exact"]["checks"].items())
    console.print(f"edge circuits on {s['task']['name']} ({s['graph']['edges']:,} edges in the graph); "
                  f"exact checks passed: {checks}")
    for r in s["curve"]:
        console.print(f"  {r['method']:<7} {r['n_edges']:>6} edges ({r['n_effective']:>6} effective, "
                      f"{r['n_heads']:>3} heads): faithfulness {r['faithfulness']:.3f} "
                      f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
    for mth, b in s["smallest_reaching_threshold"].items():
        if b is None:
            console.print(f"{mth}: no circuit of the sizes tried reaches {s['threshold']}")
        else:
            console.print(f"{mth}: smallest circuit reaching {s['threshold']}: {b['n_edges']} edges, faithfulness "
                          f"{b['faithfulness']:.3f}; heads: {', '.join(s['heads_of_smallest'][mth][:20])}")
    console.print(f"wrote {s['out']}/")

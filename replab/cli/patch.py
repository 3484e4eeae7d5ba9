"""``replab patch ...``, ``replab attribute ...`` and ``replab test-prompt``: W2 from the shell."""

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

app = typer.Typer(help="Activation patching: sweeps, head sweeps, baselines, attention patterns.",
                  no_args_is_help=True)
attribute_app = typer.Typer(help="Attribution: direct logit attribution and attribution patching.",
                            no_args_is_help=True)

_TASK = typer.Option("next_day", "--task", "-t",
                     help="Task: a builtin task (next_day, fact_recall) or prompt set name.")
_DATASET = typer.Option(None, "--dataset", "-d",
                        help="A JSONL/CSV/YAML prompt file with corrupt_prompt (overrides --task).")
_TEMPLATE = typer.Option(None, "--template", help="Keep one template (positions must line up).")
_LIMIT = typer.Option(None, "--limit", help="Use only the first N prompts.")
_OUT = typer.Option(None, "--out", "-o", help="Run directory.")


def _task(task: str, dataset: str | None) -> str:
    return dataset or task


def _top_heads_line(summary: dict) -> str:
    top = ", ".join(f"L{r['layer']}H{r['head']} {r['normalized_effect']:+.2f}" for r in summary["top_heads"][:6])
    return f"top heads by |output-patch effect|: {top}"


def _done(summary: dict, json_out: bool, lines: list[str]) -> None:
    if json_out:
        print_json(summary)
        return

    console = human_console()
    for line in lines:
        console.print(line)
    console.print(f"wrote {summary['out']}/")


@app.command("sweep", epilog=examples(
    "replab patch sweep --task next_day --site resid_pre --by layer,position",
    "replab patch sweep --task next_day --site z --by layer,head --direction noise --json",
    "replab patch sweep --task next_day --site mlp_out --by layer --source zero --metric kl",
    "replab patch sweep --dataset my_pairs.jsonl --site v --by layer,head --layers 10-20",
    "replab patch sweep --task next_day --site z --by layer,head --engine ray --workers 4 --address auto"))
def sweep_cmd(task: str = _TASK, dataset: str = _DATASET,
              site: str = typer.Option("resid_pre", "--site", "-s",
                                       help="resid_pre|resid_mid|resid_post|attn_out|mlp_out|mlp_pre|"
                                            "mlp_post|head_z|head_q|head_k|head_v|head_pattern"),
              by: str = typer.Option("layer,position", "--by",
                                     help="layer | layer,position | layer,head | layer,head,position"),
              direction: str = typer.Option("denoise", "--direction",
                                            help="denoise (clean→corrupt run, sufficiency) or noise "
                                                 "(corrupt→clean run, necessity)"),
              metric: str = typer.Option("logit_diff", "--metric",
                                         help="logit_diff | margin | logprob | prob | kl"),
              source: str = typer.Option(None, "--source",
                                         help="Patch in zero|mean|resample|noise instead of the other run."),
              scale: float = typer.Option(None, "--scale", help="Noise standard deviation (--source noise)."),
              layers: str = typer.Option("all", "--layers", help="Layer spec: all, 0-9, 5,10,..."),
              heads: str = typer.Option(None, "--heads", help="Comma list of heads (KV heads for k/v)."),
              positions: str = typer.Option(None, "--positions", help="Comma list of positions."),
              template: str = _TEMPLATE, limit: int = _LIMIT, out: str = _OUT,
              seed: int = typer.Option(0, "--seed", help="Seed for bootstrap, resample and noise."),
              engine: str = ENGINE_OPT, address: str = ADDRESS_OPT, workers: int = WORKERS_OPT,
              model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Patch one site at every layer × position (or layer × head) and write a tidy table + heatmap."""
    from replab.patching.runs import run_sweep

    ints = lambda s: None if s is None else [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    summary = run_sweep(_task(task, dataset), site=site, by=by, out=out, model=model,
                        template=template, limit=limit, progress=not json_out, direction=direction,
                        metric=metric, source=source, scale=scale, layers=layers, heads=ints(heads),
                        positions=ints(positions), seed=seed, engine=engine, workers=workers,
                        address=address)
    if json_out:
        import pandas as pd

        records = pd.read_parquet(f"{summary['out']}/sweep.parquet").to_dict("records")
        print_json({**summary, "records": records})
        return
    checks = ", ".join(f"{k} {v['value']:.4f}" for k, v in summary.get("checks", {}).items())
    _done(summary, False, [
        f"{summary['direction']} {summary['site']} by {summary['by']}: {summary['n_cells']} cells in "
        f"{summary['seconds']:.1f} s; clean {summary['metric']} {summary['clean_metric']:.3f}, "
        f"corrupt {summary['corrupt_metric']:.3f}",
        f"sanity checks passed: {checks}"])


@app.command("heads", epilog=examples("replab patch heads --task next_day --out runs/w2/heads",
                                      "replab patch heads --task next_day --direction noise --json"))
def heads_cmd(task: str = _TASK, dataset: str = _DATASET, template: str = _TEMPLATE,
              limit: int = _LIMIT, out: str = _OUT,
              direction: str = typer.Option("denoise", "--direction", help="denoise or noise"),
              model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Head output, value and pattern patching (layer × head) with z-vs-v / z-vs-pattern scatters."""
    from replab.patching.runs import run_heads

    summary = run_heads(_task(task, dataset), out=out, model=model, template=template, limit=limit,
                        progress=not json_out, direction=direction)
    _done(summary, json_out, [_top_heads_line(summary)])


@app.command("grid", epilog=examples("replab patch grid --task next_day --out runs/w2/grid",
                                     "replab patch grid --task next_day --direction noise --json",
                                     "replab patch grid --task next_day --limit 3 --layers 20-29"))
def grid_cmd(task: str = _TASK, dataset: str = _DATASET, template: str = _TEMPLATE,
             limit: int = _LIMIT, out: str = _OUT,
             direction: str = typer.Option("denoise", "--direction", help="denoise or noise"),
             layers: str = typer.Option("all", "--layers", help="Layer spec of every sweep: all, 20-29, 20-, ..."),
             model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """W2 step 5 (docs/workflows.md) in one command: resid_pre / attn_out / mlp_out layer × position heatmaps, and
    head output / value / pattern heatmaps with the z-vs-v and z-vs-pattern scatters."""
    from replab.patching.runs import run_grid

    s = run_grid(_task(task, dataset), out=out, model=model, template=template, limit=limit,
                 progress=not json_out, direction=direction, **({} if layers == "all" else {"layers": layers}))
    _done(s, json_out, [f"{k}: {v}/" for k, v in s["parts"].items()] + [_top_heads_line(s)])


@app.command("baseline", epilog=examples("replab patch baseline --task next_day",
                                         "replab patch baseline --task fact_recall --json"))
def baseline_cmd(task: str = _TASK, dataset: str = _DATASET, template: str = _TEMPLATE,
                 limit: int = _LIMIT, out: str = _OUT, model: str = MODEL_OPT,
                 json_out: bool = JSON_OPT) -> None:
    """Per-prompt clean and corrupt metrics (logit diff, margin, log-prob, prob, KL) and candidate logits."""
    from replab.patching.runs import run_baseline

    s = run_baseline(_task(task, dataset), out=out, model=model, template=template, limit=limit)
    _done(s, json_out, [f"mean logit diff: clean {s['mean']['clean']['logit_diff']:.3f}, corrupt "
                        f"{s['mean']['corrupt']['logit_diff']:.3f}; clean prompts with answer > foil: "
                        f"{s['frac_clean_positive_logit_diff']:.0%}"])


@app.command("patterns", epilog=examples("replab patch patterns --task next_day --heads 14.3,20.1",
                                         "replab patch patterns --task next_day --from runs/w2/heads --top 9"))
def patterns_cmd(task: str = _TASK, dataset: str = _DATASET,
                 heads: str = typer.Option(None, "--heads", help="LAYER.HEAD list, e.g. 14.3,20.1"),
                 from_dir: str = typer.Option(None, "--from", help="A head sweep or DLA run: use its top heads."),
                 top: int = typer.Option(9, "--top", help="How many heads to take from --from."),
                 template: str = _TEMPLATE, limit: int = _LIMIT, out: str = _OUT,
                 model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Attention patterns of chosen (or top) heads on the task's tokens, grouped early/middle/late."""
    from replab.patching.runs import run_patterns

    s = run_patterns(_task(task, dataset), heads=heads, from_dir=from_dir, top=top, out=out,
                     model=model, template=template, limit=limit)
    _done(s, json_out, [f"{h['head']} ({h['group']}): last token attends to {h['last_attends_to']} "
                        f"({h['weight']:.2f})" for h in s["heads"]])


@attribute_app.command("dla", epilog=examples("replab attribute dla --task next_day",
                                              "replab attribute dla --task next_day --json"))
def dla_cmd(task: str = _TASK, dataset: str = _DATASET, template: str = _TEMPLATE,
            limit: int = _LIMIT, out: str = _OUT,
            top: int = typer.Option(6, "--top", help="Top positive/negative heads to list."),
            model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Direct logit attribution: accumulated residual, per layer (attn/MLP) and per head."""
    from replab.patching.runs import run_dla

    s = run_dla(_task(task, dataset), out=out, model=model, template=template, limit=limit, top=top)
    heads = ", ".join(f"L{r['layer']}H{r['head']} {r['logit_diff']:+.2f}" for r in s["top_heads"])
    _done(s, json_out, [f"mean logit diff {s['logit_diff_mean']:.3f}; components sum to it within "
                        f"{s['max_abs_sum_error']:.1e}", f"top heads (direct effect): {heads}"])


@attribute_app.command("atp", epilog=examples("replab attribute atp --task next_day --top 20",
                                              "replab attribute atp --task next_day --no-all-heads --json"))
def atp_cmd(task: str = _TASK, dataset: str = _DATASET, template: str = _TEMPLATE,
            limit: int = _LIMIT, out: str = _OUT,
            top: int = typer.Option(20, "--top", help="Components per kind to patch exactly."),
            all_heads: bool = typer.Option(True, "--all-heads/--no-all-heads",
                                           help="Also patch every head exactly (for the Spearman check)."),
            model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Attribution patching for every head, layer, MLP and neuron; exact values for the top ones."""
    from replab.patching.runs import run_atp

    s = run_atp(_task(task, dataset), out=out, model=model, template=template, limit=limit, top=top,
                all_heads=all_heads)
    lines = [f"AtP vs exact over {s['n_exact']} components: Spearman {s['all_spearman']:.3f}"]
    if "heads_spearman" in s:
        lines.append(f"heads ({s['heads_compared']}): Spearman {s['heads_spearman']:.3f}, "
                     f"Pearson {s['heads_pearson']:.3f}")
    _done(s, json_out, lines)


def test_prompt_cmd(prompt: str = typer.Argument(..., help="The prompt."),
                    answer: str = typer.Argument(None, help="The expected answer, with its leading space."),
                    top_k: int = typer.Option(10, "--top-k", "-k", help="How many tokens to list."),
                    model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Top-k next tokens with logits and probabilities, and the rank of the answer."""
    from replab.errors import ReplabError
    from replab.patching.runs import test_prompt

    if top_k < 1:
        raise ReplabError("--top-k must be at least 1")
    res = test_prompt(prompt, answer, top_k, model)
    if json_out:
        print_json(res)
        return
    from rich.table import Table

    t = Table(title=f"{prompt!r} → next token")
    for c in ("rank", "token", "logit", "prob"):
        t.add_column(c)
    for r in res["top"]:
        t.add_row(str(r["rank"]), repr(r["token"]), f"{r['logit']:.3f}", f"{r['prob']:.4f}")
    console = human_console()
    console.print(t)
    if "answer" in res:
        a = res["answer"]
        console.print(f"answer {a['token']!r}: rank {a['rank']}, logit {a['logit']:.3f}, prob {a['prob']:.4f}")


TEST_PROMPT_EPILOG = examples('replab test-prompt "Today it is Monday so tomorrow it is" " Tuesday"',
                              'replab test-prompt "The capital of France is" " Paris" --top-k 5 --json')

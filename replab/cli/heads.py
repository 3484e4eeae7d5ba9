"""``replab heads ...``: head detectors, OV/QK circuits, composition scores, patterns.

Only parses options and prints; the work is :mod:`replab.heads.runs` (one call per command).
"""

from __future__ import annotations

import typer

from replab.cli._common import JSON_OPT, MODEL_OPT, examples, human_console, print_json

app = typer.Typer(help="Head function: detectors, OV/QK circuits, composition, attention patterns.",
                  no_args_is_help=True,
                  epilog=examples("replab heads detect", "replab heads ov --tokens weekdays",
                                  "replab heads composition --mode v"))

_OUT = typer.Option(None, "--out", "-o", help="Run directory.")
_TOKENS = typer.Option("weekdays", "--tokens", help="digits | months | weekdays | words | FILE (one item per line, "
                                                    "in sequence order).")
_HEADS = typer.Option(None, "--heads", help="Query heads to draw, e.g. L23H3,L29H1 (default: the top 3).")
_CYCLIC = typer.Option(None, "--cyclic/--no-cyclic", help="Does the last item continue to the first? (default: "
                                                          "months/weekdays yes, digits and files no)")
_LAYERS = typer.Option("all", "--layers", help="Layer spec: all, 0-9, 5,10,...")


def _done(s: dict, json_out: bool, lines: list[str], json_data: dict | None = None) -> None:
    if json_out:
        print_json(json_data if json_data is not None else s)
        return
    console = human_console()
    for line in lines:
        console.print(line, highlight=False)
    console.print(f"wrote {s['out']}/", highlight=False)


@app.command("detect", epilog=examples(
    "replab heads detect",
    "replab heads detect --detectors previous,duplicate,induction --json",
    "replab heads detect --text my_texts.txt --detectors previous,bos,positional",
    "replab heads detect --crosscheck   # also run TransformerLens detect_head on the same inputs"))
def detect_cmd(detectors: str = typer.Option("all", "--detectors", "-d",
                                             help="previous,duplicate,induction,bos,positional,copying (or all)."),
               text: str = typer.Option(None, "--text", help="A text file, one text per line: run the pattern "
                                                              "detectors on it (scores averaged over lines)."),
               n_seqs: int = typer.Option(10, "--n-seqs", help="Random sequences (without --text)."),
               half: int = typer.Option(25, "--half", help="Tokens per random sequence before it repeats."),
               tokens: str = typer.Option("words", "--tokens", help="Token set of the copying detector."),
               seed: int = typer.Option(0, "--seed", help="Seed of the random sequences and word sample."),
               crosscheck: bool = typer.Option(False, "--crosscheck", help="Compare previous/duplicate/induction "
                                                                          "with TransformerLens detect_head."),
               out: str = _OUT, model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Score every query head as a previous-token, duplicate-token, induction, BOS, positional
    and copying head; a tidy table and a heatmap per detector."""
    from replab.errors import ReplabError
    from replab.heads.runs import run_detect

    if n_seqs < 1 or half < 2:
        raise ReplabError("--n-seqs must be >= 1 and --half >= 2")
    s = run_detect(detectors, text=text, out=out, model=model, n_seqs=n_seqs, half=half, seed=seed,
                   tokens=tokens, crosscheck=crosscheck, progress=not json_out)
    if json_out:
        import pandas as pd

        records = pd.read_parquet(f"{s['out']}/detectors.parquet").to_dict("records")
        keep = {k: s.get(k) for k in ("detectors", "per", "inputs", "ideal", "top_heads", "seconds", "out",
                                      "transformer_lens_max_abs_diff", "copying_tokens")}
        if keep["inputs"] and "texts" in keep["inputs"]:
            keep["inputs"] = {k: v for k, v in keep["inputs"].items() if k != "texts"}
        print_json({**keep, "records": records})
        return
    lines = [f"{d}: " + ", ".join(f"{h['head']} {h['score']:.3f}" for h in heads)
             for d, heads in s["top_heads"].items()]
    if "ideal" in s:
        lines.append("a perfect head would score: " + ", ".join(f"{k} {v:.3f}" for k, v in s["ideal"].items()))
    if "transformer_lens_max_abs_diff" in s:
        lines.append("max |replab - TransformerLens detect_head|: "
                     + ", ".join(f"{k} {v:.1e}" for k, v in s["transformer_lens_max_abs_diff"].items()))
    _done(s, False, lines)


@app.command("ov", epilog=examples("replab heads ov --tokens weekdays",
                                   "replab heads ov --tokens months --heads L23H3,L29H1 --json",
                                   "replab heads ov --tokens my_items.txt --cyclic"))
def ov_cmd(tokens: str = _TOKENS, heads: str = _HEADS, cyclic: bool = _CYCLIC, layers: str = _LAYERS,
           out: str = _OUT, model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """OV circuits on a token set: per query head, how often the attended token's own logit is top
    (copy) and how often the next item's is (" Monday" -> " Tuesday"), plus token x token matrices."""
    from replab.heads.runs import run_ov

    s = run_ov(tokens, heads=heads, out=out, model=model, cyclic=cyclic, layers=layers)
    lines = [f"token set {s['tokens']['name']}: {s['tokens']['n']} single tokens"
             + (f" ({len(s['tokens']['dropped'])} multi-token items dropped)" if s["tokens"]["dropped"] else "")]
    for col, rows in s["top"].items():
        lines.append(f"top {col}: " + ", ".join(f"L{r['layer']}H{r['head']} {r[col]:.2f}" for r in rows))
    _done(s, json_out, lines)


@app.command("qk", epilog=examples("replab heads qk --tokens weekdays",
                                   "replab heads qk --tokens months --offset 3 --heads L23H3 --json"))
def qk_cmd(tokens: str = _TOKENS, heads: str = _HEADS, cyclic: bool = _CYCLIC, layers: str = _LAYERS,
           offset: int = typer.Option(0, "--offset", help="Rotary models: query position minus key position."),
           n_pos: int = typer.Option(32, "--n-pos", help="Learned-position models: positions in the positional QK."),
           out: str = _OUT, model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """QK circuits on a token set (which token attends to which), per query head; positional QK
    for learned positions, a rotary note and --offset for rotary models."""
    from replab.heads.runs import run_qk

    s = run_qk(tokens, heads=heads, out=out, model=model, offset=offset, cyclic=cyclic, layers=layers,
               n_pos=n_pos)
    lines = ["top by self_minus_mean: " + ", ".join(f"L{r['layer']}H{r['head']} {r['self_minus_mean']:.2f}"
                                                     for r in s["top"])]
    if s.get("positions"):
        lines.append(f"positions: {s['positions']}")
    _done(s, json_out, lines)


@app.command("composition", epilog=examples("replab heads composition --mode q",
                                            "replab heads composition --mode k --into L18H6,L17H4",
                                            "replab heads composition --mode all --top 10 --json"))
def composition_cmd(mode: str = typer.Option("all", "--mode", help="q | k | v | all (or a comma list)."),
                    top: int = typer.Option(20, "--top", help="Pairs per mode in the top-pairs table."),
                    n_random: int = typer.Option(200, "--n-random", help="Random matrix pairs for the baseline."),
                    seed: int = typer.Option(0, "--seed"),
                    into: str = typer.Option(None, "--into", help="Receivers (e.g. L18H6,L17H4): list their "
                                                                 "strongest senders per mode."),
                    out: str = _OUT, model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Q-, K- and V-composition scores between every pair of query heads in different layers,
    with a random-matrix baseline: heatmaps and a top-pairs table."""
    from replab.errors import ReplabError
    from replab.heads.runs import run_composition

    if top < 1 or n_random < 2:
        raise ReplabError("--top must be >= 1 and --n-random >= 2")
    s = run_composition(mode, out=out, model=model, top=top, n_random=n_random, seed=seed, into=into)
    lines = [f"{s['n_pairs']} pairs per mode in {s['seconds']:.1f} s"]
    for md, rows in s["top_pairs"].items():
        b = s["baseline"][md]
        lines.append(f"{md.upper()}: baseline {b['mean']:.3f} (p95 {b['p95']:.3f}); top "
                     + ", ".join(f"L{r['sender_layer']}H{r['sender_head']}->L{r['receiver_layer']}"
                                 f"H{r['receiver_head']} {r['score']:.3f}" for r in rows))
    for head, per_mode in s.get("into", {}).items():
        for md, rows in per_mode.items():
            n = rows[0]["of"] if rows else 0
            lines.append(f"into {head} ({md.upper()}): "
                         + ", ".join(f"{r['sender']} {r['score']:.3f}" for r in rows) + f" (of {n} earlier heads)")
    _done(s, json_out, lines)


@app.command("patterns", epilog=examples(
    'replab heads patterns --heads L23H3,L29H1 --prompt "Today it is Monday so tomorrow it is"',
    "replab heads patterns --heads L23H3,L2H5 --dataset next_day --prompt-index 0",
    "replab heads patterns --heads L23H3,L24H7 --task next_day --json"))
def patterns_cmd(heads: str = typer.Option(..., "--heads", help="Query heads, e.g. L5H3,L23H3."),
                 prompt: str = typer.Option(None, "--prompt", help="One prompt."),
                 dataset: str = typer.Option(None, "--dataset", "-d", help="A prompt set (builtin or file)."),
                 task: str = typer.Option(None, "--task", "-t", help="A patching task (mean over its clean prompts)."),
                 prompt_index: int = typer.Option(None, "--prompt-index", help="With --dataset: one prompt."),
                 out: str = _OUT, model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Attention patterns of chosen heads on a prompt's tokens, in early / middle / late rows."""
    from replab.heads.runs import run_patterns

    s = run_patterns(heads, prompt=prompt, dataset=dataset, task=task, prompt_index=prompt_index, out=out,
                     model=model)
    _done(s, json_out, [f"{h['head']} ({h['group']}): last token attends to {h['last_attends_to']} "
                        f"({h['weight']:.2f})" for h in s["heads"]])

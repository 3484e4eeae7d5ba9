"""The library calls behind ``replab circuit edges`` and ``replab circuit discover``.

Each loads the model and task, then writes a run directory like every circuit command
(:mod:`replab.circuits.runs`): ``config.yaml`` first (the resolved options, replayable with
``replab circuit replay DIR/config.yaml``), tables as Parquet + CSV, figures as PNG + SVG,
circuits as JSON, and ``summary.json`` last with the model identity.
"""

from __future__ import annotations

import json
from pathlib import Path

from replab.circuits.runs import finish, runner, start
from replab.distributed import check_engine
from replab.errors import ReplabError
from replab.hooks import head_label, parse_head_list
from replab.io import read_text, write_json_atomic
from replab.patching.executors import engine_scope
from replab.rundir import write_table

#: option name -> command-line flag where they differ
_EDGE_FLAGS = {"n_top": "--top", "n_random": "--random", "verify": "--verify", "graddrop": "--graddrop"}
_DISCOVER_FLAGS = {"methods": "--method", "sizes": "--edges", "graddrop": "--graddrop"}


def _load(model, task, template, limit, dataset=None):
    from replab.patching.runs import load

    return load(model, dataset or task, template, limit)


@runner("edges")
def run_edges(task: str = "next_day", method: str = "eap", out=None, model: str | None = None, *,
              steps: int = 5, metric: str = "logit_diff", rule: str = "gauss-legendre", edges=None,
              graddrop: bool = True, n_top: int = 50,
              n_random: int = 200, seed: int = 0, verify: bool = True, template=None, limit=None,
              dataset=None, progress: bool = True, engine: str = "local", workers: int | None = None,
              address: str | None = None) -> dict:
    """:func:`replab.circuits.edges.score_edges` on a named task, written to ``out``:
    ``edges.parquet|csv`` (every edge), ``verification.parquet|csv`` (the exactly patched edges),
    ``approx_vs_exact.png|svg`` and ``summary.json``. Returns the summary (plus ``out``).
    ``engine="ray"`` patches the edges exactly on ``workers`` Ray actors of the cluster at
    ``address`` (:mod:`replab.patching.executors`; same scores as the local engine)."""
    from replab.circuits.edge_plots import approx_vs_exact
    from replab.circuits.edges import check_options, score_edges
    from replab.patching.plots import save_figure

    method = check_options(method, metric, steps, edges, rule=rule)       # before the model loads
    check_engine(engine, workers, address)
    m, t = _load(model, task, template, limit, dataset)
    tag = method.replace("*", "star")
    options = {"task": task, "method": method, "model": model, "steps": steps, "rule": rule, "metric": metric,
               "edges": edges, "graddrop": graddrop, "n_top": n_top, "n_random": n_random, "seed": seed,
               "verify": verify, "template": template, "limit": limit, "dataset": dataset}
    out = start(Path(out or f"runs/edges-{tag}-{t.name.replace('/', '_')}"), "edges", options, _EDGE_FLAGS)
    with engine_scope(engine, workers=workers, address=address) as eng:
        res = score_edges(m, t, method, steps=steps, metric=metric, rule=rule, edges=edges, graddrop=graddrop,
                          n_top=n_top,
                          n_random=n_random, seed=seed, verify=verify, progress=progress, engine=eng)
        described = eng.describe()
    files = write_table(res.table, out, "edges")
    sample = res.sample
    if len(sample):
        files += write_table(sample.reset_index(drop=True), out, "verification")
    if res.verification.get("status") == "ran":
        files += save_figure(approx_vs_exact(sample, method, f"{method} vs exact edge patching, task {t.name}"),
                             out / "approx_vs_exact")
    summary = {"task": t.describe(), "steps": steps if method == "eap-ig" else None,
               "rule": rule if method == "eap-ig" else None, **res.summary(),
               "engine": described, "files": files}
    return finish(out, summary, m)


@runner("discover")
def run_discover(task: str = "next_day", methods=("eap-ig",), sizes=None, out=None, model: str | None = None, *,
                 steps: int = 5, metric: str = "logit_diff", rule: str = "gauss-legendre", graddrop: bool = False,
                 threshold: float = 0.8,
                 compare_heads=None, template=None, limit=None, dataset=None, progress: bool = True) -> dict:
    """:func:`replab.circuits.discover.discover_circuits` on a named task, written to ``out``:
    ``faithfulness.parquet|csv``, ``faithfulness.png|svg`` (one line per method), and per circuit
    ``circuits/<method>_<k>.json`` + ``.png|svg``; ``summary.json`` names the smallest circuit
    reaching ``threshold`` per method, its heads (the node-level view) and, given
    ``compare_heads`` (a head list or a JSON file with a ``heads`` list), their overlap."""
    from replab.circuits.discover import DEFAULT_SIZES, discover_circuits, parse_sizes
    from replab.circuits.edge_plots import circuit_figure, faithfulness_curve
    from replab.circuits.edges import check_options
    from replab.circuits.graph import head_overlap, heads_by_weight
    from replab.patching.plots import save_figure

    if isinstance(methods, str):
        methods = [x.strip() for x in methods.split(",") if x.strip()]
    if not methods:
        raise ReplabError("give at least one attribution method (--method eap,eap-ig,atp*)")
    methods = [check_options(mth, metric, steps, None, exact_ok=False, rule=rule) for mth in methods]
    other = _heads_arg(compare_heads)
    sizes = parse_sizes(sizes or DEFAULT_SIZES)
    m, t = _load(model, task, template, limit, dataset)
    options = {"task": task, "methods": methods, "sizes": sizes, "model": model, "steps": steps, "rule": rule,
               "metric": metric,
               "graddrop": graddrop, "threshold": threshold, "compare_heads": other, "template": template,
               "limit": limit, "dataset": dataset}
    out = start(Path(out or f"runs/discover-{t.name.replace('/', '_')}"), "discover", options, _DISCOVER_FLAGS)
    res = discover_circuits(m, t, methods, sizes, steps=steps, metric=metric, rule=rule, graddrop=graddrop,
                            progress=progress)
    files = write_table(res.table, out, "faithfulness")
    files += save_figure(faithfulness_curve(res.table, f"edge circuits on {t.name}: exact faithfulness", threshold),
                         out / "faithfulness")
    g = res.graph
    for (method, k), circuit in res.circuits.items():
        stem = out / "circuits" / f"{method.replace('*', 'star')}_{k}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(stem.with_suffix(".json"), {**circuit, "task": t.name, "metric": metric})
        files.append(str(stem.with_suffix(".json")))
        files += save_figure(circuit_figure(circuit, g.n_layers, g.n_heads, g.n_kv_heads), stem)
    best = res.smallest(threshold)
    heads = {mth: (res.circuits[(mth, b["n_edges"])]["heads"] if b else None) for mth, b in best.items()}
    heavy = {mth: ([{"head": h, "weight": w} for h, w in
                    heads_by_weight(res.circuits[(mth, b["n_edges"])]["edges"], g.n_heads, g.n_kv_heads)[:15]]
                   if b else None) for mth, b in best.items()}
    overlap = ({mth: head_overlap(h, other) for mth, h in heads.items() if h is not None}
               if other is not None else "not run: no --compare-heads given")
    summary = {"task": t.describe(), "metric": metric, "methods": list(methods),
               "steps": steps, "rule": rule, "graph": g.counts(), "threshold": threshold, "exact": res.plan,
               "seconds": res.seconds, "attribution": {mth: a.describe() for mth, a in res.attributions.items()},
               "curve": res.table.to_dict("records"), "smallest_reaching_threshold": best,
               "heads_of_smallest": heads, "heaviest_heads_of_smallest": heavy,
               "overlap_with_compare_heads": overlap, "files": files}
    return finish(out, summary, m)


def _heads_arg(value):
    """A comma list of heads (``L5H3,20.1``), a JSON file with a list or a ``heads`` list, or
    None -> canonical names (``["L5H3", "L20H1"]``); heads parsed by :func:`replab.hooks.parse_head_list`."""
    if value is None:
        return None
    path = Path(str(value))
    if isinstance(value, (list, tuple)):
        heads = list(value)
    elif path.suffix == ".json":
        if not path.is_file():
            raise ReplabError(f"--compare-heads file {path} does not exist")
        try:
            data = json.loads(read_text(path, "--compare-heads file"))
        except ValueError as exc:
            raise ReplabError(f"--compare-heads file {path} is not JSON ({exc})") from None
        heads = data.get("heads", data.get("components")) if isinstance(data, dict) else data
        if not isinstance(heads, list):
            raise ReplabError(f"--compare-heads file {path} must hold a list of heads or {{\"heads\": [...]}}")
    else:
        heads = str(value)
    try:
        return [head_label(layer, h) for layer, h in parse_head_list(heads)]
    except ReplabError as exc:
        raise ReplabError(f"--compare-heads takes query heads such as L5H3: {exc}") from None

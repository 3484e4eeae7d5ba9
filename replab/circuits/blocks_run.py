"""``replab circuit blocks|hydra|grid``: one call each, writing a run directory.

* blocks: ``config.yaml``, ``blocks`` (layer × block × test, every candidate logit),
  ``per_prompt``, ``blocks_heatmap``, ``summary.json``;
* hydra: ``heads`` (every head: clean and ablated direct effect, compensation, CI),
  ``hydra`` figure, ``summary.json`` with the verdict;
* grid: ``grid`` (per group/class), ``by_class`` (pooled), ``controls`` (with ``silent``),
  ``grid_heatmap``, ``summary.json``.
"""

from __future__ import annotations

from replab.circuits.ablation import Ablation
from replab.circuits.components import names, parse_components
from replab.circuits.runs import finish, load, runner, start
from replab.errors import ReplabError
from replab.rundir import write_table


def _positions(task, rule):
    from replab.patching.task import task_positions

    if rule is None or str(rule).strip() in ("", "all"):
        return None
    return task_positions(task, rule)


def _layers(model, layer, layers) -> list[int]:
    from replab.hooks import parse_layers

    if layer is None and layers is None:
        raise ReplabError("give --layer L or --layers A-B")
    spec = layers if layers is not None else str(layer)
    return parse_layers(spec, model.cfg.n_layers)


@runner("blocks")
def run_blocks(layer=None, layers=None, task: str = "next_day", out=None, model: str | None = None, dataset=None,
               classes=None, template=None, limit=None, metric: str = "logit_diff", ablation: str = "zero",
               mean_over=None, positions=None, seed: int = 0, n_boot: int = 1000, progress: bool = True) -> dict:
    """Block sweeps at ``layer`` (or over ``layers``): necessity (ablate) and sufficiency
    (clean → corrupt) of the residual stream, each head and the MLP
    (:func:`replab.circuits.blocks.block_sweeps`). ``positions``: ``all`` or a rule (``entity_last``,
    ``last``, ``-1``, ``3,4``)."""
    from replab.circuits.blocks import block_sweeps
    from replab.circuits.plots import blocks_heatmap
    from replab.patching.plots import save_figure

    abl = Ablation(ablation, mean_over, seed)
    m, t = load(model, task, dataset, classes, template, limit)
    lay = _layers(m, layer, layers)
    pos = _positions(t, positions)
    options = {"layers": ",".join(map(str, lay)), "task": task, "dataset": dataset, "classes": classes,
               "template": template, "limit": limit, "model": model, "metric": metric, "ablation": abl.kind,
               "mean_over": mean_over, "positions": positions, "seed": seed, "n_boot": n_boot}
    out = start(out or "runs/circuit-blocks", "blocks", options)
    res = block_sweeps(m, t, lay, abl, metric, pos, n_boot, seed, progress=progress)
    files = write_table(res.table, out, "blocks") + write_table(res.per_prompt, out, "per_prompt")
    title = f"block sweeps ({abl.describe()} / clean→corrupt), {metric}, {t.name}"
    files += save_figure(blocks_heatmap(res.table, title), out / "blocks_heatmap")
    summary = {"task": t.describe(), **res.summary, "records": res.table.drop(columns=["candidate_logits"])
               .to_dict("records"), "files": files}
    return finish(out, summary, m)


@runner("hydra")
def run_hydra(ablate, task: str = "next_day", out=None, model: str | None = None, dataset=None, classes=None,
              template=None, limit=None, metric: str = "logit_diff", ablation: str = "mean", mean_over=None,
              min_fraction: float = 0.1, seed: int = 0, n_boot: int = 1000, progress: bool = True) -> dict:
    """Backup heads: ablate ``ablate`` and rank every other head by the rise of its direct
    effect (:func:`replab.circuits.hydra.find_backups`)."""
    from replab.circuits.hydra import find_backups
    from replab.circuits.plots import hydra_bars
    from replab.patching.plots import save_figure

    abl = Ablation(ablation, mean_over, seed)
    m, t = load(model, task, dataset, classes, template, limit)
    comps = parse_components(ablate, m, t.n_tokens)
    options = {"ablate": names(comps), "task": task, "dataset": dataset, "classes": classes, "template": template,
               "limit": limit, "model": model, "metric": metric, "ablation": abl.kind, "mean_over": mean_over,
               "min_fraction": min_fraction, "seed": seed, "n_boot": n_boot}
    out = start(out or "runs/circuit-hydra", "hydra", options)
    res = find_backups(m, t, comps, abl, metric, min_fraction, n_boot, seed, progress)
    files = write_table(res.table, out, "heads")
    title = f"direct effects after ablating {','.join(names(comps))} ({abl.describe()}), {t.name}"
    files += save_figure(hydra_bars(res.table[~res.table["in_set"]], title), out / "hydra")
    return finish(out, {"task": t.describe(), **res.summary, "files": files}, m)


@runner("grid")
def run_grid(sweep: str = "blocks", task: str = "superclass", layer=None, layers=None, components=None,
             out=None, model: str | None = None, dataset=None, classes=None, template=None, limit=None,
             pairs: int = 16, label=None, controls: bool = True, metric: str | None = None, ablation: str | None = None,
             mean_over=None, positions=None, ablate_mlps: bool = False, silent_fraction: float = 0.25,
             seed: int = 0, n_boot: int = 200, progress: bool = True) -> dict:
    """A sweep repeated over a grid (:mod:`replab.circuits.grid`): ``task="superclass"`` with
    ``classes`` (``"artist,athlete,scientist,politician,writer"``: every ordered pair, up to
    ``pairs`` entity pairs each, plus the control people), or any task split by its per-prompt
    ``label`` (e.g. ``seq_type`` for ``sequences``)."""
    from replab.circuits.grid import control_task, grid_sweep, superclass_tasks
    from replab.circuits.plots import grid_heatmap
    from replab.models.coerce import as_model
    from replab.patching.catalog import load_task
    from replab.patching.plots import save_figure

    m = as_model(model, device="cpu")
    bos = bool(m.cfg.default_prepend_bos)
    superclass = str(task).split(":")[0] == "superclass"
    metric = metric or ("class_mass" if superclass else "logit_diff")
    abl = Ablation(ablation or ("zero" if sweep == "blocks" else "mean"), mean_over, seed)
    if superclass:
        cls = [c.strip() for c in (classes or "artist,athlete,scientist,politician,writer").split(",") if c.strip()]
        if len(cls) < 2:
            raise ReplabError("the super-class grid needs at least two classes")
        tasks = superclass_tasks(m.tokenizer, cls, pairs, template, dataset, bos)
        ctrl = {g: c for g, t in tasks.items() if controls and (c := control_task(m.tokenizer, t, dataset, bos))}
        label = None
    else:
        t = load_task(task, m.tokenizer, template=template, limit=limit, prepend_bos=bos, classes=classes,
                      dataset=dataset)
        tasks, ctrl = {t.name: t}, {}
        if label is None:
            raise ReplabError("a grid over a non-superclass task needs --label (a per-prompt label column, e.g. "
                              "seq_type for the sequences task)")
    first = next(iter(tasks.values()))
    lay = _layers(m, layer, layers) if sweep == "blocks" else None
    comps = parse_components(components, m, first.n_tokens) if components else None
    pos = _positions(first, positions)
    options = {"sweep": sweep, "task": task, "layers": ",".join(map(str, lay)) if lay else None,
               "components": names(comps) if comps else None, "model": model, "dataset": dataset,
               "classes": classes, "template": template, "limit": limit, "pairs": pairs, "label": label,
               "controls": controls, "metric": metric, "ablation": abl.kind, "mean_over": mean_over,
               "positions": positions, "ablate_mlps": ablate_mlps, "silent_fraction": silent_fraction,
               "seed": seed, "n_boot": n_boot}
    out = start(out or "runs/circuit-grid", "grid", options)
    res = grid_sweep(m, tasks, sweep, lay, comps, abl, metric, pos, ablate_mlps, label, ctrl, silent_fraction, n_boot,
               seed, progress)
    files = write_table(res.rows, out, "grid") + write_table(res.by_class, out, "by_class")
    if len(res.controls):
        files += write_table(res.controls, out, "controls")
    files += save_figure(grid_heatmap(res.by_class, f"{sweep} split by class ({metric}, {abl.describe()})"),
                         out / "grid_heatmap")
    answers = {int(a) for t in tasks.values() for a in t.answer.tolist()}
    summary = {**res.summary, "n_answer_words": len(answers), "tasks": {_g(g): t.describe() for g, t in tasks.items()},
               "by_class": res.by_class.to_dict("records"),
               "controls": res.controls.to_dict("records") if len(res.controls) else [], "files": files}
    return finish(out, summary, m)


def _g(group) -> str:
    return "→".join(group) if isinstance(group, tuple) else str(group)

"""``replab plot ...``: representation geometry figures (PCA / UMAP per layer, cosines, probe curves)."""

from __future__ import annotations

from pathlib import Path

import typer

from replab.cli._common import JSON_OPT, examples, print_json

app = typer.Typer(help="Geometry figures: PCA/UMAP per layer, class-mean cosines, probe curves.",
                  no_args_is_help=True)

STORE = typer.Option(..., "--store", help="Activation store directory.")
COLOR = typer.Option(..., "--color", help="Index column that colours points / defines classes.")
LAYERS = typer.Option("all", "--layers", help="all, 5, 0-9, 10-, 0,5,10.")
HOOK = typer.Option("resid_post", "--hook", help="Hook alias or one full hook name.")
WHERE = typer.Option(None, "--where", help="pandas query on the index to keep some rows.")
OUT = typer.Option(None, "--out", help="Output folder (default: <store>_geometry next to the store).")


def _out(store: Path, out: Path | None) -> Path:
    return out or Path(store).parent / f"{Path(store).name}_geometry"


def _projection(method, store, color, layers, hook, where, out, seed, json_out):
    from replab.geometry import plot_geometry

    res = plot_geometry(store, color, method, out=_out(store, out), site=hook, layers=layers,
                        where=where, seed=seed, progress=True)
    if json_out:
        print_json(res)
    else:
        typer.echo(f"wrote {res['figure']} ({len(res['layers'])} layers, {res['rows']} rows), "
                   f"{res['svg']}, {res['table']}")


@app.command("pca", epilog=examples(
    "replab plot pca --store runs/seq_item --color seq_type",
    "replab plot pca --store runs/superset --color superclass --layers 0-29 --where \"control == ''\""))
def pca(store: Path = STORE, color: str = COLOR, layers: str = LAYERS, hook: str = HOOK,
        where: str = WHERE, out: Path = OUT, json_out: bool = JSON_OPT):
    """PCA of each layer (panel per layer, fixed colours): PNG + SVG + Parquet of coordinates."""
    _projection("pca", store, color, layers, hook, where, out, 0, json_out)


@app.command("umap", epilog=examples(
    "replab plot umap --store runs/seq_item --color seq_type --layers 0,5,10,15,20,25,29",
    "replab plot umap --store runs/superset --color superclass --seed 1 --json"))
def umap(store: Path = STORE, color: str = COLOR, layers: str = LAYERS, hook: str = HOOK,
         where: str = WHERE, out: Path = OUT, seed: int = typer.Option(0, "--seed"),
         json_out: bool = JSON_OPT):
    """UMAP of each layer (cosine metric, fixed seed): PNG + SVG + Parquet of coordinates."""
    _projection("umap", store, color, layers, hook, where, out, seed, json_out)


@app.command("cosine", epilog=examples(
    "replab plot cosine --store runs/seq_item --color seq_type",
    "replab plot cosine --store runs/superset --color superclass --layers 10-20 --json"))
def cosine(store: Path = STORE, color: str = COLOR, layers: str = LAYERS, hook: str = HOOK,
           where: str = WHERE, out: Path = OUT,
           center: str = typer.Option("grand", "--center",
                                      help="grand: class mean minus the grand mean (chance "
                                           "baseline -1/(K-1), recorded per pair); none: raw "
                                           "class means."),
           json_out: bool = JSON_OPT):
    """Cosine similarity between class-mean directions, one heatmap per layer (+ Parquet
    with the chance baseline and the excess over it)."""
    from replab.geometry import cosine_layers
    from replab.geometry.plots import plot_cosines

    cos = cosine_layers(store, color, hook, layers, where, center=center)
    folder = _out(store, out)
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / f"cosine_{color}"
    cos.to_parquet(str(base) + ".parquet", index=False)
    png = plot_cosines(cos, base, title=f"cosine of class-mean directions ({color}), "
                                        f"{Path(str(store)).name}")
    res = {"figure": str(png), "svg": str(base) + ".svg", "table": str(base) + ".parquet",
           "layers": sorted(int(v) for v in cos["layer"].unique()), "center": center}
    off = cos[cos["class_a"] != cos["class_b"]]
    if off["baseline"].notna().any():
        res["chance_baseline"] = round(float(off["baseline"].mean()), 4)
    if json_out:
        print_json(res)
    else:
        extra = (f"; chance baseline {res['chance_baseline']:.3f} (-1/(K-1) for balanced classes)"
                 if "chance_baseline" in res else "")
        typer.echo(f"wrote {png}, {base}.svg, {base}.parquet{extra}")


@app.command("probes", epilog=examples(
    "replab plot probes --run runs/superset_probe_superclass",
    "replab plot probes --run runs/superset_probe_superclass --metric accuracy --json"))
def probes(run: Path = typer.Option(..., "--run", help="A `replab probe train` run directory."),
           metric: str = typer.Option("balanced_accuracy", "--metric",
                                      help="balanced_accuracy, accuracy, heldout_balanced_accuracy..."),
           json_out: bool = JSON_OPT):
    """Probe accuracy vs layer for every kind in one figure, with 95% CIs."""
    from replab.errors import ReplabError
    from replab.io import inside, read_table
    from replab.probes.plots import plot_probe_curves

    if not Path(run).is_dir():
        raise ReplabError(f"{run}: not a directory (give a probe run directory)")
    path = inside(run, "records.parquet", "probe records")       # a link out of the run is refused
    if not path.exists():
        raise ReplabError(f"{path}: no such file (is {run} a probe run directory?)")
    records = read_table(path, "probe records")
    if metric not in records.columns:
        raise ReplabError(f"unknown metric {metric!r}; the records have {', '.join(records.columns)}")
    png = plot_probe_curves(records, Path(run) / "figures" / f"{metric}_vs_layer", metric=metric,
                            title=f"probe {metric.replace('_', ' ')} by layer: {Path(run).name}")
    if json_out:
        print_json({"figure": str(png), "svg": str(png.with_suffix(".svg"))})
    else:
        typer.echo(f"wrote {png}")

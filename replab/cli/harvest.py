"""``replab harvest``: stream activations to an activation store."""

from __future__ import annotations

import typer

from replab.cli._common import ADDRESS_OPT, ENGINE_OPT, JSON_OPT, MODEL_OPT, WORKERS_OPT, examples, print_json


def harvest_cmd(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Builtin set name or JSONL/CSV path."),
    out: str = typer.Option(..., "--out", "-o",
                            help="Store directory, or an fsspec URL (s3://bucket/store, gs://..., "
                                 "memory://...); resumes if interrupted."),
    model: str = MODEL_OPT,
    hooks: str = typer.Option("resid_post", "--hooks",
                              help="Comma list: resid_pre,resid_mid,resid_post,attn_out,mlp_out,"
                                   "mlp_pre,mlp_post,z,q,k,v or raw hook names."),
    layers: str = typer.Option("all", "--layers", help="all | 5 | -1 | 0-9 | 10- | 0,5,10"),
    positions: str = typer.Option("last", "--positions",
                                  help="last | all | 0,-1 | SPAN_last (e.g. entity_last)"),
    dtype: str = typer.Option(None, "--dtype", help="Model dtype: float32 (default), bfloat16 or float16."),
    store_dtype: str = typer.Option(None, "--store-dtype",
                                    help="Storage dtype: float32 or float16 (default: float16 for a "
                                         "float16 model, else float32)."),
    batch_size: int = typer.Option(None, "--batch-size",
                                   help="Prompts per forward pass (default: auto, 32 on CPU, what fits "
                                        "the GPU's memory on CUDA)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda if available)."),
    n_devices: int = typer.Option(None, "--n-devices", help="Split the model's blocks over N GPUs."),
    engine: str = ENGINE_OPT,
    address: str = ADDRESS_OPT,
    workers: int = WORKERS_OPT,
    json_out: bool = JSON_OPT,
):
    """Harvest a model's activations on a prompt set into an on-disk store."""
    from replab.distributed import check_engine
    from replab.harvesting import harvest
    from replab.models import load_model

    check_engine(engine, workers, address)    # before the model loads: "pip install 'replab[ray]'"
    loaded = load_model(model, device=device, dtype=dtype, n_devices=n_devices)
    if store_dtype is None:
        store_dtype = "float16" if str(loaded.cfg.dtype) == "torch.float16" else "float32"
    store = harvest(loaded, dataset=dataset, hooks=hooks, layers=layers, positions=positions,
                    dtype=store_dtype, batch_size=batch_size, out=out, progress=not json_out,
                    engine=engine, workers=workers, address=address)
    summary = {**store.summary(), "run": store.harvest_run}
    if json_out:
        print_json(summary)
    else:
        run = store.harvest_run or {}
        rate = ""
        if run.get("rows_per_second"):
            where = f" on {run['workers']} Ray worker(s)" if run.get("workers") else ""
            rate = (f"; {run['rows']:,} rows computed in {run['seconds']:.1f} s "
                    f"({run['rows_per_second']:,.0f} rows/s{where})")
        typer.echo(f"wrote {summary['n_rows']:,} rows x {summary['hooks']} hooks "
                   f"({summary['bytes'] / 1e6:.1f} MB) to {out}{rate}")


HARVEST_EPILOG = examples(
    "replab harvest --dataset superset --hooks resid_post --layers all --positions entity_last --out runs/superset",
    "replab harvest --dataset sequence_types --hooks resid_post,mlp_out --layers 0-9 --out runs/seq",
    "replab harvest --dataset my_prompts.jsonl --hooks blocks.3.hook_resid_pre --positions all --out runs/mine",
    "replab harvest --dataset next_day --dtype bfloat16 --device cuda --batch-size 64 --out runs/nd_bf16",
    "replab harvest --dataset superset --positions all --engine ray --workers 2 --out runs/superset_ray",
    "replab harvest --dataset superset --engine ray --address auto --out s3://my-bucket/stores/superset",
)

"""``replab models ...``: what replab knows about a model; and the model options
(``--dtype``, ``--device``, ``--n-devices``) every model-running command gets.

:func:`add_model_options` gives every command that takes ``--model`` (and runs the model) the
three options, which set :func:`replab.models.model_options` for the duration of the command,
so each library call it makes loads the model in that dtype, on that device.
"""

from __future__ import annotations

import functools
import inspect

import typer

from replab.cli._common import JSON_OPT, MODEL_OPT, examples, human_console, print_json

app = typer.Typer(help="Inspect models: identity, parity with Hugging Face, architectures.",
                  no_args_is_help=True)

DTYPE_HELP = "Model dtype: float32 (default), bfloat16 or float16 (tolerances: docs/models.md)."
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when available)."
NDEV_HELP = "Split the model's blocks over this many GPUs (cuda:0..N-1)."
# Commands that take --model only for its tokenizer.
TOKENIZER_ONLY = {("datasets", "list"), ("datasets", "export"), ("lens", "corpus")}


@app.command("info", epilog=examples(
    "replab models info",
    "replab models info --model path/to/hf_model_dir --json",
    "replab models info --model path/to/bin_only_model --allow-bin   # convert once, no pickle after",
    "replab models info --model tiny --dtype bfloat16"))
def info_cmd(model: str = MODEL_OPT,
             allow_bin: bool = typer.Option(False, "--allow-bin",
                                            help="Accept pytorch_model*.bin weights (read with "
                                                 "torch.load(weights_only=True)) and cache them "
                                                 "converted to safetensors."),
             json_out: bool = JSON_OPT) -> None:
    """Load a model (converting it on first use) and show its identity, the parity check
    against Hugging Face (max |logit difference|), its architecture features and cache folder."""
    from replab.models.report import model_info

    info = model_info(model, allow_bin=allow_bin)
    if json_out:
        print_json(info)
        return
    from rich.table import Table

    ident = info["identity"]
    table = Table(title=f"model {ident['name']}", show_header=False)
    parity = ident.get("parity") or {}
    for key in ("architecture", "source", "weights_sha256", "config_sha256", "dtype", "device",
                "n_layers", "d_model", "n_heads", "n_kv_heads", "d_vocab", "prepend_bos"):
        table.add_row(key, str(ident.get(key)))
    if parity:
        table.add_row("parity vs Hugging Face",
                      f"max |logit diff| {parity['max_abs_logit_diff']:.3g} (tolerance "
                      f"{parity['tolerance']:.3g}, {parity['dtype']} on {parity['device']}, "
                      f"{parity['tokens']} tokens); float32 at conversion "
                      f"{parity.get('conversion_max_abs_logit_diff', float('nan')):.3g}")
    else:
        table.add_row("parity vs Hugging Face", "none (random test model, no HF counterpart)")
    table.add_row("processing", str(ident.get("processing")))
    for key, value in info["features"].items():
        table.add_row(key, str(value))
    table.add_row("parameters", f"{info['n_params']:,} ({info['param_bytes'] / 1e6:.1f} MB)")
    table.add_row("auto batch (64 tokens)", str(info["auto_batch_size_64"]))
    table.add_row("tested in the architecture matrix", str(info["matrix_tested"]))
    table.add_row("cache", str(info["cache_dir"]))
    human_console().print(table)


@app.command("architectures", epilog=examples("replab models architectures --json"))
def architectures_cmd(json_out: bool = JSON_OPT) -> None:
    """List the Hugging Face architectures replab converts, and which the matrix test checks."""
    from replab.models.architectures import MATRIX_TESTED, REPLAB_MAPPED, SUPPORTED

    rows = [{"architecture": a, "config": "replab" if a in REPLAB_MAPPED else "TransformerLens",
             "matrix_tested": a in MATRIX_TESTED} for a in SUPPORTED]
    if json_out:
        print_json(rows)
        return
    for r in rows:
        typer.echo(f"{r['architecture']:<24} config mapped by {r['config']:<16} "
                   f"{'tested by the architecture matrix' if r['matrix_tested'] else 'parity-checked on load'}")


def _wrap(func):
    """``func`` with ``--dtype``/``--device``/``--n-devices`` options that set
    :func:`replab.models.model_options` around the call."""
    sig = inspect.signature(func)
    if any(name in sig.parameters for name in ("model_dtype", "model_device")) or getattr(
            func, "_replab_model_options", False):
        return func

    @functools.wraps(func)
    def wrapper(*args, model_dtype=None, model_device=None, model_n_devices=None, **kwargs):
        from replab.models import model_options

        with model_options(dtype=model_dtype, device=model_device, n_devices=model_n_devices):
            return func(*args, **kwargs)

    extra = [inspect.Parameter("model_dtype", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                               default=typer.Option(None, "--dtype", help=DTYPE_HELP)),
             inspect.Parameter("model_device", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                               default=typer.Option(None, "--device", help=DEVICE_HELP)),
             inspect.Parameter("model_n_devices", inspect.Parameter.KEYWORD_ONLY, annotation=int,
                               default=typer.Option(None, "--n-devices", help=NDEV_HELP))]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values()]
    wrapper.__signature__ = sig.replace(parameters=params + extra)
    wrapper._replab_model_options = True
    return wrapper


def add_model_options(root: typer.Typer, prefix: tuple = ()) -> None:
    """Give every command of ``root`` (and its groups) that takes ``model`` the options
    ``--dtype``, ``--device`` and ``--n-devices`` (commands that only read a tokenizer are
    left alone, and so are commands that declare those options themselves)."""
    for cmd in root.registered_commands:
        name = cmd.name or cmd.callback.__name__
        params = inspect.signature(cmd.callback).parameters
        if "model" in params and "device" not in params and (*prefix, name) not in TOKENIZER_ONLY:
            cmd.callback = _wrap(cmd.callback)
    for group in root.registered_groups:
        add_model_options(group.typer_instance, (*prefix, group.name))

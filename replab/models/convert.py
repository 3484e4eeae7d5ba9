"""Hugging Face directory -> TransformerLens ``HookedTransformer``, with a cache.

Conversion (once per cache key, :func:`replab.models.source.cache_key`): load the HF model in
float32, build the TransformerLens config (:mod:`replab.models.architectures`), convert the
weights with TransformerLens's own converters, process them once (fold the norms; keep the
unembedding uncentred so logits stay equal to the HF model's raw logits), check the result
against the HF model's logits on the parity prompt (:mod:`replab.models.parity`), and save
the processed weights as safetensors with the config and the HF reference logits. Everything
is written into a temporary directory and renamed into place, so a failed conversion leaves
nothing in the cache. Later loads build the module from the saved config (in the requested
dtype, on the requested device) and load the weights directly. Why HookedTransformer rather
than TransformerBridge: docs/models.md.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from replab.errors import ReplabError
from replab.models.architectures import build_tl_config, convert_weights, processing
from replab.models.parity import enforce, hf_reference, load_reference, measure, parity_tokens, save_reference
from replab.models.source import read_config

# The processing of every pre-norm architecture (post-norm ones: architectures.processing).
PROCESSING = processing("LlamaForCausalLM")
# Bump when the converted weights or the saved metadata of any model would change: every
# cache entry (keyed on it) is then rebuilt on its next load.
CONVERSION_VERSION = 1
WEIGHTS = "model.safetensors"
META = "config.json"


def _cfg_to_json(cfg) -> dict:
    out = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        elif isinstance(value, torch.device):
            value = str(value)
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[key] = value
    return out


def _cfg_from_json(data: dict, device: str, dtype: torch.dtype = torch.float32, n_devices: int = 1):
    from transformer_lens import HookedTransformerConfig

    data = dict(data)
    data["dtype"] = dtype
    data["device"] = device
    data["n_devices"] = n_devices
    allowed = set(HookedTransformerConfig.__dataclass_fields__)
    return HookedTransformerConfig(**{k: v for k, v in data.items() if k in allowed})


def is_converted(out_dir: Path) -> bool:
    return (out_dir / WEIGHTS).exists() and (out_dir / META).exists()


def _load_hf(src_dir: Path, pickle_weights: bool):
    """The HF model in float32 on CPU; any failure is one line naming the directory."""
    from transformers import AutoModelForCausalLM

    kwargs = {"use_safetensors": False, "weights_only": True} if pickle_weights else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src_dir), dtype=torch.float32, **kwargs)
    except ReplabError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for broken files
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ReplabError(f"transformers could not load {src_dir} ({type(exc).__name__}: {first})") from None
    return model.eval()


def convert_and_cache(src_dir: Path, out_dir: Path, tokenizer, prepend_bos: bool,
                      config: dict | None = None, pickle_weights: bool = False,
                      extra_meta: dict | None = None) -> Path:
    """Convert the HF directory ``src_dir`` and save the processed TL weights in ``out_dir``.

    ``config`` is the parsed ``config.json`` (read from ``src_dir`` when None). Raises a
    ReplabError (and writes nothing) when the architecture is unsupported, the files are
    broken, or the converted model's logits differ from the HF model's beyond the float32
    parity tolerance. Returns ``out_dir``.
    """
    if is_converted(out_dir):
        return out_dir
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer

    if config is None:

        config = read_config(Path(src_dir))
    arch = config["architectures"][0]
    cfg = build_tl_config(config, prepend_bos)          # unsupported -> ReplabError, nothing loaded
    hf_model = _load_hf(Path(src_dir), pickle_weights)
    try:
        state = convert_weights(hf_model, cfg)
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        model.load_and_process_state_dict(state, **processing(arch))
    except ReplabError:
        raise
    except Exception as exc:  # noqa: BLE001 - TransformerLens's converters assert and raise freely
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ReplabError(f"TransformerLens could not convert {src_dir} ({arch}: "
                          f"{type(exc).__name__}: {first})") from None
    model.eval()
    tokens = parity_tokens(tokenizer, prepend_bos, model.cfg.n_ctx)
    reference = hf_reference(hf_model, tokens)
    check = enforce(measure(model, tokens, reference), f"{src_dir} ({arch})")
    del hf_model
    params = {k: v.detach().contiguous().clone() for k, v in model.named_parameters()}
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(params, str(tmp / WEIGHTS))
        save_reference(tmp, tokens, reference, check)
        meta = {"cfg": _cfg_to_json(model.cfg), "processing": processing(arch),
                "version": CONVERSION_VERSION, "architecture": arch,
                "conversion_parity": check, **(extra_meta or {})}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out_dir)
    except OSError:
        if not is_converted(out_dir):   # not another process winning the race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_reference(out_dir: Path, src_dir: Path, tokenizer, prepend_bos: bool, n_ctx: int) -> None:
    """Add the HF parity reference to a cache entry written before replab stored one."""
    ref = load_reference(out_dir)
    if ref is not None and ref[2]:
        return
    hf_model = _load_hf(Path(src_dir), False)
    tokens = parity_tokens(tokenizer, prepend_bos, n_ctx)
    reference = hf_reference(hf_model, tokens)
    del hf_model
    model = load_cached(out_dir, tokenizer)            # float32 on CPU, as at conversion
    check = enforce(measure(model, tokens, reference), str(src_dir))
    save_reference(out_dir, tokens, reference, check)


def read_meta(out_dir: Path) -> dict:
    return json.loads((out_dir / META).read_text())


def load_cached(out_dir: Path, tokenizer, device: str = "cpu", dtype: torch.dtype = torch.float32,
                n_devices: int = 1):
    """Build a ``HookedTransformer`` from a directory written by :func:`convert_and_cache`,
    with parameters in ``dtype`` (the saved float32 weights are cast once)."""
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer

    meta = read_meta(out_dir)
    cfg = _cfg_from_json({**meta["cfg"], "init_weights": False}, device="cpu", dtype=dtype,
                         n_devices=n_devices)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    try:
        state = load_file(str(out_dir / WEIGHTS))
    except Exception as exc:  # noqa: BLE001 - a damaged cache file
        raise ReplabError(f"cached model {out_dir} is damaged ({type(exc).__name__}); delete that "
                          "folder and load again") from None
    params = dict(model.named_parameters())
    missing = [k for k in params if k not in state]
    unexpected = [k for k in state if k not in params]
    if missing or unexpected:
        raise ReplabError(f"cached model {out_dir} does not match its config; delete that folder")
    model.load_state_dict(state, strict=False)
    model.cfg.device = device
    return model

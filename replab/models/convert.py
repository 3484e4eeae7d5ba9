"""Hugging Face directory -> TransformerLens ``HookedTransformer``, with a cache.

We use TransformerLens's own converters (``get_pretrained_model_config`` and
``get_pretrained_state_dict``) on a local directory, then process the weights
once (fold the norms; keep the unembedding uncentred so logits stay equal to the
HF model's raw logits) and save the processed weights as safetensors. Later
loads build the module from the saved config and load the weights directly,
with no conversion. Why HookedTransformer rather than TransformerBridge:
docs/models.md.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

PROCESSING = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": False,
    "fold_value_biases": True,
}
CONVERSION_VERSION = 1


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


def _cfg_from_json(data: dict, device: str):
    from transformer_lens import HookedTransformerConfig

    data = dict(data)
    data["dtype"] = getattr(torch, data.get("dtype", "float32"))
    data["device"] = device
    data["n_devices"] = 1
    allowed = set(HookedTransformerConfig.__dataclass_fields__)
    return HookedTransformerConfig(**{k: v for k, v in data.items() if k in allowed})


def convert_and_cache(src_dir: Path, out_dir: Path, tokenizer, prepend_bos: bool) -> Path:
    """Convert the HF directory ``src_dir`` and save the processed TL weights in ``out_dir``."""
    if (out_dir / "model.safetensors").exists():
        return out_dir
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(str(src_dir), dtype=torch.float32)
    cfg = get_pretrained_model_config(
        str(src_dir), fold_ln=True, device="cpu", dtype=torch.float32,
        default_prepend_bos=prepend_bos,
    )
    state = get_pretrained_state_dict(str(src_dir), cfg, hf_model=hf_model, dtype=torch.float32)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state, **PROCESSING)
    params = {k: v.detach().contiguous().clone() for k, v in model.named_parameters()}
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(params, str(tmp / "model.safetensors"))
    meta = {"cfg": _cfg_to_json(model.cfg), "processing": PROCESSING, "version": CONVERSION_VERSION}
    (tmp / "config.json").write_text(json.dumps(meta, indent=1))
    try:
        os.replace(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_cached(out_dir: Path, tokenizer, device: str):
    """Build a ``HookedTransformer`` from a directory written by :func:`convert_and_cache`."""
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer

    meta = json.loads((out_dir / "config.json").read_text())
    cfg = _cfg_from_json({**meta["cfg"], "init_weights": False}, device=device)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = load_file(str(out_dir / "model.safetensors"))
    params = dict(model.named_parameters())
    missing = [k for k in params if k not in state]
    unexpected = [k for k in state if k not in params]
    if missing or unexpected:
        raise RuntimeError(f"cached model {out_dir} does not match its config; delete that folder")
    model.load_state_dict(state, strict=False)   # buffers (mask, rotary) are rebuilt by the constructor
    return model.to(device)

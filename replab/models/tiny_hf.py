"""A tiny random-weights Hugging Face Llama model, for fast tuned-lens tests and demos.

``replab lens train|tuned|eval --model tiny`` use it: the tuned lens needs an HF model,
and replab's ``"tiny"`` TransformerLens model has none. It is SmolLM2-shaped (RMSNorm,
SwiGLU, rotary, grouped-query attention) with 2 layers, d_model 64, the SmolLM2
tokenizer, seed 0; it is written once to ``cache_dir()/lenses/tiny-hf`` and then loaded
like any local model directory (so TL and HF views of it agree).
"""

from __future__ import annotations

from pathlib import Path

from replab.models import load_tokenizer
from replab.models.cache import cache_dir

TINY = "tiny"


def tiny_hf_dir() -> Path:
    """Directory of the tiny HF model (created on first use, ~1 s)."""

    path = cache_dir() / "lenses" / "tiny-hf"
    if (path / "model.safetensors").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(TINY)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norm weights, so folding them is actually tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    tmp = path.with_name(f"tiny-hf.tmp{__import__('os').getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(path) if not path.exists() else None
    return path


def resolve(name: str | None) -> str | None:
    """Model name for the lens commands: ``"tiny"`` -> the tiny HF directory."""
    return str(tiny_hf_dir()) if name == TINY else name

"""Tiny random-weight Hugging Face models, one per architecture: the architecture matrix
(tests/test_models_matrix.py), the model-loading tests and the dtype benchmark
(bench/bench_dtype.py) build them with :func:`build_tiny`.

Each is 2 layers, d_model 64, the SmolLM2 tokenizer (vocabulary 49,152), seed 0, with its norm
weights (and biases, where the architecture has them) drawn away from their init values, so
that folding them is actually tested. ``build(arch, folder)`` writes ``config.json``,
``model.safetensors`` and the tokenizer files with ``save_pretrained``.

The matrix exercises, through patching and DLA:

* grouped-query attention: llama, qwen2, qwen3, mistral, gemma2, phi3, olmo3;
* multi-query attention (one KV head): gemma;
* parallel attention + MLP: gpt_neox, phi;
* learned positional embeddings: gpt2;
* LayerNorm: gpt2, gpt_neox, phi; RMSNorm: the rest;
* Gemma's (1 + w) norm and sqrt(d_model) embedding scale: gemma, gemma2 (with Gemma-2's
  post-norms, attention and final logit soft-capping and sliding-window layers);
* sliding-window attention shorter than the test prompts: mistral, gemma2;
* QK-norm: qwen3, olmo3 (post-norm); QKV biases: qwen2; partial rotary: gpt_neox, phi.
"""

from __future__ import annotations

from pathlib import Path

from replab.models.loading import load_tokenizer

D, L, H, DH, MLP, CTX = 64, 2, 4, 16, 128, 128
INIT = 0.1


def _configs(vocab: int, bos: int | None, eos: int | None) -> dict:
    import transformers as t

    # initializer_range 0.1 (HF default 0.02): attention patterns and patching effects far
    # from uniform/zero, so agreement within 1e-4 says something
    common = dict(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, initializer_range=INIT)
    llama_like = dict(hidden_size=D, intermediate_size=MLP, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=2, max_position_embeddings=CTX,
                      rms_norm_eps=1e-5, **common)
    return {
        "gpt2": lambda: t.GPT2Config(n_embd=D, n_layer=L, n_head=H, n_positions=CTX,
                                     activation_function="gelu_new", **common),
        "gpt_neox": lambda: t.GPTNeoXConfig(hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                                            intermediate_size=MLP, rotary_pct=0.5,
                                            use_parallel_residual=True, max_position_embeddings=CTX,
                                            tie_word_embeddings=False, **common),
        "llama": lambda: t.LlamaConfig(tie_word_embeddings=True, **llama_like),
        "qwen2": lambda: t.Qwen2Config(tie_word_embeddings=True, **llama_like),
        "qwen3": lambda: t.Qwen3Config(head_dim=DH, tie_word_embeddings=True, **llama_like),
        "mistral": lambda: t.MistralConfig(sliding_window=4, tie_word_embeddings=False, **llama_like),
        "gemma": lambda: t.GemmaConfig(**{**llama_like, "num_key_value_heads": 1}, head_dim=DH,
                                       hidden_activation="gelu_pytorch_tanh"),
        "gemma2": lambda: t.Gemma2Config(**llama_like, head_dim=DH, hidden_activation="gelu_pytorch_tanh",
                                         sliding_window=4, query_pre_attn_scalar=DH,
                                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
        "phi3": lambda: t.Phi3Config(**{**llama_like, "max_position_embeddings": CTX,
                                        "original_max_position_embeddings": CTX},
                                     sliding_window=None, pad_token_id=0, tie_word_embeddings=False),
        "phi": lambda: t.PhiConfig(hidden_size=D, intermediate_size=MLP, num_hidden_layers=L,
                                   num_attention_heads=H, partial_rotary_factor=0.5,
                                   max_position_embeddings=CTX, **common),
        "olmo3": lambda: t.Olmo3Config(tie_word_embeddings=False, sliding_window=4, **llama_like),
        # Architectures TransformerLens 3.9 cannot convert (replab must say so in one line):
        "falcon": lambda: t.FalconConfig(hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                                         **common),
        "gpt_bigcode": lambda: t.GPTBigCodeConfig(n_embd=D, n_layer=L, n_head=H, n_positions=CTX,
                                                  multi_query=True, **common),
    }


TINY_SUPPORTED = ("gpt2", "gpt_neox", "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3",
             "phi", "olmo3")
TINY_UNSUPPORTED = ("falcon", "gpt_bigcode")
TINY_LAYERNORM = ("gpt2", "gpt_neox", "phi")


def build_tiny(arch: str, folder: Path, seed: int = 0) -> Path:
    """Write the tiny ``arch`` model (config, safetensors weights, tokenizer) to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(None)
    config = _configs(len(tok), tok.bos_token_id, tok.eos_token_id)[arch]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2]:
                base = 0.0 if arch.startswith("gemma") and name.endswith("weight") else 1.0
                if name.endswith("bias"):
                    base = 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    model.eval()
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder

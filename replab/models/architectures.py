"""Which Hugging Face architectures replab converts, and the TransformerLens config of each.

Two routes, both ending in TransformerLens's own weight converters
(``get_pretrained_state_dict`` with the loaded HF model):

* **TransformerLens reads the config** (``convert_hf_model_config``) for the architectures it
  maps from a ``config.json``. replab hands it a copy of ``config.json`` in a neutral temporary
  directory: TransformerLens picks some architectures by substrings of the *path* ("llama",
  "gemma"), so the user's folder name must not decide. Two fixes for ``transformers`` 5
  configs: GPT-2 configs written from scratch have no ``n_ctx`` (TransformerLens reads it; we
  set it from ``n_positions``).
* **replab maps the config** for Gemma and Gemma-2, which TransformerLens 3.9 supports only
  under Google's official names (its config tables are keyed by name, and a local directory
  fails with ``NotImplementedError``). :func:`_gemma` builds the same fields from the model's
  own ``config.json``; TransformerLens's Gemma weight converter then does the rest ((1 + w)
  norm weights, the sqrt(d_model) embedding scale folded into ``W_E``). Why this route and
  not ``TransformerBridge``: docs/models.md. Phi (phi-1/1.5/2) too: ``transformers`` 5 keeps
  its ``partial_rotary_factor`` inside ``rope_parameters``, where TransformerLens's branch
  does not look (:func:`_phi` is that branch, reading the field where it now lives).

Anything else gets a one-line error naming the architecture and listing these. Every
conversion is then checked against the HF model's logits (:mod:`replab.models.parity`), so a
mapping mistake can never pass silently.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from replab.errors import ReplabError

# Decoder-only architectures TransformerLens 3.9 converts from a local config.json.
TL_NATIVE = (
    "GPT2LMHeadModel", "GPTNeoForCausalLM", "GPTJForCausalLM", "GPTNeoXForCausalLM",
    "OPTForCausalLM", "BloomForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
    "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
    "Olmo3ForCausalLM", "OlmoeForCausalLM", "ApertusForCausalLM", "GptOssForCausalLM",
)
# Architectures whose config replab maps itself (TransformerLens has their weight converters).
REPLAB_MAPPED = ("GemmaForCausalLM", "Gemma2ForCausalLM", "PhiForCausalLM")
SUPPORTED = tuple(sorted(TL_NATIVE + REPLAB_MAPPED))
# Checked end to end by tests/test_models_matrix.py (the rest rely on the load-time parity check).
MATRIX_TESTED = ("GPT2LMHeadModel", "GPTNeoXForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM", "MistralForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
                 "Phi3ForCausalLM", "PhiForCausalLM", "Olmo3ForCausalLM")
# Post-norm decoders (sublayer outputs are normalised): norms cannot be folded.
POST_NORM = ("Olmo2ForCausalLM", "Olmo3ForCausalLM")
N_CTX_CAP = 8192   # TransformerLens allocates an [n_ctx, n_ctx] mask per layer


def check_supported(architecture: str) -> None:
    """Raise a one-line ReplabError unless replab can convert ``architecture``."""
    if architecture not in SUPPORTED:
        raise ReplabError(
            f"architecture {architecture} is not supported (TransformerLens 3.9 cannot convert it "
            f"and replab has no mapping); supported: {', '.join(SUPPORTED)}")


def processing(architecture: str) -> dict:
    """The weight processing replab applies to ``architecture`` (recorded in the identity)."""
    post = architecture in POST_NORM
    return {"fold_ln": not post, "center_writing_weights": not post, "center_unembed": False,
            "fold_value_biases": True}


def _rope_theta(config: dict, default: float = 10000.0) -> float:
    params = config.get("rope_parameters") or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return params["rope_theta"]
    return config.get("rope_theta", default)


def _gemma(config: dict) -> dict:
    """TransformerLens config fields for Gemma / Gemma-2 from their HF config (the same fields
    TransformerLens's tables give google/gemma-2b and google/gemma-2-2b)."""
    arch = config["architectures"][0]
    d_head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    cfg = {
        "d_model": config["hidden_size"], "d_head": d_head,
        "n_heads": config["num_attention_heads"], "d_mlp": config["intermediate_size"],
        "n_layers": config["num_hidden_layers"],
        "n_ctx": min(config.get("max_position_embeddings", N_CTX_CAP), N_CTX_CAP),
        "eps": config.get("rms_norm_eps", 1e-6), "d_vocab": config["vocab_size"],
        "act_fn": config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh",
        "initializer_range": config.get("initializer_range", 0.02),
        "normalization_type": "RMS", "rotary_base": _rope_theta(config), "rotary_dim": d_head,
        "positional_embedding_type": "rotary", "use_attn_scale": True,
        "n_key_value_heads": config.get("num_key_value_heads", config["num_attention_heads"]),
        "gated_mlp": True, "final_rms": True, "original_architecture": arch,
    }
    if arch == "Gemma2ForCausalLM":
        n = cfg["n_layers"]
        types = config.get("layer_types") or ["sliding_attention", "full_attention"] * (n // 2 + 1)
        window = config.get("sliding_window")
        cfg.update({
            "attn_scale": math.sqrt(config.get("query_pre_attn_scalar", d_head)),
            "attn_scores_soft_cap": config.get("attn_logit_softcapping") or -1.0,
            "output_logits_soft_cap": config.get("final_logit_softcapping") or -1.0,
            "use_normalization_before_and_after": True,
        })
        if window:
            cfg.update({"use_local_attn": True, "window_size": window,
                        "attn_types": ["local" if t == "sliding_attention" else "global"
                                       for t in types[:n]]})
    return cfg


def _phi(config: dict) -> dict:
    """TransformerLens's ``PhiForCausalLM`` fields, reading ``transformers`` 5's
    ``rope_parameters`` for the rotary fraction and base."""
    d_head = config["hidden_size"] // config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    fraction = config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))
    return {
        "d_model": config["hidden_size"], "d_head": d_head,
        "n_heads": config["num_attention_heads"], "d_mlp": config["intermediate_size"],
        "n_layers": config["num_hidden_layers"],
        "n_ctx": min(config.get("max_position_embeddings", 2048), N_CTX_CAP),
        "eps": config.get("layer_norm_eps", 1e-5), "d_vocab": config["vocab_size"],
        "act_fn": config.get("hidden_act", "gelu_new"),
        "initializer_range": config.get("initializer_range", 0.02),
        "normalization_type": "LN", "positional_embedding_type": "rotary",
        "rotary_base": _rope_theta(config), "rotary_dim": round(fraction * d_head),
        "use_attn_scale": True, "parallel_attn_mlp": True, "default_prepend_bos": False,
        "original_architecture": "PhiForCausalLM",
    }


def _patched_hf_config(config: dict) -> dict:
    """``config.json`` with the fields TransformerLens 3.9 reads but ``transformers`` 5 omits."""
    config = dict(config)
    arch = config["architectures"][0]
    if arch == "GPT2LMHeadModel" and "n_ctx" not in config and "n_positions" in config:
        config["n_ctx"] = config["n_positions"]
    return config


def tl_config_dict(config: dict) -> dict:
    """TransformerLens config fields (``HookedTransformerConfig`` keys) for an HF ``config``."""
    arch = config["architectures"][0]
    check_supported(arch)
    if arch == "PhiForCausalLM":
        return _phi(config)
    if arch in REPLAB_MAPPED:
        return _gemma(config)
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    with tempfile.TemporaryDirectory(prefix="replab-") as tmp:
        neutral = Path(tmp) / "model"      # no "llama"/"gemma" in the path TL inspects
        neutral.mkdir()
        (neutral / "config.json").write_text(json.dumps(_patched_hf_config(config)))
        try:
            return convert_hf_model_config(str(neutral))
        except (KeyError, AttributeError, TypeError, ValueError) as exc:
            raise ReplabError(f"config.json of this {arch} model lacks a field TransformerLens "
                              f"needs ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def build_tl_config(config: dict, prepend_bos: bool, dtype=None, device: str = "cpu"):
    """A ``HookedTransformerConfig`` for the HF ``config`` (what ``get_pretrained_model_config``
    does for a named model, minus any network access)."""
    import torch
    from transformer_lens import HookedTransformerConfig

    cfg = dict(tl_config_dict(config))
    arch = cfg["original_architecture"]
    if processing(arch)["fold_ln"]:
        cfg["normalization_type"] = {"LN": "LNPre", "RMS": "RMSPre"}.get(
            cfg["normalization_type"], cfg["normalization_type"])
    cfg.pop("trust_remote_code", None)
    cfg.update(model_name=str(config.get("_name_or_path") or arch), init_weights=False,
               device=device, n_devices=1, dtype=dtype or torch.float32,
               default_prepend_bos=prepend_bos, from_checkpoint=False,
               d_vocab=config.get("vocab_size", cfg.get("d_vocab")))
    cfg["tokenizer_name"] = None
    allowed = set(HookedTransformerConfig.__dataclass_fields__)
    return HookedTransformerConfig(**{k: v for k, v in cfg.items() if k in allowed})


def convert_weights(hf_model, cfg) -> dict:
    """TransformerLens state dict (unprocessed) from a loaded HF model, by TL's converters."""
    from transformer_lens.loading_from_pretrained import get_pretrained_state_dict

    with tempfile.TemporaryDirectory(prefix="replab-") as tmp:
        return get_pretrained_state_dict(tmp, cfg, hf_model=hf_model)

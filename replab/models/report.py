"""``model_info``: what replab knows about a model, for ``replab models info``."""

from __future__ import annotations

from pathlib import Path

from replab.models import embedded
from replab.models.architectures import MATRIX_TESTED, SUPPORTED
from replab.models.convert import CONVERSION_VERSION
from replab.models.loading import TINY, _local_source, load_model, local_cache_dir
from replab.models.placement import auto_batch_size


def _features(cfg) -> dict:
    """The architectural features that matter to analyses (and to the matrix test)."""
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    attention = "multi-query" if n_kv == 1 else ("grouped-query" if n_kv < cfg.n_heads else "multi-head")
    return {
        "normalization": cfg.normalization_type,
        "positional_embedding": cfg.positional_embedding_type,
        "attention": attention,
        "parallel_attn_mlp": bool(cfg.parallel_attn_mlp),
        "gated_mlp": bool(cfg.gated_mlp),
        "sliding_window": cfg.window_size if cfg.use_local_attn else None,
        "attn_scores_soft_cap": cfg.attn_scores_soft_cap if cfg.attn_scores_soft_cap > 0 else None,
        "output_logits_soft_cap": cfg.output_logits_soft_cap if cfg.output_logits_soft_cap > 0 else None,
        "post_sublayer_norms": bool(getattr(cfg, "use_normalization_before_and_after", False)),
        "qk_norm": bool(getattr(cfg, "use_qk_norm", False)),
        "n_ctx": cfg.n_ctx,
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp,
        "act_fn": cfg.act_fn,
    }


def conversion_dir(name: str | None) -> Path | None:
    """The conversion cache folder of ``name`` (None for the random ``tiny`` model)."""

    if name == TINY:
        return None
    if embedded.is_default(name):
        return embedded.model_root()[0] / f"tl-v{CONVERSION_VERSION}"
    return local_cache_dir(_local_source(name))[0]


def model_info(name: str | None = None, device=None, dtype=None, allow_bin: bool = False) -> dict:
    """Load ``name`` (converting it on first use) and describe it.

    Returns a JSON-ready dict: ``identity`` (the full :class:`~replab.models.ModelIdentity`,
    with the load-time ``parity`` check: ``max_abs_logit_diff``, ``tolerance``, ``dtype``,
    ``device``, and the float32 ``conversion_max_abs_logit_diff``), ``features``
    (normalization, positional embedding, multi-head / grouped-query / multi-query attention,
    parallel blocks, soft caps, sliding window...), ``n_params``, ``param_bytes``,
    ``cache_dir``, ``auto_batch_size_64`` (prompts of 64 tokens per forward on this device)
    and ``supported`` (every architecture replab converts).
    """
    import dataclasses

    model = load_model(name, device=device, dtype=dtype, allow_bin=allow_bin)
    ident = dataclasses.asdict(model.replab_identity)
    folder = conversion_dir(name)
    return {
        "identity": ident,
        "features": _features(model.cfg),
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "param_bytes": int(sum(p.numel() * p.element_size() for p in model.parameters())),
        "cache_dir": str(folder) if folder is not None else None,
        "auto_batch_size_64": auto_batch_size(model, 64),
        "matrix_tested": ident["architecture"] in MATRIX_TESTED,
        "supported": list(SUPPORTED),
    }

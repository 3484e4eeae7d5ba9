"""One explicit way for a call that accepts a model *or* a model name to get the model."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from replab.models.loading import load_model

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def as_model(name_or_model: HookedTransformer | str | os.PathLike | None = None, device=None,
             dtype=None) -> HookedTransformer:
    """``name_or_model`` itself when it is already a loaded model, else
    :func:`replab.models.load_model` of that name (None: the default SmolLM2; ``"tiny"``: the
    random test model; a local HF directory) on ``device`` with ``dtype`` (defaults: those of
    :func:`~replab.models.load_model`, which honour the command line's ``--device``/``--dtype``)."""
    if name_or_model is None or isinstance(name_or_model, (str, os.PathLike)):

        return load_model(None if name_or_model is None else str(name_or_model), device=device, dtype=dtype)
    return name_or_model

"""Activation harvesting: :func:`harvest` streams a model's activations to a store."""

from replab.harvest.hooks import ALIASES, parse_hook_name, parse_layers, resolve_hooks
from replab.harvest.run import harvest

__all__ = ["ALIASES", "harvest", "parse_hook_name", "parse_layers", "resolve_hooks"]

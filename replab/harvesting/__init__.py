"""Activation harvesting: :func:`harvest` streams a model's activations to a store."""

from replab.harvesting.run import harvest

__all__ = ["harvest"]

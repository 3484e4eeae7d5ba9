"""Activation stores: the on-disk format (:mod:`replab.store.format`), reading
(:func:`open_store`) and writing (:class:`replab.store.writer.StoreWriter`)."""

from replab.store.store import ActivationStore, open_store, verifying

__all__ = ["ActivationStore", "open_store", "verifying"]

"""replab: a representation-probing and feature-analysis lab for transformer LMs."""

from replab._version import __version__
from replab.errors import ReplabError

__all__ = ["ReplabError", "__version__", "load_model", "harvest", "open_store"]


def __getattr__(name):
    # Lazy: `import replab` stays fast (the CLI imports torch only when needed).
    if name == "load_model":
        from replab.models import load_model

        return load_model
    if name == "harvest":
        from replab.harvesting import harvest

        return harvest
    if name == "open_store":
        from replab.store import open_store

        return open_store
    raise AttributeError(f"module 'replab' has no attribute {name!r}")

"""The experiments ``replab run`` knows, one per workflow of ``docs/workflows.md``."""

from __future__ import annotations

from replab.errors import ReplabError
from replab.experiments.fact_recall import EXPERIMENT as FACT_RECALL
from replab.experiments.lens_comparison import EXPERIMENT as LENSES
from replab.experiments.next_day import EXPERIMENT as NEXT_DAY
from replab.experiments.sequences import EXPERIMENT as SEQUENCES
from replab.experiments.spec import Experiment
from replab.experiments.superset import EXPERIMENT as SUPERSET

#: ``name -> Experiment``, in the order of the workflows
EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    FACT_RECALL,
    NEXT_DAY,
    SUPERSET,
    SEQUENCES,
    LENSES,
)}


def get_experiment(name: str) -> Experiment:
    """The experiment called ``name`` (``fact_recall`` is accepted for ``fact-recall``)."""
    exp = EXPERIMENTS.get(str(name).replace("_", "-"))
    if exp is None:
        raise ReplabError(f"unknown experiment {name!r} (known: {', '.join(EXPERIMENTS)})")
    return exp

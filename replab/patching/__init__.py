"""Activation patching, attribution patching and direct logit attribution (W1, W2, W5).

>>> from replab.patching import load_task, sweep, Intervention
>>> task = load_task("next_day", model.tokenizer)                    # doctest: +SKIP
>>> res = sweep(model, task, site="resid_pre", by="layer,position")  # doctest: +SKIP
>>> res.table.head()                                                 # doctest: +SKIP

* :mod:`~replab.patching.task`: clean/corrupt token pairs with answer, foil and candidates;
  :mod:`~replab.patching.catalog`: named tasks (``load_task``); :mod:`~replab.patching.superclass`:
  the super-class task;
* :mod:`~replab.patching.interventions`: interventions as serialisable data;
* :mod:`~replab.patching.engine`: many patched runs in a few batched, cached forwards;
* :mod:`~replab.patching.plan`: **the one experiment loop** (``run_plan``: variants in, metrics,
  normalised effects, CIs and enforced checks out); :mod:`~replab.patching.checks`: the checks;
* :mod:`~replab.patching.metrics`: logit diff, margin, log-prob, prob, KL; normalisation;
* :mod:`~replab.patching.sweeps`: layer × position / head sweeps with built-in sanity checks;
* :mod:`~replab.patching.logit_attribution` and :mod:`~replab.patching.attribution`: DLA and attribution patching;
* :mod:`~replab.patching.runs`: one call per workflow step, writing a run directory.
"""

from replab.patching.catalog import load_task
from replab.patching.engine import Variant, run_variants
from replab.patching.interventions import Intervention
from replab.patching.plan import PlanResult, run_plan
from replab.patching.superclass import build_superclass_task
from replab.patching.sweeps import SweepResult, sweep
from replab.patching.task import PatchTask, task_from_rows

__all__ = ["Intervention", "PatchTask", "PlanResult", "SweepResult", "Variant", "build_superclass_task",
           "load_task", "run_plan", "run_variants", "sweep", "task_from_rows"]

"""One command per research workflow (``replab run NAME``): experiments that stitch replab's
library calls into cached stages, a run directory and a self-contained HTML report.

* :func:`run_experiment`: run or resume an experiment (:mod:`replab.experiments.runner`);
* :func:`list_runs` / :func:`show_run`: find past runs (:mod:`replab.experiments.history`);
* :data:`EXPERIMENTS`: the experiments, one per workflow of ``docs/workflows.md``
  (:mod:`replab.experiments.catalog`); :class:`Experiment`, :class:`Stage`, :class:`Section`
  describe one (:mod:`replab.experiments.spec`).
"""

from replab.experiments.catalog import EXPERIMENTS, get_experiment
from replab.experiments.history import list_runs, show_run
from replab.experiments.runner import read_config, run_experiment
from replab.experiments.spec import Experiment, Section, Stage

__all__ = ["EXPERIMENTS", "Experiment", "Section", "Stage", "get_experiment", "list_runs", "read_config",
           "run_experiment", "show_run"]

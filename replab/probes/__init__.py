"""Probes: scikit-learn estimators, layer sweeps with grouped nested CV, Hewitt-Liang
control tasks, rank sweeps, LEACE erasure, and Direction artifacts.

Library entry points (each CLI command is one of these)::

    train_probes(store, label, out=...)      # replab probe train
    apply_probe(probe_json, store)           # replab probe apply
    LogisticProbe / MeanDiffProbe / LowRankProbe   # sklearn-compatible estimators
    Direction.load(path)                     # a saved unit direction
    load_directions(run, kind, layer, shuffled)   # {class: Direction} from a probe run
"""

from replab.probes.directions import Direction, apply_probe, direction_path, load_directions, load_probe
from replab.probes.estimators import LogisticProbe, LowRankProbe, MeanDiffProbe, mean_diff
from replab.probes.train import ProbeConfig, ProbeRun, parse_ranks, train_probes

__all__ = ["Direction", "LogisticProbe", "LowRankProbe", "MeanDiffProbe", "ProbeConfig",
           "ProbeRun", "apply_probe", "direction_path", "load_directions", "load_probe",
           "mean_diff", "parse_ranks", "train_probes"]

"""Circuits (W1, W3, W4, W5): validating component sets (necessity, sufficiency, minimality),
block sweeps, backup heads, path patching, iterative pruning, edge-level discovery and the
W1 component report. Every tool is a list of variants handed to the one experiment loop of
:mod:`replab.patching`.

* :mod:`~replab.circuits.components`: the component vocabulary (``L5H3``, ``L5H3.v@-1``,
  ``L7MLP``, ``L7ATTN``, ``L7RESID``, ``EMBED``) and its interventions;
* :mod:`~replab.circuits.ablation`: zero, mean, resample, mean-other, corrupt;
* :mod:`~replab.circuits.baselines`: random sets of the same size and layer profile;
* :mod:`~replab.circuits.validate`: necessity, sufficiency, minimality;
* :mod:`~replab.circuits.blocks`, :mod:`~replab.circuits.hydra`, :mod:`~replab.circuits.path`,
  :mod:`~replab.circuits.prune`, :mod:`~replab.circuits.grid`, :mod:`~replab.circuits.compare`;
* :mod:`~replab.circuits.runs` and :mod:`~replab.circuits.replay`: run directories with a
  replayable ``config.yaml``; the ``*_run`` modules hold the ``run_*`` calls of the CLI.
"""

"""Circuits (W1, W3, W4, W5): validating component sets (necessity, sufficiency, minimality),
block sweeps, backup heads, path patching, iterative pruning, edge-level discovery and the
W1 component report. Every tool is a list of variants handed to the one experiment loop of
:mod:`replab.patching`."""

"""Sanity checks: one :class:`Check` type and one way to enforce them.

Every experiment (a sweep, a layer scan, direction and latent patching, every circuit tool)
runs the engine checks of :func:`engine_variants` in the same batched call as its own
variants, and adds checks of its own (the identity subspace of direction patching, the
decoder rows of latent patching, empty-sender path patching ...). A failed check stops the run
with a ReplabError that names the check, its value, what was expected and why:

* ``engine_full``: the whole residual stream (``resid_pre`` at the plan's first layer, every
  position) patched from the other run reproduces that run: normalised effect 1 when
  denoising (base = corrupt), 0 when noising (base = clean);
* ``engine_empty``: a variant with no intervention, entering at the same layer from the
  cached base residual, reproduces the base run;
* ``engine_identity`` (sweeps): the swept site patched from a run into that same run changes
  nothing.

They exercise the engine's batching, cached-prefix and start-at-layer paths against plain
forwards. All engine checks use :data:`ENGINE_TOL` in units of the normalised effect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from replab.errors import ReplabError

#: Tolerance of the engine checks, in units of the normalised effect.
ENGINE_TOL = 1e-4


@dataclass(frozen=True)
class Check:
    """One sanity check: ``value`` must be within ``tol`` of ``expected``."""

    name: str
    value: float
    expected: float
    tol: float
    what: str = ""

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.value) and abs(self.value - self.expected) <= self.tol)

    def to_dict(self) -> dict:
        return {"value": float(self.value), "expected": float(self.expected), "tolerance": float(self.tol),
                "ok": self.ok, "what": self.what}

    def message(self) -> str:
        return (f"sanity check '{self.name}' failed: {self.value:.6f}, expected {self.expected:.6f} ± "
                f"{self.tol:g} ({self.what})")


def enforce(checks) -> dict[str, dict]:
    """``{name: check.to_dict()}`` for ``checks`` (an iterable of :class:`Check`, or a dict of
    them); raises ReplabError with the first failure's :meth:`Check.message`."""
    items = list(checks.values()) if isinstance(checks, dict) else list(checks)
    for c in items:
        if not c.ok:
            raise ReplabError(c.message())
    return {c.name: c.to_dict() for c in items}


def other_run(base: str) -> str:
    """The run that is not ``base``."""
    return "clean" if base == "corrupt" else "corrupt"


def expected_effect(run: str) -> float:
    """The normalised effect of reproducing ``run`` exactly: 1 for clean, 0 for corrupt."""
    return 1.0 if run == "clean" else 0.0

"""Sanity checks run inside every sweep (and every feature experiment).

1. **full**: patching every position of the residual stream (``resid_pre`` at the sweep's
   first layer) from the other run reproduces that run: normalised effect 1 when denoising,
   0 when noising (± ``TOL``).
2. **empty**: a variant with no intervention, entering the network at the same layer from the
   cached base residual, reproduces the base run: 0 when denoising, 1 when noising.
3. **identity**: patching the sweep's site (every position, head 0) from a run into that same
   run (clean → clean) changes nothing.

They exercise the engine's batching, cached-prefix and start-at-layer paths against plain
forwards; a failure stops the run with a ReplabError that names the check.
"""

from __future__ import annotations

import numpy as np

from replab.errors import ReplabError
from replab.hooks import SITES
from replab.patching.engine import Variant, run_variants
from replab.patching.interventions import Intervention

TOL = 1e-4


def _other(base: str) -> str:
    return "clean" if base == "corrupt" else "corrupt"


def variants_for(layer: int, base: str) -> list[Variant]:
    """[full residual patch from the other run, empty patch] at ``layer``."""
    return [Variant((Intervention("resid_pre", layer, source=_other(base)),)), Variant((), start=layer)]


def identity_variant(site: str, layer: int, base: str) -> Variant:
    """The identity check's variant: ``site`` (head 0) patched from the *other* run into
    itself; run it with ``base=_other(base)``."""
    head = 0 if SITES[site].kind != "vector" else None
    return Variant((Intervention(site, layer, head=head, source=_other(base)),))


def runs_for(model, task, variants: list[Variant], base: str, site: str, layer: int) -> dict:
    """One pair of cached runs for a sweep's ``variants`` *and* its identity check (so the
    check needs no extra forwards)."""
    from replab.patching.engine import make_runs, needed_hooks, prefix_ok

    use_prefix = prefix_ok(model)
    need = needed_hooks(model, variants, base, use_prefix)
    for run, names in needed_hooks(model, [identity_variant(site, layer, base)], _other(base),
                                   use_prefix).items():
        need[run] |= names
    return make_runs(model, task.clean, task.corrupt, need)


def _reusable(runs: dict, model, site: str, layer: int, base: str) -> dict | None:
    from replab.patching.engine import needed_hooks, prefix_ok

    need = needed_hooks(model, [identity_variant(site, layer, base)], _other(base), prefix_ok(model))
    ok = all(name in runs[run].acts for run, names in need.items() for name in names)
    return {k: runs[k] for k in ("clean", "corrupt")} if ok else None


def evaluate(model, task, site: str, layer: int, base: str, metric: str, patched: np.ndarray,
             values: dict, runs: dict) -> dict:
    """Check the sanity rows ``patched`` ``[2, N]`` (full, empty) and run the identity check
    (reusing ``runs`` when they hold its activations, see :func:`runs_for`).

    Returns ``{check: {"value", "expected", "ok"}}``; raises ReplabError on a failure.
    """
    from replab.patching.metrics import normalized
    from replab.patching.sweeps import _metric_rows

    clean, corrupt = float(values["clean"].mean()), float(values["corrupt"].mean())
    norm = lambda x: float(normalized(np.mean(x), clean, corrupt))  # noqa: E731
    other = _other(base)
    expected = {"clean": 1.0, "corrupt": 0.0}
    out = {"full": (norm(patched[0]), expected[other]), "empty": (norm(patched[1]), expected[base])}
    finals, runs2 = run_variants(model, task.clean, task.corrupt, [identity_variant(site, layer, base)],
                                 base=other, runs=_reusable(runs, model, site, layer, base))
    vals, _ = _metric_rows(model, task, metric, finals, runs2)
    out["identity"] = (norm(vals["patched"][0]), expected[other])
    report = {}
    for name, (value, exp) in out.items():
        ok = abs(value - exp) <= TOL
        report[name] = {"value": value, "expected": exp, "ok": ok}
        if not ok:
            raise ReplabError(f"sanity check '{name}' failed: normalised effect {value:.6f}, expected "
                              f"{exp:.1f} ± {TOL} (the patching engine disagrees with a plain forward)")
    return report

"""Weight memory layout: store ``F.linear`` weights transposed once, at load time.

TransformerLens 3.9's ``GatedMLP`` and ``Unembed`` call ``F.linear(x, W.T.contiguous())`` on
every forward, to match HF's ``nn.Linear`` layout. For a parameter stored ``[in, out]`` in
row-major order that copies the whole matrix on every call: 3 × 3.5 MB per SmolLM2 block and
113 MB for ``W_U``, per forward. :func:`linear_layout` gives those parameters column-major
storage (``W.T`` is then contiguous, so ``.contiguous()`` returns it without a copy). The
values, shapes and the layout ``F.linear`` sees are exactly the same as before: results are
bit-identical, only the copies are gone.
"""

from __future__ import annotations

import torch

# Parameters that TransformerLens passes through ``W.T.contiguous()`` (gated MLP, unembed).
_TRANSPOSED = {"GatedMLP": ("W_gate", "W_in", "W_out"), "Unembed": ("W_U",)}


@torch.inference_mode(False)
@torch.no_grad()
def linear_layout(model) -> int:
    """Give the ``F.linear`` weights of ``model`` a transposed (column-major) layout in place.

    Returns the number of parameters changed. Safe to call twice, and inside
    ``torch.inference_mode()`` (the new storage is never an inference tensor, so the model
    can still be used with autograd afterwards).
    """
    changed = 0
    for module in model.modules():
        for name in _TRANSPOSED.get(type(module).__name__, ()):
            p = getattr(module, name, None)
            if p is None or p.dim() != 2 or p.T.is_contiguous():
                continue
            p.data = p.data.T.contiguous().T
            changed += 1
    return changed


@torch.inference_mode(False)
@torch.no_grad()
def row_major_layout(model) -> int:
    """Undo :func:`linear_layout`: the row-major layout TransformerLens itself produces
    (used by ``bench/bench_patching.py`` to time TransformerLens as it ships)."""
    changed = 0
    for module in model.modules():
        for name in _TRANSPOSED.get(type(module).__name__, ()):
            p = getattr(module, name, None)
            if p is None or p.dim() != 2 or p.is_contiguous():
                continue
            p.data = p.data.contiguous()
            changed += 1
    return changed

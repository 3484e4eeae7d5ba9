"""Concept erasure with LEACE (the ``concept-erasure`` package), as a necessity check.

LEACE removes, with the least change in squared distance, every direction along which
a *linear* read-out could recover the label. A probe trained and tested after erasure
should fall to the majority baseline; if the model's behaviour survives the same
erasure, it does not need the linear representation the probe found.
"""

from __future__ import annotations

import numpy as np
import torch

from replab.errors import ReplabError
from replab.probes._solver import eigenbasis, fit_logistic


def fit_eraser(x: np.ndarray | torch.Tensor, codes: np.ndarray, n_classes: int,
               shrinkage: bool = True):
    """Fit a ``concept_erasure.LeaceEraser`` on ``x [n, d]`` and class codes ``[n]``.

    The label is one-hot encoded (``z [n, K]``), as in the package's own examples.
    ``shrinkage`` (the package's default) shrinks the covariance of ``x`` towards a
    multiple of the identity - needed when a fold has fewer rows than dimensions. The
    eraser is the LEACE closed form ``x' = x - W^+ P W (x - mu)`` with ``W`` the
    (pseudo-)inverse square root of that covariance and ``P`` the orthogonal projector
    onto the column space of ``W Sigma_xz`` (tested against a hand implementation).
    Returns the eraser: ``eraser(x [m, d]) -> [m, d]``.
    """
    try:
        from concept_erasure import LeaceEraser
    except ImportError:  # pragma: no cover - declared in the probes extra
        raise ReplabError("LEACE needs the concept-erasure package: pip install 'replab[probes]'") from None
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    z = torch.nn.functional.one_hot(torch.as_tensor(codes, dtype=torch.long), n_classes).float()
    return LeaceEraser.fit(x.double(), z.double(), shrinkage=shrinkage)


def erase(eraser, x) -> np.ndarray:
    """Apply a fitted eraser to ``x [m, d]`` -> ``[m, d]`` float32."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32)).double()
    return eraser(x).float().numpy()


def erased_fold(x: np.ndarray, codes: np.ndarray, n_classes: int, train: np.ndarray,
                test: np.ndarray, lam: float, max_iter: int = 200) -> np.ndarray:
    """LEACE fitted on ``train`` rows, applied to all; a logistic probe refitted on the
    erased train rows predicts the erased ``test`` rows.

    Args:
        x: ``[n, d]`` activations; codes: ``[n]`` labels; train/test: ``[n]`` bool masks.
        lam: the probe's L2 strength (per sample).

    Returns:
        Predicted codes for the test rows ``[n_test]``.
    """

    eraser = fit_eraser(x[train], codes[train], n_classes)
    xe = torch.from_numpy(erase(eraser, x))
    basis = eigenbasis(xe[torch.from_numpy(train)])
    z = basis.transform(xe)
    w, b, _ = fit_logistic(z, torch.from_numpy(codes)[None], torch.from_numpy(train)[None],
                           torch.tensor([float(lam)]), n_classes, basis.eig, max_iter=max_iter)
    te = torch.from_numpy(test)
    return (z[te] @ w[0] + b[0]).argmax(1).numpy()

"""Probe estimators with scikit-learn's API: ``fit`` / ``predict`` / ``predict_proba`` / ``score``.

All three share one linear read-out ``decision_function(X) = X @ coef_.T + intercept_``
(``X [n, d]`` raw activations, ``coef_ [K, d]``, ``intercept_ [K]``), so they work with
``cross_val_score``, ``GroupKFold`` and pipelines unchanged, and their rows are
directions in the model's own activation space.

* :class:`LogisticProbe` - multinomial L2 logistic regression; the L2 strength is chosen
  by (grouped) inner cross-validation when ``lam=None``.
* :class:`MeanDiffProbe` - difference of means (mass-mean probe), closed form.
* :class:`LowRankProbe` - multinomial logistic regression whose weight matrix has rank
  ``<= rank`` (``coef_ = (A @ B).T``), for "one direction or several?".

Features are centred and divided by one scalar (the RMS of the centred training
activations) before the penalty applies; one scalar keeps the geometry, so the learned
rows are directions in the original space. ``lam`` is per-sample: the objective is
``mean CE + lam / 2 * ||W||^2``, i.e. scikit-learn's ``C = 1 / (lam * n_train)``.

**Grouped inner CV under scikit-learn.** ``LogisticProbe.fit(X, y, groups=g)`` makes the
inner CV that picks ``lam`` grouped. ``cross_val_score(probe, X, y, groups=g)`` passes
``groups`` only to the *outer* splitter; to route it to ``fit`` as well, use
scikit-learn's metadata routing::

    sklearn.set_config(enable_metadata_routing=True)
    cross_val_score(LogisticProbe().set_fit_request(groups=True), X, y,
                    cv=GroupKFold(5), params={"groups": g})

``inner_cv_`` records which inner CV a fit used (``"grouped"`` / ``"stratified"``).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import GroupKFold, StratifiedKFold
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from replab.errors import ReplabError
from replab.probes._solver import Memory, eigenbasis, fit_logistic, train_scale
from replab.probes.rank import fit_lowrank
from replab.threads import limit_threads

DEFAULT_LAMS = (1e-1, 1e-2, 1e-3)


class ProbeInputError(ReplabError, ValueError):
    """Bad probe input: a :class:`ReplabError` (one line in the CLI) that is also the
    ``ValueError`` scikit-learn's conventions ask estimators to raise."""


def _xy(est, X, y):
    """Validated ``X [n, d]`` float32, classes and integer codes; sets ``n_features_in_``.

    scikit-learn's own validation (``validate_data``): 2-D, non-empty, real, dense
    (sparse input is refused with a message that says so), finite, as many labels as
    rows, a classification target (``check_classification_targets``).
    """
    X, y = validate_data(est, X, y, dtype=[np.float32, np.float64], ensure_min_samples=1)
    check_classification_targets(y)
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ProbeInputError(f"a probe needs at least 2 classes in its training labels; got 1 class "
                              f"({classes[0]!r})")
    return np.ascontiguousarray(X, dtype=np.float32), classes, codes


class _LinearProbe(ClassifierMixin, BaseEstimator):
    """Shared read-out; subclasses set ``classes_``, ``coef_ [K, d]``, ``intercept_ [K]``."""

    def _scores(self, X) -> np.ndarray:
        """``X [n, d]`` -> per-class scores ``[n, K]`` (validated, fitted estimator only)."""
        check_is_fitted(self, ("coef_", "intercept_", "classes_"))
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        return np.asarray(X, dtype=np.float32) @ self.coef_.T + self.intercept_

    def decision_function(self, X) -> np.ndarray:
        """``X [n, d]`` -> scores ``[n, K]``; with two classes scikit-learn's binary
        convention, ``[n]`` = score of ``classes_[1]`` minus score of ``classes_[0]``."""
        s = self._scores(X)
        return s[:, 1] - s[:, 0] if s.shape[1] == 2 else s

    def predict_proba(self, X) -> np.ndarray:
        """``X [n, d]`` -> class probabilities ``[n, K]`` (softmax of the scores)."""
        s = self._scores(X) / getattr(self, "temperature_", 1.0)
        s = s - s.max(1, keepdims=True)
        p = np.exp(s)
        return p / p.sum(1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        """``X [n, d]`` -> labels ``[n]``."""
        scores = self._scores(X)
        return self.classes_[scores.argmax(1)]

    def directions(self) -> np.ndarray:
        """Unit vectors ``[K, d]``, one per class (rows of ``coef_`` centred over classes)."""
        w = self.coef_ - self.coef_.mean(0, keepdims=True)
        return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


class LoadedProbe(_LinearProbe):
    """A linear read-out restored from a saved probe artifact (:func:`replab.probes.load_probe`).

    It predicts like the probe that was saved; it cannot be refitted.
    """

    def fit(self, X, y=None, groups=None):
        """Refused: a loaded probe has no hyperparameters to refit with."""
        raise ProbeInputError("a loaded probe cannot be refitted; fit a LogisticProbe instead")


def _to_raw(basis, w: torch.Tensor, b: torch.Tensor):
    """Rotated-basis weights ``w [d, K]``, ``b [K]`` -> raw ``coef_ [K, d]``, ``intercept_ [K]``."""
    coef = (basis.rot @ w / basis.scale).T
    intercept = b - basis.mean @ coef.T
    return coef.numpy().astype(np.float32), intercept.numpy().astype(np.float32)


class LogisticProbe(_LinearProbe):
    """Multinomial L2 logistic probe.

    Args:
        lam: per-sample L2 strength; ``None`` chooses it from ``lams`` by inner CV.
        lams: candidate strengths for the inner CV.
        inner_folds: inner folds (grouped when ``fit`` gets ``groups``).
        max_iter, tol: solver settings (see :func:`replab.probes._solver.fit_logistic`).

    Learned: ``classes_``, ``coef_ [K, d]``, ``intercept_ [K]``, ``lam_``, ``C_``
    (scikit-learn's equivalent), ``cv_scores_`` (``{lam: inner accuracy}``), ``inner_cv_``
    (``"grouped"``, ``"stratified"`` or ``None`` with a fixed ``lam``), ``n_iter_``.
    Every inner fit is equivalent to scaling fitted on its own inner training rows.
    """

    def __init__(self, lam=None, lams=DEFAULT_LAMS, inner_folds=3, max_iter=300, tol=1e-4):
        self.lam = lam
        self.lams = lams
        self.inner_folds = inner_folds
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X, y, groups=None):
        """Fit on ``X [n, d]``, labels ``y [n]``; ``groups [n]`` keeps groups together in inner CV."""

        with limit_threads(1, blas=1):
            return self._fit(X, y, groups)

    def _fit(self, X, y, groups):
        X, self.classes_, codes = _xy(self, X, y)
        xt = torch.from_numpy(X)
        basis = eigenbasis(xt)
        z = basis.transform(xt)
        K, n = len(self.classes_), len(X)
        yt = torch.from_numpy(codes)
        self.cv_scores_ = {}
        self.inner_cv_ = None
        lam = self.lam
        if lam is None:
            masks = inner_masks(n, codes, groups, self.inner_folds)
            self.inner_cv_ = "stratified" if groups is None else "grouped"
            lams = sorted(self.lams, reverse=True)
            P = len(masks)
            tr = torch.stack([torch.from_numpy(m) for m in masks])
            scale = train_scale(z, tr)
            init, memory = None, Memory()
            for cand in lams:
                w, b, _ = fit_logistic(z, yt.expand(P, n), tr, float(cand) * scale, K,
                                       basis.eig, init=init, max_iter=self.max_iter, tol=self.tol,
                                       memory=memory)
                init = (w, b)
                accs = []
                for p in range(P):
                    te = ~tr[p]
                    pred = (z[te] @ w[p] + b[p]).argmax(1)
                    accs.append(float((pred == yt[te]).float().mean()))
                self.cv_scores_[float(cand)] = float(np.mean(accs))
            lam = max(self.cv_scores_, key=lambda c: (round(self.cv_scores_[c], 6), c))
        self.lam_ = float(lam)
        self.C_ = 1.0 / (self.lam_ * n)
        w, b, self.n_iter_ = fit_logistic(z, yt[None], torch.ones(1, n, dtype=torch.bool),
                                          torch.tensor([self.lam_]), K, basis.eig,
                                          max_iter=self.max_iter, tol=self.tol)
        self.coef_, self.intercept_ = _to_raw(basis, w[0], b[0])
        return self


def inner_masks(n: int, codes, groups, folds: int) -> list[np.ndarray]:
    """Training masks ``[n]`` of the inner folds (grouped if ``groups`` is given)."""
    if groups is not None:
        groups = np.asarray(groups)
        k = min(folds, len(np.unique(groups)))
        if k < 2:
            raise ProbeInputError("inner cross-validation needs at least two groups")
        splits = GroupKFold(n_splits=k).split(np.zeros(n), codes, groups)
    else:
        k = max(2, min(folds, int(np.bincount(codes).min())))
        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=0).split(np.zeros(n), codes)
    out = []
    for train, _ in splits:
        m = np.zeros(n, dtype=bool)
        m[train] = True
        out.append(m)
    return out


def mean_diff(X: np.ndarray, codes: np.ndarray, K: int, mask: np.ndarray | None = None):
    """One-vs-rest difference of means (on the rows ``mask [n]`` when given).

    Returns ``coef [K, d]`` with ``coef[c] = mean(X[y == c]) - mean(X[y != c])`` and
    ``intercept [K]`` placing each class's threshold at the midpoint of the two means.
    Computed in float64 with one ``[K, n] @ [n, d]`` product (pass float64 ``X`` to
    reuse one conversion across many masks).
    """
    X = np.asarray(X, dtype=np.float64)
    onehot = np.eye(K)[codes]                                   # [n, K]
    if mask is not None:
        onehot *= np.asarray(mask, dtype=bool)[:, None]
    counts = onehot.sum(0)
    sums = onehot.T @ X                                         # [K, d]
    mu_in = sums / np.maximum(counts, 1)[:, None]
    mu_out = (sums.sum(0)[None] - sums) / np.maximum(counts.sum() - counts, 1)[:, None]
    coef = mu_in - mu_out
    intercept = -(coef * (mu_in + mu_out) / 2).sum(1)
    return coef.astype(np.float32), intercept.astype(np.float32)


class MeanDiffProbe(_LinearProbe):
    """Difference-of-means (mass-mean) probe: ``coef_[c] = mu_c - mu_rest``, midpoint threshold.

    Learned: ``classes_``, ``coef_ [K, d]``, ``intercept_ [K]``, ``temperature_`` (the
    score scale used by ``predict_proba``).
    """

    def fit(self, X, y, groups=None):
        """Fit on ``X [n, d]`` and labels ``y [n]`` (``groups`` is accepted and unused)."""
        X, self.classes_, codes = _xy(self, X, y)
        self.coef_, self.intercept_ = mean_diff(X, codes, len(self.classes_))
        self.temperature_ = float(np.std(self._scores(X)) or 1.0)
        return self


class LowRankProbe(_LinearProbe):
    """Multinomial logistic probe with a rank-``rank`` weight matrix ``W = A @ B``.

    Args:
        rank: ``k``, the number of directions (``A [d, k]``, ``B [k, K]``).
        lam: per-sample L2 strength on ``W`` (same units as :class:`LogisticProbe`).
        max_iter: L-BFGS iterations.

    Learned: ``classes_``, ``coef_ [K, d]``, ``intercept_ [K]``, ``components_ [k, d]``
    (orthonormal basis of the probe's subspace in activation space).
    """

    def __sklearn_tags__(self):
        # Honest tag: a rank-k read-out cannot separate more than k + 1 classes in general
        # (rank 1 on scikit-learn's 3-blob check reaches 0.78, the best 1-D LDA projection
        # 0.74), and the number of classes is unknown here.
        tags = super().__sklearn_tags__()
        tags.classifier_tags.poor_score = True
        return tags

    def __init__(self, rank=1, lam=1e-2, max_iter=200):
        self.rank = rank
        self.lam = lam
        self.max_iter = max_iter

    def fit(self, X, y, groups=None):
        """Fit on ``X [n, d]`` and labels ``y [n]``."""

        with limit_threads(1, blas=1):
            return self._fit(X, y)

    def _fit(self, X, y):

        X, self.classes_, codes = _xy(self, X, y)
        xt = torch.from_numpy(X)
        basis = eigenbasis(xt)
        z = basis.transform(xt)
        n, K = len(X), len(self.classes_)
        yt = torch.from_numpy(codes)
        full, fb, _ = fit_logistic(z, yt[None], torch.ones(1, n, dtype=torch.bool),
                                   torch.tensor([float(self.lam)]), K, basis.eig)
        info: dict = {}
        w, b = fit_lowrank(z, yt[None], torch.ones(1, n, dtype=torch.bool),
                           torch.tensor([float(self.lam)]), self.rank, (full, fb),
                           max_iter=self.max_iter, info=info)
        self.n_iter_ = max(1, info.get("n_iter", 1))
        self.coef_, self.intercept_ = _to_raw(basis, w[0], b[0])
        _, s, vt = np.linalg.svd(self.coef_ - self.coef_.mean(0), full_matrices=False)
        self.components_ = vt[: min(self.rank, int((s > 1e-6 * s.max()).sum()))]
        return self

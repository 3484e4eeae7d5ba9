"""One layer of a probe sweep: every kind, nested CV, controls, held-out templates, LEACE.

:func:`sweep_layer` is the engine behind ``replab probe train``. For one layer's
activations it fits, in a handful of batched solver calls:

* logistic: nested CV. With ``F`` outer folds the inner CV of outer fold ``k`` is
  the leave-one-fold-out CV over the other ``F - 1`` folds (:func:`nested_cv_sets`), so
  every inner training set ("all folds but ``j`` and ``k``") is shared by two outer
  folds: ``F + F(F-1)/2`` training sets, fitted together along the L2 path (strong to
  weak, warm-started). Inner folds are unions of outer folds, so they are grouped like
  them, and outer fold ``k`` is never seen while its strength is chosen;
* the doubly held-out split and the shuffled-label baseline on the outer folds, at the
  L2 strength each outer fold chose;
* the control task **and** the task probe it is compared with on the *control folds*
  (``LayerData.cfold``: types recur between train and test), at the median chosen
  strength, so ``selectivity = matched_accuracy - control_accuracy`` on one split;
* the all-rows probe and (with controls) an all-rows shuffled-label probe;
* difference of means (closed form) on the same splits;
* optional rank-``k`` probes, and LEACE (erasure fitted on each training fold).

Every fit is equivalent to preprocessing (centring, one RMS scale) fitted on its own
training rows only (:func:`replab.probes._solver.train_scale`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import torch

from replab.probes._solver import Memory, eigenbasis, fit_logistic, train_scale
from replab.probes.erasure import erased_fold
from replab.probes.estimators import _to_raw, mean_diff
from replab.probes.metrics import accuracy, balanced_accuracy, group_bootstrap_ci, macro_auroc
from replab.probes.rank import fit_lowrank


@dataclass
class LayerData:
    """Everything a layer sweep needs besides the activations.

    ``codes [n]`` labels ``0..K-1``; ``fold [n]`` outer fold ids (``--split-by``);
    ``control [n]`` control-task labels and ``cfold [n]`` control folds (both ``None``
    when the control task is skipped); ``shuffled [n]`` shuffled labels; ``heldout``
    optional ``(train [F, n], test [F, n])`` masks; ``boot_groups [n]`` units of the
    bootstrap CI.
    """

    codes: np.ndarray
    K: int
    fold: np.ndarray
    control: np.ndarray | None
    shuffled: np.ndarray
    heldout: tuple | None
    boot_groups: np.ndarray
    cfold: np.ndarray | None = None
    lams: tuple = (1e-1, 1e-2, 1e-3)
    max_iter: int = 150
    tol: float = 1e-4
    n_boot: int = 1000
    controls: bool = True
    erase: bool = False
    ranks: tuple = ()
    kinds: tuple = ("logistic", "meandiff")

    @property
    def control_task(self) -> bool:
        return bool(self.controls) and self.control is not None and self.cfold is not None


@dataclass
class LayerResult:
    """Records (one dict per kind/rank), the all-rows probes ``{kind: (coef, intercept)}``
    (``shuffled_<kind>``: fitted on shuffled labels), the median chosen strength, the
    strength each outer fold chose, the inner-CV scores ``[n_lams, F]`` (lams strong to
    weak) and the out-of-fold predictions of the main folds."""

    records: list
    probes: dict = field(default_factory=dict)
    lam: float = float("nan")
    lam_by_fold: list = field(default_factory=list)
    inner_scores: np.ndarray | None = None
    predictions: dict = field(default_factory=dict)    # {kind: out-of-fold codes [n]}


def _softmax(s):
    s = s - s.max(1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(1, keepdims=True)


def nested_cv_sets(fold: np.ndarray) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Training masks of the nested CV: ``F`` outer sets (``fold != k``), then one set per
    pair ``(j, k)`` (``fold not in {j, k}``). The pair set is the inner training set of
    outer fold ``k`` with inner test fold ``j`` (and of outer ``j`` with inner test ``k``).

    Returns:
        ``(masks [F + F(F-1)/2] of [n] bool, pairs)``.
    """
    fold = np.asarray(fold)
    F = int(fold.max()) + 1
    pairs = list(combinations(range(F), 2))
    sets = [fold != k for k in range(F)] + [(fold != j) & (fold != k) for j, k in pairs]
    return sets, pairs


def _test_mask(D: LayerData, what: str, k: int) -> np.ndarray:
    if what == "heldout":
        return D.heldout[1][k]
    if what in ("matched", "control"):
        return D.cfold == k
    return D.fold == k


def _score(D: LayerData, pred, proba, preds: dict, erased_pred=None, fold_acc=None) -> dict:
    """Scores of out-of-fold predictions; ``preds`` holds ``heldout``, ``matched``,
    ``control`` and ``shuffled`` predictions ``[n]`` where they were computed."""
    y = D.codes
    rec = {"accuracy": accuracy(y, pred), "balanced_accuracy": balanced_accuracy(y, pred),
           "auroc": macro_auroc(y, proba)}
    if D.heldout is not None and preds.get("heldout") is not None:
        te = D.heldout[1].any(0)
        rec["heldout_accuracy"] = accuracy(y[te], preds["heldout"][te])
        rec["heldout_balanced_accuracy"] = balanced_accuracy(y[te], preds["heldout"][te])
    else:
        rec["heldout_accuracy"] = rec["heldout_balanced_accuracy"] = np.nan
    if preds.get("control") is not None and preds.get("matched") is not None:
        rec["matched_accuracy"] = accuracy(y, preds["matched"])
        rec["control_accuracy"] = accuracy(D.control, preds["control"])
        rec["selectivity"] = rec["matched_accuracy"] - rec["control_accuracy"]
    else:
        rec["matched_accuracy"] = rec["control_accuracy"] = rec["selectivity"] = np.nan
    shuf = preds.get("shuffled")
    rec["shuffled_accuracy"] = accuracy(y, shuf) if shuf is not None else np.nan
    rec["erased_accuracy"] = accuracy(y, erased_pred) if erased_pred is not None else np.nan
    lo, hi = group_bootstrap_ci(y, pred, D.boot_groups, n_boot=D.n_boot)
    rec["ci_low"], rec["ci_high"] = lo, hi
    rec["fold_std"] = float(np.std(fold_acc)) if fold_acc is not None else np.nan
    return rec


def _fold_acc(D, pred):
    return [balanced_accuracy(D.codes[D.fold == k], pred[D.fold == k])
            for k in range(int(D.fold.max()) + 1)]


def sweep_layer(x: np.ndarray, D: LayerData) -> LayerResult:
    """Sweep one layer.

    Args:
        x: ``[n, d]`` activations of the selected rows.
        D: labels, folds and settings (:class:`LayerData`).

    Returns:
        :class:`LayerResult` with one record per kind (and per rank for ``lowrank``).
    """
    out = LayerResult(records=[])
    n = len(x)
    F = int(D.fold.max()) + 1
    base = {"majority_accuracy": _majority(D), "n_rows": n, "n_classes": D.K}
    if "meandiff" in D.kinds:
        rec, probes = _meandiff(x, D)
        out.predictions["meandiff"] = rec.pop("_pred")
        out.records.append({"kind": "meandiff", "rank": D.K - 1, **base, **rec})
        out.probes.update(probes)
    if "logistic" not in D.kinds and not D.ranks:
        return out
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    basis = eigenbasis(xt)                       # label-free; see train_scale for train-only
    z = basis.transform(xt)
    y = torch.from_numpy(D.codes)
    fold = torch.from_numpy(D.fold)
    sets, pairs = nested_cv_sets(D.fold)
    masks = torch.from_numpy(np.stack(sets))
    P = len(sets)
    scale = train_scale(z, masks)                                        # [P]
    lams = sorted(D.lams, reverse=True)
    path, inner = [], np.zeros((len(lams), F))
    init, memory = None, Memory()
    for li, lam in enumerate(lams):
        w, b, _ = fit_logistic(z, y.expand(P, n), masks, float(lam) * scale, D.K,
                               basis.eig, init=init, max_iter=D.max_iter, tol=D.tol,
                               memory=memory)
        init = (w, b)
        path.append((w, b))
        hit = (_logits(z, w[F:], b[F:]).argmax(2) == y[:, None]).float()      # [n, pairs]
        for pi, (j, k) in enumerate(pairs):
            for test, outer in ((j, k), (k, j)):
                inner[li, outer] += float(hit[fold == test, pi].mean()) / (F - 1)
    best = [int(np.flatnonzero(inner[:, k] >= inner[:, k].max() - 1e-9)[0]) for k in range(F)]
    lam_k = [float(lams[i]) for i in best]
    logits = np.zeros((n, D.K), dtype=np.float32)
    for k in range(F):
        te = (fold == k)
        w, b = path[best[k]]
        logits[te.numpy()] = (z[te] @ w[k] + b[k]).numpy()
    lam_all = float(np.exp(np.median(np.log(lam_k))))
    out.lam, out.lam_by_fold, out.inner_scores = lam_all, lam_k, inner
    extra = _extra_fits(z, basis, D, path, best, lam_k, lam_all)
    preds = _extra_preds(z, D, extra)
    if "logistic" in D.kinds:
        pred = logits.argmax(1)
        erased = _erased(x, D, lam_k) if D.erase else None
        rec = _score(D, pred, _softmax(logits), preds, erased, _fold_acc(D, pred))
        out.records.append({"kind": "logistic", "rank": D.K - 1, **base, **rec,
                            "lam": lam_all})
        out.predictions["logistic"] = pred
        out.probes["logistic"] = _to_raw(basis, *extra[("all", 0)])
        if ("shuffled_all", 0) in extra:
            out.probes["shuffled_logistic"] = _to_raw(basis, *extra[("shuffled_all", 0)])
    for r in D.ranks:
        rec, (w, b) = _lowrank(z, D, r, path, best, extra, lam_k, lam_all)
        out.records.append({"kind": "lowrank", "rank": int(r), **base, **rec, "lam": lam_all})
        out.probes[f"lowrank_r{int(r)}"] = _to_raw(basis, w, b)
    return out


def _extra_fits(z, basis, D: LayerData, path, best, lam_k, lam_all) -> dict:
    """One batched fit of the extra problems at the chosen strengths: held-out templates
    and shuffled labels per outer fold, task and control on the control folds, all rows
    (+ shuffled all rows). Returns ``{(tag, fold): (W [d, K], b [K])}``."""
    n, d = z.shape
    F = int(D.fold.max()) + 1
    fold = torch.from_numpy(D.fold)
    ys, ms, ls, inits, tags = [], [], [], [], []

    def add(tag, labels, mask, lam, warm=None):
        ys.append(torch.from_numpy(labels))
        ms.append(mask)
        ls.append(float(lam))
        tags.append(tag)
        inits.append(warm)

    first = (path[best[0]][0][0], path[best[0]][1][0])
    for k in range(F):
        warm = (path[best[k]][0][k], path[best[k]][1][k])
        if D.heldout is not None:
            add(("heldout", k), D.codes, torch.from_numpy(D.heldout[0][k]), lam_k[k], warm)
        if D.controls:
            add(("shuffled", k), D.shuffled, fold != k, lam_k[k])
    if D.control_task:
        cfold = torch.from_numpy(D.cfold)
        for c in range(int(D.cfold.max()) + 1):
            add(("matched", c), D.codes, cfold != c, lam_all, first)
            add(("control", c), D.control, cfold != c, lam_all)
    add(("all", 0), D.codes, torch.ones(n, dtype=torch.bool), lam_all, first)
    if D.controls:
        add(("shuffled_all", 0), D.shuffled, torch.ones(n, dtype=torch.bool), lam_all)
    mask = torch.stack(ms)
    lam = torch.tensor(ls, dtype=torch.float32) * train_scale(z, mask)
    W0 = torch.stack([i[0] if i else torch.zeros(d, D.K) for i in inits])
    B0 = torch.stack([i[1] if i else torch.zeros(D.K) for i in inits])
    ew, eb, _ = fit_logistic(z, torch.stack(ys), mask, lam, D.K, basis.eig, init=(W0, B0),
                             max_iter=D.max_iter, tol=D.tol)
    return {t: (ew[i], eb[i]) for i, t in enumerate(tags)}


def _logits(z, w, b):
    """``z [n, d]``, ``w [P, d, K]``, ``b [P, K]`` -> logits ``[n, P, K]`` in one matmul."""
    P, d, K = w.shape
    return (z @ w.permute(1, 0, 2).reshape(d, P * K)).view(-1, P, K) + b


def _extra_preds(z, D, extra) -> dict:
    """Out-of-fold predictions ``[n]`` of the extra problems, by tag."""
    preds = {}
    n = z.shape[0]
    for what in ("heldout", "shuffled", "matched", "control"):
        ks = sorted(k for (t, k) in extra if t == what)
        if not ks:
            continue
        p = np.full(n, -1)
        for k in ks:
            te = _test_mask(D, what, k)
            w, b = extra[(what, k)]
            p[te] = (z[torch.from_numpy(te)] @ w + b).argmax(1).numpy()
        preds[what] = p
    return preds


def _majority(D: LayerData) -> float:
    hits = 0
    for k in range(int(D.fold.max()) + 1):
        tr, te = D.fold != k, D.fold == k
        hits += int((D.codes[te] == np.bincount(D.codes[tr], minlength=D.K).argmax()).sum())
    return hits / len(D.codes)


def _md_pred(x, x64, labels, K, tr, te):
    coef, icpt = mean_diff(x64, labels, K, tr)
    return (x[te] @ coef.T + icpt).argmax(1)


def _meandiff(x, D: LayerData):
    """Difference of means on every split; returns ``(record, probes)``."""
    F = int(D.fold.max()) + 1
    n = len(x)
    x64 = x.astype(np.float64)
    scores = np.zeros((n, D.K), dtype=np.float32)
    preds = {}
    if D.heldout is not None:
        preds["heldout"] = np.full(n, -1)
    if D.controls:
        preds["shuffled"] = np.full(n, -1)
    for k in range(F):
        tr, te = D.fold != k, D.fold == k
        coef, icpt = mean_diff(x64, D.codes, D.K, tr)
        s_tr = x[tr] @ coef.T + icpt
        scores[te] = (x[te] @ coef.T + icpt) / (np.std(s_tr) or 1.0)
        if D.heldout is not None:
            htr, hte = D.heldout[0][k], D.heldout[1][k]
            preds["heldout"][hte] = _md_pred(x, x64, D.codes, D.K, htr, hte)
        if D.controls:
            preds["shuffled"][te] = _md_pred(x, x64, D.shuffled, D.K, tr, te)
    if D.control_task:
        preds["matched"], preds["control"] = np.full(n, -1), np.full(n, -1)
        for c in range(int(D.cfold.max()) + 1):
            tr, te = D.cfold != c, D.cfold == c
            preds["matched"][te] = _md_pred(x, x64, D.codes, D.K, tr, te)
            preds["control"][te] = _md_pred(x, x64, D.control, D.K, tr, te)
    pred = scores.argmax(1)
    rec = _score(D, pred, _softmax(scores), preds, None, _fold_acc(D, pred))
    rec["_pred"] = pred
    everything = np.ones(n, dtype=bool)
    probes = {"meandiff": mean_diff(x64, D.codes, D.K, everything)}
    if D.controls:
        probes["shuffled_meandiff"] = mean_diff(x64, D.shuffled, D.K, everything)
    return rec, probes


def _erased(x, D: LayerData, lam_k) -> np.ndarray:

    pred = np.full(len(x), -1)
    for k in range(int(D.fold.max()) + 1):
        tr, te = D.fold != k, D.fold == k
        pred[te] = erased_fold(x, D.codes, D.K, tr, te, float(lam_k[k]), max_iter=D.max_iter)
    return pred


def _lowrank(z, D: LayerData, r, path, best, extra, lam_k, lam_all):
    """Rank-``r`` probes on the outer folds (+ held-out), on the control folds (task and
    control) and on all rows, at the logistic probe's strengths.

    Returns ``(record, (W [d, K], b [K]))``, the latter the all-rows probe in ``z`` coordinates.
    """

    F = int(D.fold.max()) + 1
    fold = torch.from_numpy(D.fold)
    ys, ms, ls, W0, B0, tags = [], [], [], [], [], []

    def add(tag, labels, mask, lam, warm):
        ys.append(torch.from_numpy(labels))
        ms.append(mask)
        ls.append(float(lam))
        W0.append(warm[0])
        B0.append(warm[1])
        tags.append(tag)

    for k in range(F):
        add(("main", k), D.codes, fold != k, lam_k[k], (path[best[k]][0][k], path[best[k]][1][k]))
        if ("heldout", k) in extra:
            add(("heldout", k), D.codes, torch.from_numpy(D.heldout[0][k]), lam_k[k],
                extra[("heldout", k)])
    if D.control_task:
        cfold = torch.from_numpy(D.cfold)
        for c in range(int(D.cfold.max()) + 1):
            add(("matched", c), D.codes, cfold != c, lam_all, extra[("matched", c)])
            add(("control", c), D.control, cfold != c, lam_all, extra[("control", c)])
    add(("all", 0), D.codes, torch.ones(len(D.codes), dtype=torch.bool), lam_all, extra[("all", 0)])
    mask = torch.stack(ms)
    lam = torch.tensor(ls, dtype=torch.float32) * train_scale(z, mask)
    w, b = fit_lowrank(z, torch.stack(ys), mask, lam, r, (torch.stack(W0), torch.stack(B0)),
                       max_iter=D.max_iter)
    fitted = {t: (w[i], b[i]) for i, t in enumerate(tags)}
    n = z.shape[0]
    logits = np.zeros((n, D.K), dtype=np.float32)
    for k in range(F):
        te = fold == k
        logits[te.numpy()] = (z[te] @ fitted[("main", k)][0] + fitted[("main", k)][1]).numpy()
    preds = _extra_preds(z, D, {t: v for t, v in fitted.items()
                                if t[0] in ("heldout", "matched", "control")})
    pred = logits.argmax(1)
    return _score(D, pred, _softmax(logits), preds, None, _fold_acc(D, pred)), fitted[("all", 0)]

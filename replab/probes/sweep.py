"""One layer of a probe sweep: every kind, nested CV, controls, held-out templates, LEACE.

:func:`sweep_layer` is the engine behind ``replab probe train``. For one layer's
activations it fits, in a handful of batched solver calls:

* logistic: nested CV. With ``F`` outer folds the inner CV of outer fold ``k`` is
  the leave-one-fold-out CV over the other ``F - 1`` folds, so every inner training
  set ("all folds but ``j`` and ``k``") is shared by two outer folds: ``F + F(F-1)/2``
  training sets, fitted together along the L2 path (strong to weak, warm-started);
* the control task, the shuffled-label baseline and the doubly held-out split, at the
  L2 strength each outer fold chose;
* difference of means (closed form) on the same splits;
* optional rank-``k`` probes, and LEACE (erasure fitted on each training fold).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import torch

from replab.probes import metrics as M
from replab.probes._solver import Memory, eigenbasis, fit_logistic
from replab.probes.estimators import _to_raw, mean_diff


@dataclass
class LayerData:
    """Everything a layer sweep needs besides the activations.

    ``codes [n]`` labels ``0..K-1``; ``fold [n]`` outer fold ids; ``control [n]`` control
    labels; ``shuffled [n]`` shuffled labels; ``heldout`` optional ``(train [F, n],
    test [F, n])`` masks; ``boot_groups [n]`` units of the bootstrap CI.
    """

    codes: np.ndarray
    K: int
    fold: np.ndarray
    control: np.ndarray
    shuffled: np.ndarray
    heldout: tuple | None
    boot_groups: np.ndarray
    lams: tuple = (1e-1, 1e-2, 1e-3)
    max_iter: int = 150
    tol: float = 1e-4
    n_boot: int = 1000
    controls: bool = True
    erase: bool = False
    ranks: tuple = ()
    kinds: tuple = ("logistic", "meandiff")


@dataclass
class LayerResult:
    """Records (one dict per kind/rank) and the all-rows probes ``{kind: (coef, intercept)}``."""

    records: list
    probes: dict = field(default_factory=dict)
    lam: float = float("nan")


def _softmax(s):
    s = s - s.max(1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(1, keepdims=True)


def _score(D: LayerData, pred, proba, ho_pred=None, ctrl_pred=None, shuf_pred=None,
           erased_pred=None, fold_acc=None) -> dict:
    y = D.codes
    rec = {"accuracy": M.accuracy(y, pred), "balanced_accuracy": M.balanced_accuracy(y, pred),
           "auroc": M.macro_auroc(y, proba)}
    if D.heldout is not None and ho_pred is not None:
        te = D.heldout[1].any(0)
        rec["heldout_accuracy"] = M.accuracy(y[te], ho_pred[te])
        rec["heldout_balanced_accuracy"] = M.balanced_accuracy(y[te], ho_pred[te])
    else:
        rec["heldout_accuracy"] = rec["heldout_balanced_accuracy"] = np.nan
    rec["control_accuracy"] = M.accuracy(D.control, ctrl_pred) if ctrl_pred is not None else np.nan
    rec["selectivity"] = rec["accuracy"] - rec["control_accuracy"]
    rec["shuffled_accuracy"] = M.accuracy(y, shuf_pred) if shuf_pred is not None else np.nan
    rec["erased_accuracy"] = M.accuracy(y, erased_pred) if erased_pred is not None else np.nan
    lo, hi = M.group_bootstrap_ci(y, pred, D.boot_groups, n_boot=D.n_boot)
    rec["ci_low"], rec["ci_high"] = lo, hi
    rec["fold_std"] = float(np.std(fold_acc)) if fold_acc is not None else np.nan
    return rec


def _fold_acc(D, pred):
    return [M.balanced_accuracy(D.codes[D.fold == k], pred[D.fold == k])
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
        rec, probe = _meandiff(x, D)
        out.records.append({"kind": "meandiff", "rank": D.K - 1, **base, **rec})
        out.probes["meandiff"] = probe
    if "logistic" not in D.kinds and not D.ranks:
        return out
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    basis = eigenbasis(xt)
    z = basis.transform(xt)
    y = torch.from_numpy(D.codes)
    fold = torch.from_numpy(D.fold)
    pairs = list(combinations(range(F), 2))
    sets = [fold != k for k in range(F)] + [(fold != j) & (fold != k) for j, k in pairs]
    masks = torch.stack(sets)
    P = len(sets)
    lams = sorted(D.lams, reverse=True)
    path, inner = [], np.zeros((len(lams), F))
    init, memory = None, Memory()
    for li, lam in enumerate(lams):
        w, b, _ = fit_logistic(z, y.expand(P, n), masks, torch.full((P,), float(lam)), D.K,
                               basis.eig, init=init, max_iter=D.max_iter, tol=D.tol,
                               memory=memory)
        init = (w, b)
        path.append((w, b))
        hit = (_logits(z, w[F:], b[F:]).argmax(2) == y[:, None]).float()      # [n, pairs]
        for pi, (j, k) in enumerate(pairs):
            for test, outer in ((j, k), (k, j)):
                inner[li, outer] += float(hit[fold == test, pi].mean()) / (F - 1)
    best = [int(np.flatnonzero(inner[:, k] >= inner[:, k].max() - 1e-9)[0]) for k in range(F)]
    lam_k = torch.tensor([lams[i] for i in best], dtype=torch.float32)
    logits = np.zeros((n, D.K), dtype=np.float32)
    for k in range(F):
        te = (fold == k)
        w, b = path[best[k]]
        logits[te.numpy()] = (z[te] @ w[k] + b[k]).numpy()
    # extra problems at the chosen strengths: heldout, control, shuffled, all rows
    ys, ms, ls, inits, tags = [], [], [], [], []

    def add(tag, labels, mask, lam, warm=None):
        ys.append(torch.from_numpy(labels)); ms.append(mask); ls.append(lam); tags.append(tag)
        inits.append(warm)

    for k in range(F):
        warm = (path[best[k]][0][k], path[best[k]][1][k])
        if D.heldout is not None:
            add(("heldout", k), D.codes, torch.from_numpy(D.heldout[0][k]), lam_k[k], warm)
        if D.controls:
            add(("control", k), D.control, fold != k, lam_k[k])
            add(("shuffled", k), D.shuffled, fold != k, lam_k[k])
    lam_all = float(np.exp(np.median(np.log(lam_k.numpy()))))
    add(("all", 0), D.codes, torch.ones(n, dtype=torch.bool), torch.tensor(lam_all),
        (path[best[0]][0][0], path[best[0]][1][0]))
    d = z.shape[1]
    W0 = torch.stack([i[0] if i else torch.zeros(d, D.K) for i in inits])
    B0 = torch.stack([i[1] if i else torch.zeros(D.K) for i in inits])
    ew, eb, _ = fit_logistic(z, torch.stack(ys), torch.stack(ms), torch.stack(ls).float(), D.K,
                             basis.eig, init=(W0, B0), max_iter=D.max_iter, tol=D.tol)
    extra = {t: (ew[i], eb[i]) for i, t in enumerate(tags)}
    preds = _extra_preds(z, D, extra, F)
    out.lam = lam_all
    if "logistic" in D.kinds:
        pred = logits.argmax(1)
        erased = _erased(x, D, lam_k.numpy()) if D.erase else None
        rec = _score(D, pred, _softmax(logits), preds.get("heldout"), preds.get("control"),
                     preds.get("shuffled"), erased, _fold_acc(D, pred))
        out.records.append({"kind": "logistic", "rank": D.K - 1, **base, **rec,
                            "lam": lam_all})
        out.probes["logistic"] = _to_raw(basis, *extra[("all", 0)])
    for r in D.ranks:
        rec, (w, b) = _lowrank(z, D, r, path, best, extra, lam_k, lam_all, F)
        out.records.append({"kind": "lowrank", "rank": int(r), **base, **rec, "lam": lam_all})
        out.probes[f"lowrank_r{int(r)}"] = _to_raw(basis, w, b)
    return out


def _logits(z, w, b):
    """``z [n, d]``, ``w [P, d, K]``, ``b [P, K]`` -> logits ``[n, P, K]`` in one matmul."""
    P, d, K = w.shape
    return (z @ w.permute(1, 0, 2).reshape(d, P * K)).view(-1, P, K) + b


def _extra_preds(z, D, extra, F):
    preds = {}
    n = z.shape[0]
    for what in ("heldout", "control", "shuffled"):
        if (what, 0) not in extra:
            continue
        p = np.full(n, -1)
        for k in range(F):
            te = D.heldout[1][k] if what == "heldout" else (D.fold == k)
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


def _meandiff(x, D: LayerData):
    F = int(D.fold.max()) + 1
    n = len(x)
    x64 = x.astype(np.float64)
    scores = np.zeros((n, D.K), dtype=np.float32)
    ho = np.full(n, -1)
    ctrl, shuf = np.full(n, -1), np.full(n, -1)
    for k in range(F):
        tr, te = D.fold != k, D.fold == k
        coef, icpt = mean_diff(x64, D.codes, D.K, tr)
        s_tr = x[tr] @ coef.T + icpt
        scores[te] = (x[te] @ coef.T + icpt) / (np.std(s_tr) or 1.0)
        if D.heldout is not None:
            htr, hte = D.heldout[0][k], D.heldout[1][k]
            c2, i2 = mean_diff(x64, D.codes, D.K, htr)
            ho[hte] = (x[hte] @ c2.T + i2).argmax(1)
        if D.controls:
            c3, i3 = mean_diff(x64, D.control, D.K, tr)
            ctrl[te] = (x[te] @ c3.T + i3).argmax(1)
            c4, i4 = mean_diff(x64, D.shuffled, D.K, tr)
            shuf[te] = (x[te] @ c4.T + i4).argmax(1)
    pred = scores.argmax(1)
    rec = _score(D, pred, _softmax(scores), ho if D.heldout is not None else None,
                 ctrl if D.controls else None, shuf if D.controls else None, None,
                 _fold_acc(D, pred))
    return rec, mean_diff(x64, D.codes, D.K, np.ones(n, dtype=bool))


def _erased(x, D: LayerData, lam_k) -> np.ndarray:
    from replab.probes.erasure import erased_fold

    pred = np.full(len(x), -1)
    for k in range(int(D.fold.max()) + 1):
        tr, te = D.fold != k, D.fold == k
        pred[te] = erased_fold(x, D.codes, D.K, tr, te, float(lam_k[k]), max_iter=D.max_iter)
    return pred


def _lowrank(z, D: LayerData, r, path, best, extra, lam_k, lam_all, F):
    """Rank-``r`` probes on the outer folds (+ held-out, control) and on all rows.

    Returns ``(record, (W [d, K], b [K]))``, the latter the all-rows probe in ``z`` coordinates.
    """
    from replab.probes.rank import fit_lowrank

    fold = torch.from_numpy(D.fold)
    ys, ms, ls, W0, B0, tags = [], [], [], [], [], []
    for k in range(F):
        ys.append(torch.from_numpy(D.codes)); ms.append(fold != k); ls.append(lam_k[k])
        W0.append(path[best[k]][0][k]); B0.append(path[best[k]][1][k]); tags.append(("main", k))
        for what, lab in (("heldout", D.codes), ("control", D.control)):
            if (what, k) in extra:
                mask = (torch.from_numpy(D.heldout[0][k]) if what == "heldout" else fold != k)
                ys.append(torch.from_numpy(lab)); ms.append(mask); ls.append(lam_k[k])
                W0.append(extra[(what, k)][0]); B0.append(extra[(what, k)][1])
                tags.append((what, k))
    ys.append(torch.from_numpy(D.codes)); ms.append(torch.ones(len(D.codes), dtype=torch.bool))
    ls.append(torch.tensor(lam_all)); tags.append(("all", 0))
    W0.append(extra[("all", 0)][0]); B0.append(extra[("all", 0)][1])
    w, b = fit_lowrank(z, torch.stack(ys), torch.stack(ms), torch.stack(ls).float(), r,
                       (torch.stack(W0), torch.stack(B0)), max_iter=D.max_iter)
    fitted = {t: (w[i], b[i]) for i, t in enumerate(tags)}
    n = z.shape[0]
    logits = np.zeros((n, D.K), dtype=np.float32)
    for k in range(F):
        te = fold == k
        logits[te.numpy()] = (z[te] @ fitted[("main", k)][0] + fitted[("main", k)][1]).numpy()
    preds = _extra_preds(z, D, {t: v for t, v in fitted.items()
                                if t[0] in ("heldout", "control")}, F)
    pred = logits.argmax(1)
    return _score(D, pred, _softmax(logits), preds.get("heldout"), preds.get("control"),
                  None, None, _fold_acc(D, pred)), fitted[("all", 0)]

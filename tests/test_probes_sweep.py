"""The sweep engine (``replab.probes.sweep``, what ``replab probe train`` runs) against
scikit-learn and hand computations on the same splits; nested-CV hygiene; the control
task on folds where types recur (fast, synthetic stores)."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from replab.probes import ProbeConfig, train_probes
from replab.probes.sweep import nested_cv_sets, sweep_layer
from replab.probes.train import prepare
from replab.store.synthetic import write_synthetic_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("sw") / "s", n_rows=360, d=24,
                                 n_layers=2, n_classes=4, rank=2, signal=1.6,
                                 entity_scale=1.0, seed=3)


def _layer(store, cfg, layer=1):
    rows, classes, D, info = prepare(store, cfg)
    x = np.asarray(store.acts(f"blocks.{layer}.hook_resid_post")[rows], dtype=np.float32)
    return x, D, info


def _sk(X, codes, tr, lam):
    """scikit-learn on features centred and RMS-scaled with the training rows only."""
    mu = X[tr].mean(0)
    rms = np.sqrt(((X[tr] - mu) ** 2).mean())
    Xs = (X - mu) / rms
    m = LogisticRegression(C=1.0 / (lam * tr.sum()), tol=1e-8, max_iter=10000).fit(Xs[tr], codes[tr])
    return m, Xs


def test_sweep_logistic_matches_sklearn_on_same_splits(store):
    lams = (1.0, 1e-2, 1e-4)           # strong to weak: the choice matters here
    cfg = ProbeConfig(label="label", lams=lams, controls=False, erase=False)
    x, D, _ = _layer(store, cfg)
    D.tol = 1e-6
    res = sweep_layer(x, D)
    ours = res.records[0] if res.records[0]["kind"] == "logistic" else res.records[1]
    F = int(D.fold.max()) + 1
    pred = np.full(len(x), -1)
    chosen = []
    for k in range(F):                 # the same nested CV, by hand, with scikit-learn
        inner = []
        for lam in sorted(lams, reverse=True):
            accs = []
            for j in range(F):
                if j == k:
                    continue
                tr = (D.fold != j) & (D.fold != k)
                m, Xs = _sk(x, D.codes, tr, lam)
                accs.append(m.score(Xs[D.fold == j], D.codes[D.fold == j]))
            inner.append(np.mean(accs))
        best = sorted(lams, reverse=True)[int(np.flatnonzero(np.array(inner) >= max(inner) - 1e-9)[0])]
        chosen.append(best)
        m, Xs = _sk(x, D.codes, D.fold != k, best)
        pred[D.fold == k] = m.predict(Xs[D.fold == k])
    assert len(set(chosen)) >= 1 and chosen == res.lam_by_fold, (chosen, res.lam_by_fold)
    sk_acc = float((pred == D.codes).mean())
    assert 0.4 < sk_acc < 0.98                                   # not a trivial problem
    assert abs(ours["accuracy"] - sk_acc) <= 0.01, (ours["accuracy"], sk_acc)
    assert (res.predictions["logistic"] == pred).mean() >= 0.97
    # each fixed strength too (no selection): the same fits fold by fold
    for lam in (1e-2, 1e-4):
        D.lams = (lam,)
        r = sweep_layer(x, D)
        acc = next(rec for rec in r.records if rec["kind"] == "logistic")["accuracy"]
        sk = np.full(len(x), -1)
        for k in range(F):
            m, Xs = _sk(x, D.codes, D.fold != k, lam)
            sk[D.fold == k] = m.predict(Xs[D.fold == k])
        assert abs(acc - (sk == D.codes).mean()) <= 0.01, (lam, acc, (sk == D.codes).mean())


def test_sweep_meandiff_matches_hand_computation(store):
    cfg = ProbeConfig(label="label", kinds=("meandiff",), controls=True, erase=False)
    x, D, _ = _layer(store, cfg)
    res = sweep_layer(x, D)
    rec = res.records[0]
    X = x.astype(np.float64)

    def hand(labels, tr, te):
        coef, icpt = [], []
        for c in range(D.K):
            mu_in, mu_out = X[tr & (labels == c)].mean(0), X[tr & (labels != c)].mean(0)
            coef.append(mu_in - mu_out)
            icpt.append(-(mu_in - mu_out) @ (mu_in + mu_out) / 2)
        return (X[te] @ np.array(coef).T + np.array(icpt)).argmax(1)

    pred = np.full(len(X), -1)
    for k in range(int(D.fold.max()) + 1):
        pred[D.fold == k] = hand(D.codes, D.fold != k, D.fold == k)
    np.testing.assert_array_equal(res.predictions["meandiff"], pred)
    assert rec["accuracy"] == pytest.approx((pred == D.codes).mean())
    matched, control = np.full(len(X), -1), np.full(len(X), -1)
    for c in range(int(D.cfold.max()) + 1):
        tr, te = D.cfold != c, D.cfold == c
        matched[te] = hand(D.codes, tr, te)
        control[te] = hand(D.control, tr, te)
    assert rec["matched_accuracy"] == pytest.approx((matched == D.codes).mean())
    assert rec["control_accuracy"] == pytest.approx((control == D.control).mean())
    assert rec["selectivity"] == pytest.approx(rec["matched_accuracy"] - rec["control_accuracy"])


def test_train_scale_equals_train_only_preprocessing():
    """Shared basis + per-problem strength == a basis fitted on the training rows only."""
    from replab.probes._solver import eigenbasis, fit_logistic, train_scale
    from replab.probes.estimators import _to_raw

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(200, 10)) * np.exp(rng.normal(size=10)) + 3).astype(np.float32)
    X[:60] *= 3.0                                   # the test rows change the global RMS a lot
    y = torch.from_numpy((X[:, 0] + X[:, 1] > np.median(X[:, 0] + X[:, 1])).astype(np.int64))
    tr = torch.zeros(200, dtype=torch.bool)
    tr[60:] = True
    xt = torch.from_numpy(X)
    shared = eigenbasis(xt)
    z = shared.transform(xt)
    w, b, _ = fit_logistic(z, y[None], tr[None], 0.05 * train_scale(z, tr[None]), 2,
                           shared.eig, tol=1e-7, max_iter=500)
    coef_a, icpt_a = _to_raw(shared, w[0], b[0])
    own = eigenbasis(xt[tr])
    z2 = own.transform(xt)
    w2, b2, _ = fit_logistic(z2, y[None], tr[None], torch.tensor([0.05]), 2, own.eig,
                             tol=1e-7, max_iter=500)
    coef_b, icpt_b = _to_raw(own, w2[0], b2[0])
    tol = 2e-3 * np.abs(coef_b).max()                       # float32 solver round-off
    np.testing.assert_allclose(coef_a, coef_b, atol=tol)
    np.testing.assert_allclose(icpt_a, icpt_b, atol=2e-3 * np.abs(icpt_b).max())
    # without the correction the shared (all-rows) scale changes the model visibly
    w3, b3, _ = fit_logistic(z, y[None], tr[None], torch.tensor([0.05]), 2, shared.eig,
                             tol=1e-7, max_iter=500)
    coef_c, _ = _to_raw(shared, w3[0], b3[0])
    assert np.abs(coef_c - coef_b).max() > 10 * tol


def test_nested_cv_is_grouped_and_never_sees_the_outer_fold(store):
    cfg = ProbeConfig(label="label", controls=False, erase=False)
    x, D, _ = _layer(store, cfg)
    groups = store.index["group"].to_numpy()
    sets, pairs = nested_cv_sets(D.fold)
    F = int(D.fold.max()) + 1
    assert len(sets) == F + len(pairs)
    for p, (j, k) in enumerate(pairs):
        inner_train = sets[F + p]
        for test, outer in ((j, k), (k, j)):
            # inner CV of outer fold `outer`, inner test fold `test`: grouped, outer unseen
            assert not inner_train[D.fold == outer].any()
            assert not set(groups[inner_train]) & set(groups[D.fold == test])
    res = sweep_layer(x, D)
    # canary: scramble the labels of outer fold 0; its strength and predictions must not move
    D2 = prepare(store, cfg)[2]
    te = D2.fold == 0
    D2.codes = D2.codes.copy()
    D2.codes[te] = np.random.default_rng(0).permutation(D2.codes[te])
    D2.codes[te] = (D2.codes[te] + 1) % D2.K
    res2 = sweep_layer(x, D2)
    assert res2.lam_by_fold[0] == res.lam_by_fold[0]
    np.testing.assert_allclose(res2.inner_scores[:, 0], res.inner_scores[:, 0])
    assert (res2.predictions["logistic"][te] == res.predictions["logistic"][te]).mean() >= 0.99
    assert (res2.predictions["meandiff"][te] == res.predictions["meandiff"][te]).all()


def test_control_task_catches_a_probe_that_memorises_entities(tmp_path):
    """Many entities, few rows each, entity vectors large and class signal weak: a weakly
    regularised logistic probe learns the entities' random control labels (types recur
    between train and test on the control folds), so its control accuracy is high and its
    selectivity low; on entity-grouped folds the same control task would sit at chance."""
    s = write_synthetic_store(tmp_path / "mem", n_rows=180, d=96, n_layers=1, n_classes=4,
                              rank=2, signal=1.0, entity_scale=3.0, template_scale=0.5,
                              n_templates=3, seed=4)
    run = train_probes(s, "label", lams=(1e-4,), erase=False, progress=False)
    data = run.summary["data"]
    assert data["control_split"] == "template" and data["control_coverage"] == 1.0
    rec = run.records.set_index("kind")
    chance = 1 / 4
    assert rec.loc["logistic", "control_accuracy"] > chance + 0.4      # memorised the types
    for kind in ("logistic", "meandiff"):
        r = rec.loc[kind]
        assert r["selectivity"] == pytest.approx(r["matched_accuracy"] - r["control_accuracy"])
    # when the entities are barely distinct there is nothing to memorise: control near chance
    s2 = write_synthetic_store(tmp_path / "flat", n_rows=180, d=96, n_layers=1, n_classes=4,
                               rank=2, signal=1.0, entity_scale=0.05, template_scale=0.5,
                               n_templates=3, seed=4)
    flat = train_probes(s2, "label", lams=(1e-4,), erase=False, progress=False).records
    assert (flat["control_accuracy"] < chance + 0.15).all(), flat["control_accuracy"]
    # the same control labels on entity-grouped folds: chance, whatever the probe
    x, D, _ = _layer(s, ProbeConfig(label="label", lams=(1e-4,), erase=False), layer=0)
    D.cfold = D.fold                                    # the old (degenerate) design
    old = next(r for r in sweep_layer(x, D).records if r["kind"] == "logistic")
    assert old["control_accuracy"] < chance + 0.15


def test_control_folds_never_hold_out_a_whole_class():
    """When the template *is* the class (sequence_types), template-grouped control folds
    would test classes never seen in training: the rows are dealt by type instead."""
    from replab.probes import splits as S

    rng = np.random.default_rng(1)
    codes = np.repeat(np.arange(4), 30)
    templates = np.array([f"t{c}" for c in codes])
    types = rng.integers(0, 25, len(codes))               # tokens shared across classes
    fold, scheme, cov = S.control_folds(types, templates, codes, 5)
    assert scheme == "type-stratified" and cov > 0.9
    for f in range(int(fold.max()) + 1):
        assert set(codes[fold == f]) <= set(codes[fold != f])

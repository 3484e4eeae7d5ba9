"""Probes: estimators vs scikit-learn and hand computations, LEACE, planted rank, splits,
controls, artifacts and the CLI, on synthetic stores (fast)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score

from replab.errors import ReplabError
from replab.probes import Direction, LogisticProbe, LowRankProbe, MeanDiffProbe, apply_probe, train_probes
from replab.probes import splits as S
from replab.store.synthetic import write_synthetic_store


def blobs(n=400, d=24, K=4, sep=1.2, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    means = rng.normal(size=(K, d)) * sep
    scale = np.exp(rng.normal(size=d))            # anisotropic, like a residual stream
    X = (means[y] + rng.normal(size=(n, d))) * scale + 5.0
    groups = rng.integers(0, 40, n)
    return X.astype(np.float32), np.array([f"c{v}" for v in y]), groups


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("syn") / "s", n_rows=450, d=32,
                                 n_layers=3, n_classes=5, rank=2, signal=3.0, seed=1)


def _scaled(X, tr):
    """The probe's feature scaling (centre, one RMS scalar) fitted on the training rows."""
    mu = X[tr].mean(0)
    rms = np.sqrt(((X[tr] - mu) ** 2).mean())
    return (X - mu) / rms


def test_logistic_matches_sklearn_on_same_splits():
    X, y, groups = blobs()
    for lam in (1e-1, 1e-2):
        ours, theirs = [], []
        for tr, te in GroupKFold(n_splits=5).split(X, y, groups):
            p = LogisticProbe(lam=lam, max_iter=500, tol=1e-6).fit(X[tr], y[tr])
            ours.append(p.score(X[te], y[te]))
            Xs = _scaled(X, tr)
            sk = LogisticRegression(C=1 / (lam * len(tr)), max_iter=5000, tol=1e-8).fit(Xs[tr], y[tr])
            theirs.append(sk.score(Xs[te], y[te]))
            assert p.C_ == pytest.approx(1 / (lam * len(tr)))
            agree = (p.predict(X[te]) == sk.predict(Xs[te])).mean()
            assert agree >= 0.97
        assert abs(np.mean(ours) - np.mean(theirs)) <= 0.01, (ours, theirs)


def test_solver_cells_masks_and_path_memory():
    """Own-rows cells == one masked product; the L-BFGS memory carried along the L2 path
    gives the same solutions as fresh fits."""
    from replab.probes._solver import Memory, _Design, eigenbasis, fit_logistic
    from replab.threads import limit_threads

    X, y, _ = blobs(n=300, d=12, K=3, seed=2)
    codes = torch.from_numpy(np.unique(y, return_inverse=True)[1])
    basis = eigenbasis(torch.from_numpy(X))
    z = basis.transform(torch.from_numpy(X))
    fold = torch.arange(300) % 4
    masks = torch.stack([fold != k for k in range(4)] + [(fold != 0) & (fold != 1)])
    P = len(masks)
    rng = torch.Generator().manual_seed(0)
    W, b = torch.randn(P, 3, 12, generator=rng), torch.randn(P, 3, generator=rng)
    idx, lam = torch.tensor([0, 2, 4]), torch.full((3,), 0.1)
    cells = _Design(z, codes.expand(P, -1), masks, 3, overhead=0)
    masked = _Design(z, codes.expand(P, -1), masks, 3, max_cells=0)
    assert len(cells.cells) == 4 and len(masked.cells) == 1
    for a, c in zip(cells.evaluate(W[idx], b[idx], idx, lam),
                    masked.evaluate(W[idx], b[idx], idx, lam), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    memory, init = Memory(), None
    for lam in (0.1, 0.01):
        lams = torch.full((P,), lam)
        with limit_threads(1, blas=1):
            w1, b1, _ = fit_logistic(z, codes.expand(P, -1), masks, lams, 3, basis.eig,
                                     init=init, memory=memory, tol=1e-6)
            w2, b2, _ = fit_logistic(z, codes.expand(P, -1), masks, lams, 3, basis.eig, tol=1e-6)
        init = (w1, b1)
        torch.testing.assert_close(w1, w2, rtol=1e-3, atol=2e-3)
        assert memory.S is not None and int(memory.cnt.min()) > 0


def test_logistic_nested_cv_and_sklearn_api():
    from replab.probes.estimators import inner_masks

    X, y, groups = blobs(seed=3)
    p = LogisticProbe(lams=(1.0, 1e-2), tol=1e-6).fit(X, y, groups=groups)
    assert set(p.cv_scores_) == {1.0, 1e-2} and p.inner_cv_ == "grouped"
    # the chosen strength is the best inner score (ties: the stronger one) ...
    best = max(p.cv_scores_.values())
    assert p.lam_ == max(c for c, v in p.cv_scores_.items() if v >= best - 1e-6)
    # ... and the inner scores are what independent refits on the grouped inner folds give
    codes = np.unique(y, return_inverse=True)[1]
    for lam in (1.0, 1e-2):
        accs = []
        for tr in inner_masks(len(X), codes, groups, 3):
            assert not set(groups[tr]) & set(groups[~tr])            # grouped inner folds
            ref = LogisticProbe(lam=lam, tol=1e-6).fit(X[tr], y[tr])
            accs.append(ref.score(X[~tr], y[~tr]))
        assert p.cv_scores_[lam] == pytest.approx(np.mean(accs), abs=0.01)
    assert p.coef_.shape == (4, X.shape[1]) and p.intercept_.shape == (4,)
    proba = p.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)
    assert (p.classes_[proba.argmax(1)] == p.predict(X)).all()
    assert LogisticProbe().fit(X, y).inner_cv_ == "stratified"
    assert LogisticProbe(lam=0.1).fit(X, y).inner_cv_ is None
    for est in (LogisticProbe(lam=1e-2), MeanDiffProbe(), LowRankProbe(rank=2)):
        scores = cross_val_score(clone(est), X, y, groups=groups, cv=GroupKFold(n_splits=3))
        assert scores.mean() > 0.6
    with pytest.raises(ReplabError):
        LogisticProbe().fit(X, np.zeros(len(X)))


def test_groups_reach_the_inner_cv_through_metadata_routing():
    """cross_val_score(groups=g) gives groups only to the outer splitter (inner CV
    stratified); with metadata routing and set_fit_request(groups=True) fit gets them."""
    import sklearn
    from sklearn.model_selection import cross_validate

    X, y, groups = blobs(n=240, d=8, K=3, seed=4)
    plain = cross_validate(LogisticProbe(lams=(0.1, 0.01)), X, y, groups=groups,
                           cv=GroupKFold(n_splits=3), return_estimator=True)
    assert {e.inner_cv_ for e in plain["estimator"]} == {"stratified"}
    with sklearn.config_context(enable_metadata_routing=True):
        probe = LogisticProbe(lams=(0.1, 0.01)).set_fit_request(groups=True)
        routed = cross_validate(probe, X, y, cv=GroupKFold(n_splits=3),
                                params={"groups": groups}, return_estimator=True)
    assert {e.inner_cv_ for e in routed["estimator"]} == {"grouped"}
    assert routed["test_score"].mean() > 0.6


def test_meandiff_matches_hand_computation():
    X = np.array([[0, 0], [2, 0], [0, 4], [2, 4], [10, 10]], dtype=np.float32)
    y = np.array(["a", "a", "b", "b", "c"])
    p = MeanDiffProbe().fit(X, y)
    mu = {c: X[y == c].mean(0) for c in "abc"}
    rest = {c: X[y != c].mean(0) for c in "abc"}
    for i, c in enumerate("abc"):
        np.testing.assert_allclose(p.coef_[i], mu[c] - rest[c], rtol=1e-6)
        mid = (mu[c] + rest[c]) / 2
        np.testing.assert_allclose(p.intercept_[i], -(mu[c] - rest[c]) @ mid, rtol=1e-5)
    want = np.array(["abc"[i] for i in (X @ p.coef_.T + p.intercept_).argmax(1)])
    assert (p.predict(X) == want).all()
    d = p.directions()
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1, rtol=1e-6)


def test_macro_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    from replab.probes.metrics import macro_auroc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    proba = np.round(rng.random((200, 3)) + 0.3 * np.eye(3)[y], 1)     # many ties
    want = np.mean([roc_auc_score(y == c, proba[:, c]) for c in range(3)])
    assert macro_auroc(y, proba) == pytest.approx(want, abs=1e-12)


def _leace_by_hand(X, codes, K):
    """LEACE closed form (Belrose et al. 2023, Thm 3.1) in numpy, no shrinkage:
    x' = x - W^+ P W (x - mu), W = Sigma^{-1/2}, P = projector onto colspace(W Sigma_xz)."""
    X = X.astype(np.float64)
    Z = np.eye(K)[codes]
    mu = X.mean(0)
    Xc, Zc = X - mu, Z - Z.mean(0)
    sigma = Xc.T @ Xc / (len(X) - 1)
    sigma_xz = Xc.T @ Zc / (len(X) - 1)
    lam, V = np.linalg.eigh(sigma)
    W = V @ np.diag(lam ** -0.5) @ V.T
    W_pinv = V @ np.diag(lam ** 0.5) @ V.T
    U, s, _ = np.linalg.svd(W @ sigma_xz, full_matrices=False)
    U = U[:, s > 1e-8 * s.max()]                          # rank K - 1 (one-hot columns sum to 1)
    P = U @ U.T
    return X - (Xc @ W.T @ P.T @ W_pinv.T), sigma_xz


def test_leace_matches_a_hand_implementation_and_kills_the_probe():
    from replab.probes.erasure import erase, erased_fold, fit_eraser

    X, y, groups = blobs(n=600, d=16, K=3, sep=2.0, seed=5)
    codes = np.unique(y, return_inverse=True)[1]
    want, sigma_xz = _leace_by_hand(X, codes, 3)
    ours = erase(fit_eraser(X, codes, 3, shrinkage=False), X)
    assert np.abs(X - want).max() > 0.5                    # the erasure does something
    np.testing.assert_allclose(ours, want, atol=2e-3 * np.abs(X).max())
    # the default (shrunk covariance) eraser still removes every linear correlation with z
    shrunk = erase(fit_eraser(X, codes, 3), X).astype(np.float64)
    Zc = np.eye(3)[codes] - np.eye(3)[codes].mean(0)
    cross = (shrunk - shrunk.mean(0)).T @ Zc / (len(X) - 1)
    assert np.abs(cross).max() < 1e-4 * np.abs(sigma_xz).max() + 1e-5
    fold = GroupKFold(n_splits=5).split(X, y, groups)
    accs, majority = [], []
    for tr_idx, te_idx in fold:
        tr, te = np.zeros(len(X), bool), np.zeros(len(X), bool)
        tr[tr_idx], te[te_idx] = True, True
        before = LogisticProbe(lam=1e-2).fit(X[tr], y[tr]).score(X[te], y[te])
        assert before > 0.9
        pred = erased_fold(X, codes, 3, tr, te, lam=1e-2)
        accs.append((pred == codes[te]).mean())
        majority.append((codes[te] == np.bincount(codes[tr]).argmax()).mean())
    assert abs(np.mean(accs) - np.mean(majority)) <= 0.02, (accs, majority)


def test_planted_rank_two_is_found(tmp_path):
    s = write_synthetic_store(tmp_path / "r2", n_rows=600, d=32, n_layers=2, rank=2,
                              signal=3.0, entity_scale=0.5, seed=0)
    run = train_probes(s, "label", layers="1", ranks=(1, 2, 3, 4), controls=False,
                       erase=False, progress=False)
    answer = run.summary["rank"]["layers"][1]
    assert answer["smallest_rank"] == 2, answer
    acc = answer["accuracy_by_rank"]
    assert acc[2] > acc[1] + 0.1
    assert set(answer["clusters"]) == {f"class{i}" for i in range(5)}


def test_folds_never_leak_and_controls_are_per_type():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 3)
    templates = np.tile(["t0", "t1", "t2"], 60)
    codes = np.repeat(rng.integers(0, 4, 60), 3)
    fold = S.grouped_folds(groups, codes, 5)
    for k in range(5):
        assert not set(groups[fold == k]) & set(groups[fold != k])
    train, test = S.heldout_folds(fold, templates)
    for k in range(5):
        assert test[k].any() and train[k].any()
        assert not set(groups[test[k]]) & set(groups[train[k]])
        assert not set(templates[test[k]]) & set(templates[train[k]])
    ctrl = S.control_labels(groups, codes, seed=0)
    for g in np.unique(groups):
        assert len(set(ctrl[groups == g])) == 1              # fixed per type
    per_type = lambda lab: np.bincount(lab[::3], minlength=4)   # noqa: E731
    assert (per_type(ctrl) == per_type(codes)).all()      # same class distribution over types
    assert (ctrl != codes).any()
    # entity folds never show a test entity in training: a control task there is chance
    assert S.type_coverage(groups, fold) == 0.0
    # control folds: grouped by template, every entity recurs between train and test
    cfold, scheme, cov = S.control_folds(groups, templates, codes, 5)
    assert scheme == "template" and cov == 1.0 and cfold.max() == 2
    for k in range(3):
        assert len(set(templates[cfold == k])) == 1
    # no templates: rows of each type dealt over the folds
    cfold, scheme, cov = S.control_folds(groups, None, codes, 5)
    assert scheme == "type-stratified" and cov == 1.0
    assert S.control_folds(np.arange(20), None, np.zeros(20, int), 5) is None   # no type recurs


def test_sweep_records_artifacts_and_controls(store, tmp_path):
    from replab.probes import load_directions

    run = train_probes(store, "label", out=tmp_path / "run", progress=False)
    rec = run.records
    assert set(rec["kind"]) == {"logistic", "meandiff"} and sorted(rec["layer"].unique()) == [0, 1, 2]
    last = rec[(rec["layer"] == 2) & (rec["kind"] == "logistic")].iloc[0]
    first = rec[(rec["layer"] == 0) & (rec["kind"] == "logistic")].iloc[0]
    assert last["balanced_accuracy"] > 0.7 and first["balanced_accuracy"] < 0.45   # signal grows
    assert last["ci_low"] <= last["balanced_accuracy"] <= last["ci_high"]
    assert last["shuffled_accuracy"] < 0.45
    assert last["heldout_balanced_accuracy"] > 0.7
    assert abs(last["erased_accuracy"] - last["majority_accuracy"]) < 0.1
    data = run.summary["data"]
    assert data["control_types"] == "group" and data["control_split"] == "template"
    assert data["control_coverage"] == 1.0
    assert run.best_layer == 2
    out = tmp_path / "run"
    files = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert files <= {".json", ".safetensors", ".parquet", ".csv", ".png", ".svg"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["name"] == "synthetic" and summary["replab_version"]
    # Directions for every layer, both kinds, and the shuffled-label probe of each kind
    for layer in (0, 1, 2):
        for kind in ("logistic", "meandiff"):
            for prefix in ("", "shuffled_"):
                for c in range(5):
                    assert (out / "directions" / f"{prefix}{kind}_L{layer}_class{c}.json").exists()
    d = Direction.load(out / "directions" / "logistic_L2_class0.json")
    assert d.layer == 2 and d.hook == "blocks.2.hook_resid_post" and d.kind == "logistic"
    assert d.label_source == "true" and d.metrics["layer"] == 2
    assert np.linalg.norm(d.vector) == pytest.approx(1, abs=1e-5)
    assert d.model["synthetic"] is True and d.replab_version and d.config["label"] == "label"
    dirs = load_directions(out, "meandiff", layer=1)
    assert sorted(dirs) == [f"class{c}" for c in range(5)] and dirs["class3"].layer == 1
    shuf = load_directions(out, "logistic", shuffled=True)           # best layer
    assert shuf["class0"].label_source == "shuffled" and shuf["class0"].layer == 2
    # the shuffled-label direction is not the real one
    assert abs(float(shuf["class0"].vector @ d.vector)) < 0.9
    with pytest.raises(ReplabError):
        load_directions(out, "logistic", layer=7)
    preds, info = apply_probe(out / "probes" / "logistic.json", store)
    assert len(preds) == store.n_rows and info["layer"] == 2 and info["accuracy"] > 0.7


def test_apply_scores_the_rows_training_kept(store, tmp_path):
    where = "template != 'template0'"
    train_probes(store, "label", layers="2", where=where, controls=False, erase=False,
                 out=tmp_path / "run", progress=False)
    _, info = apply_probe(tmp_path / "run", store)
    kept = int((store.index["template"] != "template0").sum())
    assert info["scored_rows"] == kept < info["scored_rows_all"] == store.n_rows
    assert "where" in info["row_filter"] and info["in_sample"] is True
    assert info["accuracy"] is not None and info["accuracy_all_rows"] is not None


def test_cli_train_json_apply_and_errors(store, tmp_path):
    from typer.testing import CliRunner

    from replab.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["probe", "train", "--store", str(store.path), "--label", "label",
                            "--layers", "1-2", "--split-by", "template", "--no-erase",
                            "--out", str(tmp_path / "run"), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout[r.stdout.index("{"):])
    assert isinstance(data["best_layer"], int)
    keys = {"layer", "kind", "rank", "accuracy", "balanced_accuracy", "heldout_balanced_accuracy",
            "control_accuracy", "selectivity", "ci_low", "ci_high"}
    assert data["records"] and all(keys <= set(x) for x in data["records"])
    r = runner.invoke(app, ["probe", "apply", "--probe", str(tmp_path / "run"), "--store",
                            str(store.path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"] == store.n_rows
    for bad in (["--label", "nope"], ["--label", "label", "--layers", "7"],
                ["--label", "label", "--split-by", "nope"], ["--label", "label", "--kind", "svm"]):
        r = runner.invoke(app, ["probe", "train", "--store", str(store.path), *bad,
                                "--out", str(tmp_path / "x")])
        assert isinstance(r.exception, ReplabError), (bad, r.output)
        assert len(str(r.exception).splitlines()) == 1
    assert "Examples" in runner.invoke(app, ["probe", "train", "--help"]).stdout
    # the real entry point: one error line, exit code 2
    r = subprocess.run([sys.executable, "-m", "replab", "probe", "train", "--store",
                        str(store.path), "--label", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "nope" in r.stderr


def test_tiny_model_store_end_to_end(tiny, tmp_path):
    from replab.harvesting import harvest

    s = harvest(tiny, "sequence_types", hooks="resid_post", layers="all", positions="last",
                out=tmp_path / "seq", progress=False)
    run = train_probes(s, "seq_type", split_by="start", erase=False, out=tmp_path / "run",
                       progress=False)
    assert sorted(run.records["layer"].unique()) == list(range(tiny.cfg.n_layers))
    assert run.summary["data"]["control_types"] is None        # 1 group, 2 tokens: no types
    assert run.records["selectivity"].isna().all()
    assert any("no control task" in note for note in run.summary["data"]["filter"])
    meta = json.loads((tmp_path / "run" / "probes" / "logistic.json").read_text())
    assert meta["model"]["weights_sha256"] == tiny.replab_identity.weights_sha256
    assert meta["position"] == "last" and meta["replab_version"]
    d = Direction.load(next((tmp_path / "run" / "directions").glob("logistic_*.json")))
    assert d.vector.shape == (tiny.cfg.d_model,) and d.position == "last"
    with pytest.raises(ReplabError, match="at least 2 groups"):
        train_probes(s, "seq_type", split_by="entity", progress=False)

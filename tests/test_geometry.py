"""Geometry: PCA vs scikit-learn, cosine matrices by hand, figures and tables, the CLI."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA

from replab.errors import ReplabError
from replab.geometry import cosine_baseline, cosine_layers, cosine_matrix, pca_2d, plot_geometry, project_layers
from replab.store.synthetic import write_synthetic_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("geo") / "s", n_rows=120, d=16,
                                 n_layers=3, n_classes=4, rank=2, signal=4.0, seed=2)


def test_pca_matches_sklearn_up_to_sign():
    x = np.random.default_rng(0).normal(size=(80, 10)) * np.arange(1, 11)
    xy, ratio = pca_2d(x)
    ref = PCA(n_components=2).fit(x)
    want = ref.transform(x)
    for j in range(2):
        assert min(np.abs(xy[:, j] - want[:, j]).max(), np.abs(xy[:, j] + want[:, j]).max()) < 1e-3
    np.testing.assert_allclose(ratio, ref.explained_variance_ratio_, rtol=1e-5)


def test_cosine_matrix_by_hand():
    x = np.array([[1, 0], [3, 0], [0, 2], [0, 2]], dtype=float)
    labels = np.array(["a", "a", "b", "b"])
    m = cosine_matrix(x, labels)
    grand = x.mean(0)
    da, db = x[:2].mean(0) - grand, x[2:].mean(0) - grand
    want = da @ db / np.linalg.norm(da) / np.linalg.norm(db)
    assert m.loc["a", "b"] == pytest.approx(want) and m.loc["a", "a"] == pytest.approx(1)
    assert want == pytest.approx(-1)                 # two classes: always exactly -1 apart
    raw = cosine_matrix(x, labels, center="none")
    assert raw.loc["a", "b"] == pytest.approx(0)     # raw means (2, 0) and (0, 2)


def test_cosine_chance_baseline():
    """Grand-mean centring biases cosines to -1/(K-1): the baseline says so, and unrelated
    random class means land on it."""
    for K in (2, 3, 8):
        base = cosine_baseline(np.full(K, 10))
        off = base[~np.eye(K, dtype=bool)]
        np.testing.assert_allclose(off, -1 / (K - 1))
        np.testing.assert_allclose(np.diag(base), 1)
    rng = np.random.default_rng(0)
    K, d = 6, 4000
    counts = np.array([10, 20, 30, 40, 50, 60])
    means = rng.normal(size=(K, d))
    labels = np.repeat(np.arange(K), counts)
    x = means[labels] + 0.1 * rng.normal(size=(len(labels), d))
    m = cosine_matrix(x, labels.astype(str)).to_numpy()
    base = cosine_baseline(counts)
    off = ~np.eye(K, dtype=bool)
    assert np.abs(m[off] - base[off]).max() < 0.05          # unbalanced weights: still on it
    assert np.abs(m[off] - (-1 / (K - 1))).max() > 0.05     # ... which -1/(K-1) alone misses


def test_projection_table_figure_and_cosines(store, tmp_path):
    res = plot_geometry(store, "label", "pca", out=tmp_path / "g")
    assert res["layers"] == [0, 1, 2] and res["rows"] == store.n_rows
    for key in ("figure", "svg", "table"):
        assert (tmp_path / "g" / res[key].split("/")[-1]).stat().st_size > 1000
    table = pd.read_parquet(res["table"])
    assert {"layer", "row", "x", "y", "label"} <= set(table.columns)
    assert len(table) == 3 * store.n_rows
    # the planted signal separates classes at the last layer, not the first
    def spread(layer):
        t = table[table["layer"] == layer]
        centres = t.groupby("label")[["x", "y"]].mean()
        return np.linalg.norm(centres - centres.mean(), axis=1).mean() / t[["x", "y"]].std().mean()
    assert spread(2) > 2 * spread(0)
    cos = cosine_layers(store, "label", layers="2")
    assert set(cos.columns) == {"layer", "class_a", "class_b", "cosine", "baseline", "excess"}
    diag = cos[cos["class_a"] == cos["class_b"]]["cosine"]
    np.testing.assert_allclose(diag, 1, atol=1e-6)
    off = cos[cos["class_a"] != cos["class_b"]]
    np.testing.assert_allclose(off["excess"], off["cosine"] - off["baseline"])
    assert off["baseline"].between(-1 / 3 - 0.05, -1 / 3 + 0.05).all()     # K = 4, ~balanced
    assert cosine_layers(store, "label", layers="2", center="none")["baseline"].isna().all()
    with pytest.raises(ReplabError):
        cosine_layers(store, "label", layers="2", center="rest")
    with pytest.raises(ReplabError):
        project_layers(store, "nope")
    with pytest.raises(ReplabError):
        project_layers(store, "label", method="tsne")


@pytest.mark.integration   # not a model test, but numba compiles UMAP for 30-90 s on first use
def test_umap_runs(store):
    coords = project_layers(store, "label", "umap", layers="2")
    assert coords[["x", "y"]].notna().all().all() and len(coords) == store.n_rows


def test_plot_cli(store, tmp_path):
    from typer.testing import CliRunner

    from replab.cli import app
    from replab.probes import train_probes

    runner = CliRunner()
    r = runner.invoke(app, ["plot", "pca", "--store", str(store.path), "--color", "label",
                            "--layers", "0,2", "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["layers"] == [0, 2]
    r = runner.invoke(app, ["plot", "cosine", "--store", str(store.path), "--color", "label",
                            "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0 and (tmp_path / "cosine_label.png").exists()
    train_probes(store, "label", out=tmp_path / "run", controls=False, erase=False,
                 progress=False)
    r = runner.invoke(app, ["plot", "probes", "--run", str(tmp_path / "run"), "--json"])
    assert r.exit_code == 0 and (tmp_path / "run" / "figures" / "balanced_accuracy_vs_layer.svg").exists()
    assert "Examples" in runner.invoke(app, ["plot", "umap", "--help"]).stdout
    r = runner.invoke(app, ["plot", "pca", "--store", str(store.path), "--color", "nope"])
    assert isinstance(r.exception, ReplabError)
    r = runner.invoke(app, ["plot", "cosine", "--store", str(store.path), "--color", "label",
                            "--layers", "2", "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["chance_baseline"] == pytest.approx(-1 / 3, abs=0.05)


def test_colour_column_with_a_dot_and_fixed_palette(tmp_path, monkeypatch):
    """A colour column named with a dot keeps matching file names; colours depend on the
    store's full class set, not on the rows a --where keeps."""
    import replab.geometry
    import replab.geometry.plots as P

    s = write_synthetic_store(tmp_path / "s", n_rows=60, d=8, n_layers=1, n_classes=3, seed=0)
    index = s.index.copy()
    index["label.v2"] = index["label"]
    index.to_parquet(s.path / "index.parquet", index=False)
    from replab.store import open_store

    s2 = open_store(s.path)
    res = plot_geometry(s2, "label.v2", "pca", out=tmp_path / "g")
    for key, suffix in (("figure", ".png"), ("svg", ".svg"), ("table", ".parquet")):
        assert res[key] == str(tmp_path / "g" / f"pca_label.v2{suffix}")
        assert (tmp_path / "g" / f"pca_label.v2{suffix}").stat().st_size > 1000
    seen = {}
    real = P.plot_projection

    def spy(coords, color, base, **kw):
        seen["palette"] = P.projection_palette(coords[color], kw.get("classes"))
        return real(coords, color, base, **kw)

    monkeypatch.setattr(P, "plot_projection", spy)
    monkeypatch.setattr(replab.geometry, "plot_projection", spy)     # where plot_geometry looks it up
    plot_geometry(s2, "label", "pca", out=tmp_path / "h", where="label != 'class0'")
    full = P.class_palette(["class0", "class1", "class2"])
    assert set(seen["palette"]) == {"class1", "class2"}
    assert seen["palette"]["class1"] == full["class1"] != P.class_palette(["class1", "class2"])["class1"]

"""Geometry: PCA vs scikit-learn, cosine matrices by hand, figures and tables, the CLI."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA

from replab.errors import ReplabError
from replab.geometry import cosine_layers, cosine_matrix, pca_2d, plot_geometry, project_layers
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
    assert set(cos.columns) == {"layer", "class_a", "class_b", "cosine"}
    diag = cos[cos["class_a"] == cos["class_b"]]["cosine"]
    np.testing.assert_allclose(diag, 1, atol=1e-6)
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

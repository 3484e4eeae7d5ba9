"""Probes and geometry on the real default model (SmolLM2-135M-Instruct): slow, marked."""

import numpy as np
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def seq_store(smol, tmp_path_factory):
    from replab.harvest import harvest
    from replab.prompts import load_prompts

    ps = load_prompts("sequence_types", tokenizer=smol.tokenizer)
    ps = ps.subset(np.arange(0, len(ps), 2))        # every other prompt: all 8 types, half the time
    return harvest(smol, ps, hooks="resid_post", layers="all", positions="last",
                   out=tmp_path_factory.mktemp("seq") / "s", progress=False)


def test_sequence_type_probe_is_selective(seq_store, tmp_path):
    from replab.probes import train_probes

    run = train_probes(seq_store, "seq_type", layers="0,8,16,24,29", split_by="start",
                       erase=False, out=tmp_path / "run", progress=False)
    best = run.records[(run.records["kind"] == "logistic")
                       & (run.records["layer"] == run.best_layer)].iloc[0]
    chance = 1 / best["n_classes"]
    assert best["balanced_accuracy"] > chance + 0.5
    assert best["selectivity"] >= 0.15
    assert (tmp_path / "run" / "figures" / "accuracy_vs_layer.png").exists()


def test_pca_renders_all_30_layers(seq_store, tmp_path):
    from replab.geometry import plot_geometry

    res = plot_geometry(seq_store, "seq_type", "pca", out=tmp_path)
    assert res["layers"] == list(range(30))
    assert (tmp_path / "pca_seq_type.png").stat().st_size > 50_000


def test_umap_runs_on_a_real_layer(seq_store):
    from replab.geometry import project_layers

    coords = project_layers(seq_store, "seq_type", "umap", layers="20")
    assert len(coords) == seq_store.n_rows and np.isfinite(coords[["x", "y"]].to_numpy()).all()

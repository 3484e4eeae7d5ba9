"""Probes and geometry on the real default model (SmolLM2-135M-Instruct): slow, marked."""

import numpy as np
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def seq_store(smol, tmp_path_factory):
    from replab.harvesting import harvest
    from replab.prompts import load_prompts

    ps = load_prompts("sequence_types", tokenizer=smol.tokenizer)
    ps = ps.subset(np.arange(0, len(ps), 2))        # every other prompt: all 8 types, half the time
    return harvest(smol, ps, hooks="resid_post", layers="all", positions="last_item_last",
                   out=tmp_path_factory.mktemp("seq") / "s", progress=False)


def test_sequence_type_probe_and_token_control_task(seq_store, tmp_path):
    """Types = the item token ("3", " three"), which recur across prompts: the expressive
    logistic probe memorises token identity (high control accuracy, low selectivity);
    the mass-mean probe reads the sequence type and stays selective."""
    from replab.probes import train_probes

    run = train_probes(seq_store, "seq_type", layers="0,8,16,24,29", split_by="start",
                       erase=False, out=tmp_path / "run", progress=False)
    data = run.summary["data"]
    assert data["control_types"] == "token_id" and data["control_split"] == "type-stratified"
    rec = run.records[run.records["layer"] == run.best_layer].set_index("kind")
    chance = 1 / rec.loc["logistic", "n_classes"]
    assert rec.loc["logistic", "balanced_accuracy"] > chance + 0.5
    assert rec.loc["meandiff", "selectivity"] >= 0.15
    assert rec.loc["logistic", "control_accuracy"] > rec.loc["meandiff", "control_accuracy"]
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

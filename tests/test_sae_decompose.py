"""Decomposing a direction onto SAE latents (replab.features.sae.decompose) with a planted latent."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sae_testutil import HOOK, LAYER, planted_sae
from sae_testutil import people_store as _people_store


@pytest.fixture(scope="module")
def people_store(tiny, tmp_path_factory):
    return _people_store(tiny, tmp_path_factory.mktemp("people"))


def test_decompose_finds_the_planted_latent(tiny, people_store, tmp_path):
    from replab.features.sae import decompose_direction
    from replab.probes.directions import Direction

    u = planted_sae(tiny, people_store, tmp_path / "sae")
    direction = Direction(vector=u + 0.02 * np.random.default_rng(0).normal(size=64), hook="resid_post",
                          layer=LAYER, position="all", label="superclass", positive_class="artist",
                          classes=["artist", "scientist"], kind="meandiff",
                          model=tiny.replab_identity.to_dict())
    direction.save(tmp_path / "dir")
    res = decompose_direction(tmp_path / "sae", tmp_path / "dir.json", store=people_store, top=5,
                              n_examples=3, model=tiny)
    top = res["top"]
    assert int(top["latent"].iloc[0]) == 7
    assert res["cosine"].sort_values("abs_cosine", ascending=False)["latent"].iloc[0] == 7
    assert top["cosine"].iloc[0] > 0.9 and top["diff"].iloc[0] > 0
    assert set(top.columns) >= {"latent", "rank", "cosine", "mean_pos", "mean_neg", "diff",
                                "contribution", "store_frequency", "top_tokens", "bottom_tokens"}
    ex = res["examples"]
    ex7 = ex[ex["latent"] == 7]
    assert 1 <= len(ex7) <= 3 and (ex7["superclass"] == "artist").mean() >= 0.5
    assert all("«" in t and "»" in t for t in ex7["text"])
    assert (ex7["activation"].diff().dropna() <= 0).all()
    lg = res["logits"]
    assert set(lg["side"]) == {"top", "bottom"} and len(lg) == 5 * 2 * 10
    eff = torch.tensor(u) @ tiny.W_U.detach()
    assert lg[(lg.latent == 7) & (lg.side == "top")]["token_id"].iloc[0] == int(eff.argmax())
    assert res["summary"]["n_pos"] == int((people_store.index["superclass"] == "artist").sum())


def test_decompose_rejects_a_direction_from_another_layer(tiny, people_store, tmp_path):
    from replab.errors import ReplabError
    from replab.features.sae import decompose_direction

    planted_sae(tiny, people_store, tmp_path / "sae")
    np.save(tmp_path / "v.npy", np.ones(63, dtype=np.float32))
    with pytest.raises(ReplabError, match="dimensions"):
        decompose_direction(tmp_path / "sae", tmp_path / "v.npy", model=tiny)
    from replab.probes.directions import Direction

    Direction(vector=np.ones(64), hook="resid_post", layer=1, position="last", label="x",
              positive_class="a", classes=["a", "b"], kind="meandiff", model={}).save(tmp_path / "d1")
    with pytest.raises(ReplabError, match="blocks.1.hook_resid_post"):
        decompose_direction(tmp_path / "sae", tmp_path / "d1.json", model=tiny)


def test_decompose_attribution_drops_control_and_odd_one_out_rows(tiny, tmp_path):
    """The class attribution uses the rows a probe would (no controls, no odd-one-out)."""
    from replab.features.sae import decompose_direction
    from replab.harvesting import harvest

    rows = [("Pablo Picasso is a famous", "artist", "", "famous"),
            ("Claude Monet painted many", "artist", "", "famous"),
            ("Zorblat Quix is a famous", "artist", "invented", "famous"),
            ("Pick the odd one: Monet, Dali, Curie", "artist", "", "odd_one_out"),
            ("Albert Einstein is a famous", "scientist", "", "famous"),
            ("Marie Curie studied chemistry", "scientist", "", "famous")]
    path = tmp_path / "people.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": " x", "superclass": c, "control": k,
                                        "template": t}) + "\n" for p, c, k, t in rows))
    store = harvest(tiny, str(path), hooks="resid_post", layers=str(LAYER), positions="last",
                    out=tmp_path / "store", progress=False)
    planted_sae(tiny, store, tmp_path / "sae")
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=64).astype(np.float32))
    res = decompose_direction(tmp_path / "sae", tmp_path / "v.npy", store=store, label="superclass",
                              positive_class="artist", model=tiny)
    s = res["summary"]
    assert (s["n_pos"], s["n_neg"]) == (2, 2)
    assert any("control" in n for n in s["attribution_filter"])
    assert any("odd_one_out" in n for n in s["attribution_filter"])
    # mean_pos by hand over the two kept artist rows
    from replab.features.sae import load_sae, sae_encode

    sae, _ = load_sae(tmp_path / "sae")
    x = torch.tensor(np.asarray(store.acts(HOOK), dtype=np.float32))
    z = sae_encode(sae, x).double().numpy()
    np.testing.assert_allclose(res["attribution"]["mean_pos"], z[[0, 1]].mean(0), atol=1e-5)
    np.testing.assert_allclose(res["attribution"]["mean_neg"], z[[4, 5]].mean(0), atol=1e-5)


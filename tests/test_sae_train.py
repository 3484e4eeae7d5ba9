"""SAE training (replab.features.sae.train): save/load via sae_lens, determinism, the training
cache, training from a store, every architecture on planted sparse data."""

from __future__ import annotations

import json

import pytest
import torch
from sae_testutil import FAST, HOOK, LAYER
from sae_testutil import tiny_sae as _tiny_sae


@pytest.fixture(scope="module")
def tiny_sae(tiny, tmp_path_factory):
    return _tiny_sae(tiny, tmp_path_factory)


def test_saved_sae_loads_with_sae_lens(tiny, tiny_sae):
    from sae_lens import SAE, TopKSAE

    path, stats = tiny_sae
    assert {"cfg.json", "sae_weights.safetensors", "replab.json"} <= {p.name for p in path.iterdir()}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    sae = SAE.load_from_disk(str(path))
    assert isinstance(sae, TopKSAE) and sae.cfg.d_in == 64 and sae.cfg.d_sae == 128 and sae.cfg.k == 8
    assert sae.cfg.metadata.hook_name == HOOK
    meta = json.loads((path / "replab.json").read_text())
    assert meta["format"] == "replab.sae" and meta["hook_name"] == HOOK and meta["layer"] == LAYER
    assert meta["model"]["weights_sha256"] == tiny.replab_identity.weights_sha256
    assert meta["config"]["arch"] == "topk" and meta["config"]["tokens"] == FAST["tokens"]
    assert meta["stats"]["tokens_trained"] == 150 * 128 and meta["stats"]["corpus_tokens"] == 2048
    assert meta["stats"]["unique_vectors"] == 32 * 63  # 32 windows x (64 - position 0)
    for key in ("seconds", "cpu_seconds", "created", "replab_version", "sae_lens_version"):
        assert key in meta or key in meta["stats"], key
    assert stats["train_fvu_last"] < 0.6


def test_training_is_deterministic_given_a_seed():
    from replab.features.sae import SAETrainConfig, fit_sae

    acts = torch.randn(600, 16, generator=torch.Generator().manual_seed(1)) * 3 + 1
    cfg = SAETrainConfig(d_sae=32, k=4, batch_size=64, tokens=64 * 25, lr_warm_up_steps=2)
    a, _ = fit_sae(acts, cfg, progress=False)
    b, _ = fit_sae(acts, cfg, progress=False)
    c, _ = fit_sae(acts, SAETrainConfig(**{**cfg.to_dict(), "seed": 1}), progress=False)
    for name, p in a.state_dict().items():
        assert torch.equal(p, b.state_dict()[name]), name
    assert not torch.equal(a.W_dec, c.W_dec)


def _sparse_data(n: int = 2000, atoms: int = 48, d: int = 64, active: int = 3, seed: int = 0):
    """``x = z @ D + 2 + noise`` with 3 of 48 unit-norm (×4) atoms active per row."""
    g = torch.Generator().manual_seed(seed)
    dic = torch.nn.functional.normalize(torch.randn(atoms, d, generator=g), dim=1) * 4
    z = torch.zeros(n, atoms)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:active] for _ in range(n)])
    z.scatter_(1, idx, torch.rand(n, active, generator=g) + 0.5)
    return z @ dic + 2 + 0.01 * torch.randn(n, d, generator=g), dic


def test_cache_reuses_only_the_same_training(tiny, tmp_path):
    """force=False reuses an SAE only for the same config (threads aside), model and data."""
    from replab.features.sae import train_sae

    small = dict(layer=LAYER, d_sae=32, k=4, batch_size=64, tokens=64 * 5, corpus_tokens=512, seq_len=64,
                 threads=1, lr_warm_up_steps=1)
    out = tmp_path / "sae"
    _, first = train_sae(tiny, out=out, progress=False, **small)
    assert first["cached"] is False and first["source"]["kind"] == "corpus"
    _, again = train_sae(tiny, out=out, progress=False, **{**small, "threads": 2})
    assert again["cached"] is True and again["cpu_seconds"] == first["cpu_seconds"]
    _, other = train_sae(tiny, out=out, progress=False, **{**small, "k": 8})
    assert other["cached"] is False
    _, forced = train_sae(tiny, out=out, progress=False, force=True, **{**small, "k": 8})
    assert forced["cached"] is False


def test_train_from_a_store(tiny, tmp_path):
    """--store trains on the store's vectors at the hook (all of them, in store order)."""
    from replab.errors import ReplabError
    from replab.features.sae import train_sae
    from replab.harvesting import harvest

    store = harvest(tiny, "next_day", hooks="resid_post", layers=str(LAYER), positions="all",
                    out=tmp_path / "store", progress=False)
    path, stats = train_sae(tiny, out=tmp_path / "sae", progress=False, layer=LAYER, d_sae=32, k=4,
                            batch_size=64, tokens=64 * 5, threads=1, lr_warm_up_steps=1,
                            store=str(store.path))
    assert stats["source"]["kind"] == "store" and stats["unique_vectors"] == store.n_rows
    assert stats["corpus_tokens"] is None
    meta = json.loads((path / "replab.json").read_text())
    assert meta["config"]["store"] == str(store.path)
    with pytest.raises(ReplabError, match="has no blocks.1.hook_resid_post"):
        train_sae(tiny, out=tmp_path / "sae1", progress=False, layer=1, d_sae=32, k=4, batch_size=64,
                  tokens=64 * 5, store=str(store.path))


@pytest.mark.slow
@pytest.mark.parametrize("arch, cls", [("topk", "TopKSAE"), ("batchtopk", "JumpReLUSAE"),
                                       ("relu", "StandardSAE")])
def test_each_architecture_saves_and_reloads(arch, cls, tiny, tmp_path):
    """On planted sparse data each architecture beats PCA of its own L0 by far, finds the
    planted atoms, and the saved inference SAE reads raw activations (scaling folded in)."""
    from sae_lens import SAE

    from replab.features.sae import SAETrainConfig, decoder_rows, fit_sae, save_sae

    acts, dic = _sparse_data()
    cfg = SAETrainConfig(arch=arch, d_sae=96, k=8, batch_size=128, tokens=128 * 400, lr=3e-3,
                         l1_coefficient=0.5, lr_warm_up_steps=5)
    sae, stats = fit_sae(acts, cfg, {"hook_name": HOOK}, progress=False)
    path = save_sae(sae, tmp_path / arch, tiny.replab_identity.to_dict(), HOOK, LAYER,
                    cfg.to_dict(), stats)
    loaded = SAE.load_from_disk(str(path))
    assert type(loaded).__name__ == cls
    x = acts[:256]
    xc = acts - acts.mean(0)
    sv = torch.linalg.svdvals(xc)
    pca8 = (1 - sv[:8].pow(2).sum() / sv.pow(2).sum()).item()       # ~0.57: 8 dims cannot hold 48 atoms
    with torch.no_grad():
        fvu = ((loaded(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
        if arch != "batchtopk":  # BatchTopK is saved as a JumpReLU: a different (per-token) rule
            assert torch.allclose(loaded(x), sae(x), atol=1e-3 * x.abs().max().item())
        l0 = (loaded.encode(x) != 0).float().sum(-1).mean().item()
        rows = torch.nn.functional.normalize(decoder_rows(loaded), dim=1)
        found = (torch.nn.functional.normalize(dic, dim=1) @ rows.T).max(1).values
    assert pca8 > 0.5 and fvu < 0.05, (fvu, pca8)
    assert l0 <= 8.5 if arch == "topk" else l0 < 48
    assert (found > 0.9).float().mean().item() >= 0.9, found


"""SAEs (replab.features.sae): train, save/load via sae_lens, eval metrics, splice, decompose, CLI.

Unit tests use the tiny random model; one lean integration test evaluates the cached
SmolLM2 SAE when it exists.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

LAYER = 2
HOOK = f"blocks.{LAYER}.hook_resid_post"
FAST = dict(layer=LAYER, d_sae=128, k=8, batch_size=128, tokens=128 * 150, corpus_tokens=2048,
            seq_len=64, threads=1, lr_warm_up_steps=10, dead_feature_window=50)


@pytest.fixture(scope="module")
def tiny_sae(tiny, tmp_path_factory):
    """A TopK SAE trained on the tiny model's layer-2 residual (150 steps, ~2k tokens)."""
    from replab.features.sae import train_sae

    out = tmp_path_factory.mktemp("sae") / "topk"
    path, stats = train_sae(tiny, out=out, progress=False, **FAST)
    return path, stats


@pytest.fixture(scope="module")
def windows(tiny):
    from replab.features.sae.acts import corpus_windows

    return corpus_windows(tiny.tokenizer, "builtin-heldout", 32, 32 * 8, seed=0)


# ------------------------------------------------------------------ train / save / load
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
    from replab.harvest import harvest

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


# ------------------------------------------------------------------ eval
def test_eval_metrics_match_a_hand_computation(tiny, tiny_sae, windows):
    from replab.features.sae import evaluate_sae, load_sae

    sae, _ = load_sae(tiny_sae[0])
    m, latents = evaluate_sae(sae, tiny, HOOK, windows, skip_first=1, batch_size=3)
    with torch.no_grad():
        _, cache = tiny.run_with_cache(windows, names_filter=[HOOK])
        x = cache[HOOK][:, 1:].reshape(-1, 64)
        z = sae.encode(x)
        xh = sae.decode(z)
        fvu = ((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()

        def run(replace):
            def hook(act, hook):
                act = act.clone()
                act[:, 1:] = replace(act[:, 1:])
                return act
            return tiny.run_with_hooks(windows, fwd_hooks=[(HOOK, hook)]).log_softmax(-1)

        clean = tiny(windows).log_softmax(-1)
        spliced = run(lambda a: sae.decode(sae.encode(a)))
        zero = run(torch.zeros_like)

        def ce(lp):
            return -lp[:, 1:-1].gather(-1, windows[:, 2:, None]).mean().item()

        kl = (clean.exp() * (clean - spliced)).sum(-1)[:, 1:].mean().item()
    assert m["tokens"] == len(x) and m["predictions"] == windows[:, 2:].numel()
    assert m["l0"] == pytest.approx((z != 0).float().sum(-1).mean().item(), abs=1e-6)
    assert m["l0"] == pytest.approx(8.0)
    assert m["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert m["ce_clean"] == pytest.approx(ce(clean), abs=1e-4)
    assert m["ce_sae"] == pytest.approx(ce(spliced), abs=1e-4)
    assert m["ce_zero"] == pytest.approx(ce(zero), abs=1e-4)
    rec = (ce(zero) - ce(spliced)) / (ce(zero) - ce(clean))
    assert m["ce_loss_recovered"] == pytest.approx(rec, rel=1e-3)
    assert m["kl_sae"] == pytest.approx(kl, abs=1e-4)
    freq = (z != 0).float().mean(0).numpy()
    np.testing.assert_allclose(latents["frequency"], freq, atol=1e-9)
    assert m["dead_latents"] == int((freq == 0).sum()) and m["dense_latents"] == int((freq > 0.1).sum())


def test_eval_agrees_with_sae_lens_run_evals(tiny, tiny_sae, windows):
    """With skip_first=0 every overlapping metric equals sae_lens.evals.run_evals (tol 1e-4):
    the cross-check that ``replab sae eval --sae-lens N`` runs and stores."""
    from replab.features.sae import load_sae
    from replab.features.sae.crosscheck import PAIRS, sae_lens_crosscheck

    sae, _ = load_sae(tiny_sae[0])
    res = sae_lens_crosscheck(sae, tiny, HOOK, windows, batch_size=4)
    assert set(res["metrics"]) == set(PAIRS) and res["tokens"] == windows.numel()
    for key, v in res["metrics"].items():
        assert v["replab"] == pytest.approx(v["sae_lens"], rel=1e-4, abs=1e-5), key
    assert res["density_max_abs_diff"] < 1e-6


# ------------------------------------------------------------------ splice
def test_split_and_hooks_are_exact(tiny, tiny_sae, windows):
    from replab.features.sae import (decoder_rows, load_sae, patch_latents_hook, sae_decode,
                                     sae_encode, sae_splice, sae_split, splice_hook)

    sae, _ = load_sae(tiny_sae[0])
    tokens = windows[:2]
    _, cache = tiny.run_with_cache(tokens, names_filter=[HOOK])
    x = cache[HOOK]
    recon, err = sae_splice(sae, x)
    assert recon.shape == err.shape == x.shape and torch.allclose(recon + err, x, atol=1e-5)
    z = sae_encode(sae, x)
    assert z.shape == (2, 32, 128) and torch.allclose(sae_decode(sae, z), recon, atol=1e-5)
    clean = tiny(tokens)
    box = {}
    kept = tiny.run_with_hooks(tokens, fwd_hooks=[(HOOK, splice_hook(sae, keep_error=True, cache=box))])
    assert torch.allclose(kept, clean, atol=1e-4) and box["latents"].shape == (2, 32, 128)
    assert torch.allclose(tiny.run_with_hooks(
        tokens, fwd_hooks=[(HOOK, patch_latents_hook(sae, z.flip(0), []))]), clean, atol=1e-4)
    # patch latents of example 1 into example 0 at positions 3..: the change is exactly
    # sum_i (z'_i - z_i) d_i at those positions and zero elsewhere
    ids = [int(i) for i in z[1, 3:].abs().sum(0).topk(5).indices]
    out = {}
    src = z.flip(0)[:, 3:]
    tiny.run_with_hooks(tokens, fwd_hooks=[
        (HOOK, patch_latents_hook(sae, src, ids, positions=slice(3, None), cache=out)),
        (HOOK, lambda act, hook: out.__setitem__("act", act.clone()))])
    delta = out["act"] - x
    want = (src[..., ids] - z[:, 3:, ids]) @ decoder_rows(sae)[ids]
    assert torch.allclose(delta[:, 3:], want, atol=1e-4)
    assert delta[:, :3].abs().max() == 0
    assert torch.allclose(sae_split(sae, x).error, err)


# ------------------------------------------------------------------ decompose
@pytest.fixture(scope="module")
def people_store(tiny, tmp_path_factory):
    from replab.harvest import harvest

    rows = [("Pablo Picasso is a famous", "artist"), ("Claude Monet painted many", "artist"),
            ("Frida Kahlo was a painter", "artist"), ("Albert Einstein is a famous", "scientist"),
            ("Marie Curie studied chemistry", "scientist"), ("Isaac Newton wrote about", "scientist")]
    d = tmp_path_factory.mktemp("people")
    path = d / "people.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": " x", "superclass": c}) + "\n"
                            for p, c in rows))
    return harvest(tiny, str(path), hooks="resid_post", layers=str(LAYER), positions="all",
                   out=d / "store", progress=False)


def _planted_sae(tiny, store, path, planted: int = 7):
    """A ReLU SAE whose latent ``planted`` reads and writes the artist-minus-scientist direction."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig

    from replab.features.sae import save_sae

    x = np.asarray(store.acts(HOOK), dtype=np.float32)
    y = store.index["superclass"].to_numpy()
    u = x[y == "artist"].mean(0) - x[y != "artist"].mean(0)
    u = torch.tensor(u / np.linalg.norm(u))
    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=64, d_sae=32, metadata=_meta()))
    with torch.no_grad():
        w = torch.nn.functional.normalize(torch.randn(32, 64), dim=1)
        w[planted] = u
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T * 0.05)
        sae.W_enc[:, planted] = u
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.tensor(x[y != "artist"].mean(0)))
    save_sae(sae, path, tiny.replab_identity.to_dict(), HOOK, LAYER, {"arch": "relu"}, {})
    return u.numpy()


def _meta():
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(hook_name=HOOK, model_name="tiny")


def test_decompose_finds_the_planted_latent(tiny, people_store, tmp_path):
    from replab.features.sae import decompose_direction
    from replab.probes.directions import Direction

    u = _planted_sae(tiny, people_store, tmp_path / "sae")
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

    _planted_sae(tiny, people_store, tmp_path / "sae")
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
    from replab.harvest import harvest

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
    _planted_sae(tiny, store, tmp_path / "sae")
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


# ------------------------------------------------------------------ CLI
def _cli(args):
    import typer
    from typer.testing import CliRunner

    from replab.cli import sae as sae_cli

    root = typer.Typer()
    root.add_typer(sae_cli.app, name="sae")
    res = CliRunner().invoke(root, ["sae", *map(str, args)])
    return res.exit_code, res.stdout, res.stderr


def test_cli_train_eval_decompose(tiny, people_store, tmp_path):
    train_args = ["train", "--model", "tiny", "--layer", LAYER, "--d-sae", 64, "--k", 4,
                  "--tokens", 128 * 40, "--batch-size", 128, "--corpus-tokens", 1024,
                  "--seq-len", 64, "--threads", 1, "--out", tmp_path / "sae", "--json"]
    code, out, err = _cli(train_args)
    assert code == 0, err
    rec = json.loads(out)
    assert rec["tokens_trained"] == 128 * 40 and rec["path"] == str(tmp_path / "sae")
    code, out, err = _cli(["eval", tmp_path / "sae", "--model", "tiny", "--tokens", 256, "--json"])
    assert code == 0, err
    ev = json.loads(out)
    # the CLI's numbers are the library's on the same held-out windows
    from replab.features.sae import evaluate_sae, load_sae
    from replab.features.sae.acts import corpus_windows

    sae, _ = load_sae(tmp_path / "sae")
    w = corpus_windows(tiny.tokenizer, "builtin-heldout", 64, 256, seed=0)
    m, _ = evaluate_sae(sae, tiny, HOOK, w, skip_first=1, batch_size=4)
    for key in ("l0", "fvu", "ce_loss_recovered", "delta_ce", "kl_sae", "dead_latents", "dense_latents"):
        assert ev["metrics"][key] == pytest.approx(m[key], rel=1e-6, abs=1e-9), key
    assert ev["metrics"]["l0"] == pytest.approx(4.0) and ev["config"]["tokens"] == 256
    assert (tmp_path / "sae" / "eval" / "latents.parquet").exists() and ev["cached"] is False
    code, out, err = _cli(["eval", tmp_path / "sae", "--model", "tiny", "--tokens", 256, "--json"])
    assert code == 0 and json.loads(out)["cached"] is True and json.loads(out)["metrics"] == ev["metrics"]
    # a second `sae train` with the same config reuses the SAE; --force retrains
    stamp = (tmp_path / "sae" / "sae_weights.safetensors").stat().st_mtime_ns
    code, out, err = _cli(train_args)
    assert code == 0, err
    assert json.loads(out)["cached"] is True
    assert (tmp_path / "sae" / "sae_weights.safetensors").stat().st_mtime_ns == stamp
    code, out, err = _cli([*train_args, "--force"])
    assert code == 0 and json.loads(out)["cached"] is False
    assert (tmp_path / "sae" / "sae_weights.safetensors").stat().st_mtime_ns != stamp
    _planted_sae(tiny, people_store, tmp_path / "planted")
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=64).astype(np.float32))
    code, out, err = _cli(["decompose", tmp_path / "planted", "--direction", tmp_path / "v.npy",
                           "--store", people_store.path, "--label", "superclass", "--class", "artist",
                           "--top", 4, "--out", tmp_path / "dec", "--json"])
    assert code == 0, err
    summ = json.loads(out)
    assert len(summ["top"]) == 4 and (tmp_path / "dec" / "top_latents.png").exists()
    for name in ("cosine", "attribution", "top_latents", "examples", "logit_effects"):
        assert (tmp_path / "dec" / f"{name}.parquet").exists() and (tmp_path / "dec" / f"{name}.csv").exists()


@pytest.mark.parametrize("args, needle", [
    (["train", "--model", "tiny", "--arch", "gated", "--out", "X"], "unknown SAE architecture"),
    (["train", "--model", "tiny", "--layer", 2, "--out", "STORE"], "is not an SAE directory"),
    (["train", "--model", "tiny", "--layer", 9, "--out", "X"], "out of range"),
    (["train", "--model", "tiny", "--hook", "z", "--out", "X"], "one vector per position"),
    (["eval", "NOPE"], "no such SAE directory"),
    (["decompose", "NOPE", "--direction", "v.npy"], "no such SAE directory"),
])
def test_cli_errors_are_one_line(args, needle, tmp_path):
    args = [str(tmp_path / a) if a in ("X", "NOPE", "v.npy", "STORE") else a for a in args]
    (tmp_path / "STORE").mkdir()
    (tmp_path / "STORE" / "manifest.json").write_text("{}")  # somebody else's directory
    code, out, err = _cli(args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "X").exists() and (tmp_path / "STORE" / "manifest.json").exists()


@pytest.mark.parametrize("cmd", ["train", "eval", "decompose"])
def test_cli_help_has_examples(cmd):
    code, out, _ = _cli([cmd, "--help"])
    assert code == 0 and "Examples" in out and f"replab sae {cmd}" in out


# ------------------------------------------------------------------ integration
@pytest.mark.integration
def test_cached_default_sae_quality(smol):
    """Every cached SmolLM2 residual SAE (``replab sae train --layer L``; the demo trains the
    layer its scan chooses) on 2 held-out windows (254 tokens): < 60 s each.

    Skips only when none is cached; a cached SAE that is broken or worse than the acceptance
    thresholds (with slack for 254 tokens) fails.
    """
    from replab.features.sae import cached_sae_dir, evaluate_sae, load_sae
    from replab.features.sae.acts import corpus_windows

    root = cached_sae_dir(smol.replab_identity.to_dict(), "x").parent
    paths = sorted(p for p in root.glob("blocks.*.hook_resid_post") if (p / "replab.json").exists())
    if not paths:
        pytest.skip(f"no cached SAE under {root}; run `replab sae train --layer 20` (or make sae)")
    w = corpus_windows(smol.tokenizer, "builtin-heldout", 128, 2 * 128, seed=0)
    for path in paths:
        sae, meta = load_sae(path)
        m, _ = evaluate_sae(sae, smol, meta["hook_name"], w, skip_first=1, batch_size=2)
        assert m["fvu"] <= 0.25 and m["ce_loss_recovered"] >= 0.85, (path.name, m)
        assert m["l0"] == pytest.approx(meta["config"]["k"], abs=1e-6) or meta["architecture"] != "topk"

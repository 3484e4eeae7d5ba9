"""Shared pieces of the SAE tests (tests/test_sae_*.py): the tiny model's layer-2 hook, one
TopK SAE trained once per session, a small people store, a planted-latent SAE and the CLI."""

from __future__ import annotations

import json

import numpy as np
import torch

LAYER = 2
HOOK = f"blocks.{LAYER}.hook_resid_post"
FAST = dict(layer=LAYER, d_sae=128, k=8, batch_size=128, tokens=128 * 150, corpus_tokens=2048,
            seq_len=64, threads=1, lr_warm_up_steps=10, dead_feature_window=50)
_TRAINED: dict = {}


def tiny_sae(tiny, tmp_path_factory):
    """``(path, stats)`` of a TopK SAE trained on the tiny model's layer-2 residual (150 steps,
    ~2k tokens); trained once per session and shared by the test modules."""
    if "topk" not in _TRAINED:
        from replab.features.sae import train_sae

        out = tmp_path_factory.mktemp("sae") / "topk"
        _TRAINED["topk"] = train_sae(tiny, out=out, progress=False, **FAST)
    return _TRAINED["topk"]


def people_store(tiny, folder):
    """Six prompts (three artists, three scientists), layer-2 residual at every position."""
    from replab.harvesting import harvest

    rows = [("Pablo Picasso is a famous", "artist"), ("Claude Monet painted many", "artist"),
            ("Frida Kahlo was a painter", "artist"), ("Albert Einstein is a famous", "scientist"),
            ("Marie Curie studied chemistry", "scientist"), ("Isaac Newton wrote about", "scientist")]
    path = folder / "people.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": " x", "superclass": c}) + "\n"
                            for p, c in rows))
    return harvest(tiny, str(path), hooks="resid_post", layers=str(LAYER), positions="all",
                   out=folder / "store", progress=False)


def planted_sae(tiny, store, path, planted: int = 7):
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


def cli(args):
    """``replab sae ARGS`` through typer's runner: ``(exit code, stdout, stderr)``."""
    import typer
    from typer.testing import CliRunner

    from replab.cli import sae as sae_cli

    root = typer.Typer()
    root.add_typer(sae_cli.app, name="sae")
    res = CliRunner().invoke(root, ["sae", *map(str, args)])
    return res.exit_code, res.stdout, res.stderr


"""SAE latent patching (replab sae patch) on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

LAYER = 2
FAST = dict(layer=LAYER, d_sae=128, k=8, batch_size=128, tokens=128 * 100, corpus_tokens=2048,
            seq_len=64, threads=1, lr_warm_up_steps=10, dead_feature_window=50)


@pytest.fixture(scope="module")
def sae_and_task(tiny, tmp_path_factory):
    from replab.features.sae import train_sae
    from replab.features.sae.artifact import load_sae
    from replab.patching import load_task

    path, _ = train_sae(tiny, out=tmp_path_factory.mktemp("sae") / "topk", progress=False, **FAST)
    sae, meta = load_sae(path)
    return sae, meta, load_task("next_day", tiny.tokenizer, limit=4), path


def test_latent_patch_matches_the_sae_patch_hook(tiny, sae_and_task):
    from replab.features.latent_patch import latent_patch
    from replab.features.sae.splice import patch_latents_hook, sae_encode

    sae, meta, task, _ = sae_and_task
    table, s = latent_patch(tiny, sae, meta, task, top=3, positions=[3, 5], n_random=20, n_boot=50)
    t = table.set_index("name")
    # the engine's batched latent patches = plain forwards with the SAE's own patch hook
    # (chosen latents; and every latent, which keeps the corrupt run's error term, so it is
    # the full patch only up to the SAE's reconstruction error)
    hook = meta["hook_name"]
    _, cc = tiny.run_with_cache(task.clean, names_filter=hook)
    src = sae_encode(sae, cc[hook][:, [3, 5]])
    ld = lambda lg: (lg.gather(1, task.answer[:, None]) - lg.gather(1, task.foil[:, None])).mean().item()  # noqa: E731
    with torch.inference_mode():
        clean, corrupt = ld(tiny(task.clean)[:, -1]), ld(tiny(task.corrupt)[:, -1])
        for name, ids in (("chosen", s["latents"]), ("all_latents", list(range(meta["d_sae"])))):
            logits = tiny.run_with_hooks(task.corrupt, fwd_hooks=[(hook, patch_latents_hook(
                sae, src, ids, positions=[3, 5]))])[:, -1]
            want = (ld(logits) - corrupt) / (clean - corrupt)
            assert t.loc[name, "normalized_effect"] == pytest.approx(want, abs=1e-4), name
    assert s["n_random"] == 20 and s["verdict"].split(":")[0] in ("carried", "partly carried", "not carried")
    assert len(s["latents"]) == 3 and np.isfinite(s["percentile"])


def test_sae_patch_cli(tiny, sae_and_task, tmp_path, capsys):
    import json

    from replab_testutil import run_cli

    _, _, _, path = sae_and_task
    code, out, err = run_cli(["sae", "patch", str(path), "--model", "tiny", "--task", "next_day", "--pairs", "4",
                              "--latents", "1,2", "--random", "10", "--out", tmp_path / "lp", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert {"effect", "ci_low", "ci_high", "full_activation_effect", "random_mean", "random_p95",
            "percentile", "verdict", "latents"} <= set(res)
    assert res["latents"] == [1, 2] and (tmp_path / "lp" / "summary.json").exists()
    code, _, err = run_cli(["sae", "patch", str(path), "--model", "tiny", "--task", "next_day",
                            "--latents", "9999", "--out", tmp_path / "bad"], capsys)
    assert code == 2 and "out of range" in err

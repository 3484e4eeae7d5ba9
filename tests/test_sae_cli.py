"""``replab sae train|eval|decompose`` end to end on the tiny model, one-line errors, help."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sae_testutil import HOOK, LAYER, planted_sae
from sae_testutil import cli as _cli
from sae_testutil import people_store as _people_store


@pytest.fixture(scope="module")
def people_store(tiny, tmp_path_factory):
    return _people_store(tiny, tmp_path_factory.mktemp("people"))


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
    planted_sae(tiny, people_store, tmp_path / "planted")
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


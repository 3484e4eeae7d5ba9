"""Tuned-lens training on tiny models: held-out corpus, norm handling, cache keys, curves."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
import torch
from lens_testutil import PROMPT, one_torch_thread  # noqa: F401 (an autouse fixture)
from replab_testutil import run_cli

from replab.errors import ReplabError


@pytest.fixture(scope="module")
def tiny_hf():
    """(path, TL model, HF model) of the tiny random HF Llama (non-trivial norm weights)."""
    from replab.models import load_hf_model, load_model
    from replab.models.tiny_hf import tiny_hf_dir

    path = str(tiny_hf_dir())
    return path, load_model(path, device="cpu"), load_hf_model(path)


def _tiny_gpt2(tokenizer):
    """A random 2-layer HF GPT-2 (LayerNorm with bias), built in memory: no download.

    Norm gains/biases are random and the blocks are scaled up, so the layers really change
    the residual and the final LayerNorm's bias matters."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "ln" in name and name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif name.startswith("transformer.h.") and name.endswith("weight"):
                p.mul_(15)
        model.transformer.wte.weight.mul_(10)
    return model.eval()


# ----------------------------------------------------------------------------- corpus
def test_heldout_corpus_shares_no_sentence_with_training_text():
    from replab.prompts.corpus import read_corpus, shared_sentences

    train, heldout = read_corpus("builtin"), read_corpus("builtin-heldout")
    shared = shared_sentences(heldout, train)
    assert shared == [], f"{len(shared)} held-out sentences occur in train.txt, e.g. {shared[:3]}"
    text = "\n".join(train)
    assert not any(doc in text for doc in heldout)
    # the check itself finds a planted overlap (a training sentence inside a held-out doc)
    planted = "Nothing like this is in the training text. " + train[5].split(". ")[0] + "."
    assert shared_sentences([planted], train) == [train[5].split(". ")[0] + "."]


def test_sentence_splitter_keeps_initials_and_quotes():
    from replab.prompts.corpus import split_sentences

    doc = 'J. K. Rowling wrote it. Anna asked Ben: "Is it open?" Ben said yes. 3 plus 4 equals 7.'
    assert split_sentences(doc) == ["J. K. Rowling wrote it.", 'Anna asked Ben: "Is it open?"',
                                    "Ben said yes.", "3 plus 4 equals 7."]


def test_corpus_hash_follows_content(tmp_path):
    from replab.prompts.corpus import corpus_sha256

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("One.\n\nTwo.\n")
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "Three."}) + "\n")
    h1 = corpus_sha256(tmp_path / "d")
    assert h1 == corpus_sha256(str(tmp_path / "d")) and len(h1) == 64
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "Four."}) + "\n")
    assert corpus_sha256(tmp_path / "d") != h1
    assert corpus_sha256("builtin") != corpus_sha256("builtin-heldout")


# ----------------------------------------------------------------------------- final norms
def _randomised(norm, bias=True):
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
        if bias and getattr(norm, "bias", None) is not None:
            norm.bias.copy_(0.5 * torch.randn_like(norm.bias))
    return norm


def test_probe_norm_measures_layernorm_rmsnorm_and_gemma_gain():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from replab.lenses.norms import probe_norm

    torch.manual_seed(0)
    d = 48
    ln = _randomised(torch.nn.LayerNorm(d))
    rms = _randomised(LlamaRMSNorm(d))
    gemma = GemmaRMSNorm(d)  # y = x / rms(x) * (1 + w)
    with torch.no_grad():
        gemma.weight.copy_(0.3 * torch.randn(d))
    for norm, kind, gain, bias in [(ln, "layer", ln.weight, ln.bias),
                                   (rms, "rms", rms.weight, torch.zeros(d)),
                                   (gemma, "rms", 1 + gemma.weight, torch.zeros(d))]:
        spec = probe_norm(norm, d)
        assert spec is not None and spec.kind == kind, type(norm)
        torch.testing.assert_close(spec.gain, gain.detach(), atol=1e-4, rtol=0)
        torch.testing.assert_close(spec.bias, bias.detach(), atol=1e-4, rtol=0)
        x = 7 * torch.randn(10, d) + 2
        y = norm(x).detach()
        # inverting the norm: its target, normed again, is the norm's output
        torch.testing.assert_close(norm(spec.target(y)).detach(), y, atol=1e-3, rtol=1e-4)
    zero = LlamaRMSNorm(d)
    with torch.no_grad():
        zero.weight[3] = 0.0
    for unsupported in (torch.nn.Identity(), torch.nn.Linear(d, d), zero, None):
        assert probe_norm(unsupported, d) is None


def test_least_squares_is_exact_for_layernorm_with_bias():
    """When the final residual is the layer's own residual (identity blocks), the fitted
    translator must reproduce the model exactly, LayerNorm bias included (assuming an
    RMSNorm, or ignoring the bias, leaves a KL well above 1e-3 here)."""
    from tuned_lens.nn.lenses import TunedLens

    from replab.lenses.least_squares import design, ridge_solve, set_translators
    from replab.lenses.norms import probe_norm
    from replab.models import load_tokenizer

    model = _tiny_gpt2(load_tokenizer("tiny"))
    lens = TunedLens.from_model(model)
    norm, d = lens.unembed.final_norm, model.config.n_embd
    spec = probe_norm(norm, d)
    assert spec.kind == "layer" and spec.bias.abs().max() > 0.1
    gen = torch.Generator().manual_seed(1)
    h = 5 * torch.randn(500, d, generator=gen) + 3 * torch.randn(500, 1, generator=gen)
    final = norm(h).detach()
    x, t = design(h, spec), spec.target(final).double()
    n = len(lens)
    w = ridge_solve((x.T @ x).expand(n, -1, -1).clone(), (x.T @ t).expand(n, -1, -1).clone(), 0.0)
    set_translators(lens, w)
    p_model = lens.unembed.unembedding(final).log_softmax(-1)
    with torch.no_grad():
        for layer in range(n):
            logq = lens(h, idx=layer).log_softmax(-1)
            kl = (p_model.exp() * (p_model - logq)).sum(-1).mean().item()
            assert kl < 1e-3, (layer, kl)
    # the RMSNorm assumption (target = final / gain, RMS-normalised) is measurably wrong here
    old_t = final / spec.gain
    old_t = (old_t / old_t.pow(2).mean(-1, keepdim=True).sqrt()).double()
    set_translators(lens, ridge_solve((x.T @ x).expand(n, -1, -1).clone(),
                                      (x.T @ old_t).expand(n, -1, -1).clone(), 0.0))
    with torch.no_grad():
        logq = lens(h, idx=0).log_softmax(-1)
    assert (p_model.exp() * (p_model - logq)).sum(-1).mean().item() > 1e-2


def test_training_on_a_gpt2_layernorm_model():
    from replab.lenses.train import TrainConfig, train_tuned_lens
    from replab.models import load_tokenizer

    tok = load_tokenizer("tiny")
    _, stats = train_tuned_lens(_tiny_gpt2(tok), tok, TrainConfig(
        fit_tokens=1024, steps=2, batch_positions=8, val_positions=128, lr=1e-4), progress=False)
    assert stats["final_norm"] == "layer" and stats["init"] == "least_squares"
    assert len(stats["val_kl_logit"]) == 2
    for lo, ls in zip(stats["val_kl_logit"], stats["val_kl_least_squares"], strict=True):
        assert ls < 0.5 * lo, (stats["val_kl_logit"], stats["val_kl_least_squares"])


def test_unsupported_final_norm_falls_back_to_identity_with_a_warning(tiny_hf):
    import copy

    from replab.lenses.train import TrainConfig, train_tuned_lens

    _, tl, hf = tiny_hf
    odd = copy.deepcopy(hf)
    odd.model.norm = torch.nn.Identity()  # no final norm: nothing to invert
    with pytest.warns(UserWarning, match="least-squares initialisation"):
        _, stats = train_tuned_lens(odd, tl.tokenizer, TrainConfig(
            fit_tokens=512, steps=1, batch_positions=4, val_positions=64), progress=False)
    assert stats["init"] == "identity" and stats["final_norm"] is None
    assert stats["val_kl_least_squares"] == stats["val_kl_logit"]


# ----------------------------------------------------------------------------- cache
def test_cache_key_skip_force_and_default_slot(tiny_hf, tmp_path, monkeypatch):
    from replab.lenses.cache import cached_lens_dir, read_meta
    from replab.lenses.train import TrainConfig
    from replab.lenses.tuned import default_lens_dir, train_lens, tuned_lens_path

    path, tl, hf = tiny_hf
    identity = tl.replab_identity.to_dict()
    monkeypatch.setenv("REPLAB_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "mine.txt"
    corpus.write_text("\n\n".join(f"Document {i}: the {i}th line of my own text." for i in range(300)))
    cfg = TrainConfig(corpus=str(corpus), fit_tokens=512, steps=1, batch_positions=4,
                      val_positions=64)
    kw = {"identity": identity, "hf_model": hf, "progress": False}
    p1, s1 = train_lens(path, cfg, **kw)
    assert not s1["cached"] and p1 == cached_lens_dir(identity, cfg.to_dict())
    assert p1 != default_lens_dir(identity) and not default_lens_dir(identity).exists()
    created = read_meta(p1)["created"]
    assert read_meta(p1)["config"]["fit_tokens"] == 512 and read_meta(p1)["config_key"] in p1.name
    # the same config again: nothing is trained
    p2, s2 = train_lens(path, cfg, **kw)
    assert p2 == p1 and s2["cached"] and read_meta(p1)["created"] == created
    assert s2["fit_tokens"] == s1["fit_tokens"]
    # another setting, or the same corpus path with other content: another key
    other = cached_lens_dir(identity, TrainConfig(**{**cfg.to_dict(), "steps": 2}).to_dict())
    assert other != p1
    corpus.write_text(corpus.read_text() + "\n\nOne more document.")
    assert cached_lens_dir(identity, cfg.to_dict()) != p1
    # --force retrains in place
    corpus.write_text(corpus.read_text().rsplit("\n\n", 1)[0])
    assert cached_lens_dir(identity, cfg.to_dict()) == p1
    p3, s3 = train_lens(path, cfg, force=True, **kw)
    assert p3 == p1 and not s3["cached"]
    # `lens tuned` / `lens eval` use only the default lens, and say where the others are
    with pytest.raises(ReplabError, match="no default tuned lens") as err:
        tuned_lens_path(path, None, identity)
    assert str(p1) in str(err.value)


def test_out_dir_that_is_not_a_lens_is_refused(tiny_hf, tmp_path):
    from replab.lenses.train import TrainConfig
    from replab.lenses.tuned import train_lens

    path, tl, hf = tiny_hf
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "precious.txt").write_text("keep me")
    cfg = TrainConfig(fit_tokens=256, steps=0, val_positions=32)
    with pytest.raises(ReplabError, match="not a tuned-lens directory"):
        train_lens(path, cfg, tmp_path / "runs", progress=False,
                   identity=tl.replab_identity.to_dict(), hf_model=hf)
    assert (tmp_path / "runs" / "precious.txt").read_text() == "keep me"


def test_cli_train_twice_reuses_the_lens(tmp_path, capsys):
    args = ["lens", "train", "--model", "tiny", "--tokens", 512, "--steps", 1,
            "--batch-positions", 4, "--out", tmp_path / "lens", "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    first = json.loads(out)
    assert first["cached"] is False and first["fit_tokens"] == 512
    code, out, err = run_cli(args[:-1], capsys)
    assert code == 0, err
    assert "already at" in out and "not retraining" in out
    code, out, err = run_cli(args + ["--force"], capsys)
    assert code == 0 and json.loads(out)["cached"] is False


# ----------------------------------------------------------------------------- artifacts
def test_load_lens_leaves_logging_alone(tiny_hf, tmp_path, caplog):
    from tuned_lens.nn.lenses import TunedLens

    from replab.lenses.cache import CONFIG, load_lens, save_lens

    _, tl, hf = tiny_hf
    identity = tl.replab_identity.to_dict()
    lens_dir = save_lens(TunedLens.from_model(hf), tmp_path / "l", identity,
                         {"corpus": "builtin"}, {})
    cfg = json.loads((lens_dir / CONFIG).read_text())
    (lens_dir / CONFIG).write_text(json.dumps({**cfg, "from_a_newer_version": 1}))
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.INFO)
    try:
        with caplog.at_level(logging.INFO):
            load_lens(lens_dir, hf, identity)
        assert root.level == logging.INFO
        assert not [r for r in caplog.records if "config key" in r.getMessage()]
    finally:
        root.setLevel(old)


# ----------------------------------------------------------------------------- tuned curves
def _pair_rows():
    return pd.DataFrame([
        {"prompt": PROMPT, "answer": " Tuesday", "foils": [" Friday"],
         "corrupt_prompt": "Today it is Thursday so tomorrow it is", "corrupt_answer": " Friday"},
        {"prompt": "The capital of France is", "answer": " Paris", "foils": [" Rome"],
         "corrupt_prompt": None, "corrupt_answer": None}])


def test_tuned_logit_diff_curve(tiny_hf):
    """Untrained (identity) tuned lens = the logit lens's curve at its points; a trained
    lens = lens logits of the translated residual, and the model at the final point."""
    from tuned_lens.nn.lenses import TunedLens

    from replab.lenses.decoders import TunedLensDecoder
    from replab.lenses.logit_diff import decoder_logit_diff_curve, logit_diff_curve
    from replab.lenses.train import TrainConfig, train_tuned_lens
    from replab.prompts import answer_ids, token_ids

    _, tl, hf = tiny_hf
    tok, rows = tl.tokenizer, _pair_rows()
    ref = logit_diff_curve(tl, tok, rows)
    ref = ref[~ref["point"].str.endswith("_mid")].reset_index(drop=True)
    got = decoder_logit_diff_curve(TunedLensDecoder(hf, TunedLens.from_model(hf)), tok, rows)
    assert list(got["point"]) == list(ref["point"]) and list(got["which"]) == list(ref["which"])
    assert got["logit_diff"].to_numpy() == pytest.approx(ref["logit_diff"].to_numpy(), abs=1e-4)
    assert set(got["which"]) == {"clean", "corrupt"} and got["prompt_id"].nunique() == 2

    lens, _ = train_tuned_lens(hf, tok, TrainConfig(fit_tokens=512, steps=2, batch_positions=8,
                                                     val_positions=64, lr=1e-2), progress=False)
    curve = decoder_logit_diff_curve(TunedLensDecoder(hf, lens), tok, rows)
    a, f = answer_ids(tok, " Tuesday")[0], answer_ids(tok, " Friday")[0]
    ids = torch.tensor([token_ids(tok, PROMPT)])
    with torch.no_grad():
        out = hf(input_ids=ids, output_hidden_states=True)
        by_hand = [(lens(out.hidden_states[layer][0, -1], idx=layer)[[a, f]]).tolist()
                   for layer in range(len(lens))] + [out.logits[0, -1, [a, f]].tolist()]
    clean = curve[(curve["which"] == "clean") & (curve["prompt_id"] == 0)]
    assert clean["logit_diff"].to_numpy() == pytest.approx([x - y for x, y in by_hand], abs=1e-4)
    # the translators changed the curve (else the comparison above proves little)
    assert abs(clean["logit_diff"].iloc[0] - ref[(ref["which"] == "clean")
                                                 & (ref["prompt_id"] == 0)]["logit_diff"].iloc[0]) > 1e-3


def test_cli_tuned_dataset_writes_logit_diff(tiny_hf, tmp_path, capsys):
    from tuned_lens.nn.lenses import TunedLens

    from replab.lenses.cache import save_lens

    _, tl, hf = tiny_hf
    lens_dir = save_lens(TunedLens.from_model(hf), tmp_path / "lens", tl.replab_identity.to_dict(),
                         {"corpus": "builtin"}, {})
    code, out, err = run_cli(["lens", "tuned", "--model", "tiny", "--dataset", "next_day",
                              "--limit", 3, "--lens", lens_dir, "--out", tmp_path / "r", "--json"],
                             capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert (tmp_path / "r" / "logit_diff.png").exists() and "logit_diff_final_mean" in summary
    curve = pd.read_csv(tmp_path / "r" / "logit_diff.csv")
    assert set(curve["which"]) == {"clean", "corrupt"}
    assert curve["depth"].nunique() == tl.cfg.n_layers + 1  # resid_pre points + final, no mid


def test_cli_tuned_mid_is_a_one_line_error(capsys):
    code, _, err = run_cli(["lens", "tuned", "--model", "tiny", "--prompt", "x", "--mid"], capsys)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1
    assert "no tuned-lens equivalent" in err and "lens logit --mid" in err


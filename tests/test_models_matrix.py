"""The architecture matrix: every supported architecture, as a tiny random model saved with
``save_pretrained``, loaded with ``replab.load_model(dir)`` and checked against independent
implementations (Hugging Face, TransformerLens's patching functions, tuned-lens's LogitLens):

* logits within 1e-4 of Hugging Face, and the load-time parity check recorded;
* a harvest equal to HF ``hidden_states`` (minus their mean over d_model for LayerNorm
  models, where replab centres the writing weights);
* patching: the sweep's sanity checks (full patch = 1, empty = 0, identity) pass, and the
  engine's residual, MLP-output and head-output sweeps equal TransformerLens's ``patching``
  functions (this is where GQA, MQA, parallel attention + MLP, learned positions, sliding
  windows and Gemma's norms meet the batched / cached-prefix engine);
* DLA components sum to the logit difference of the *HF* model's own forward;
* the logit lens equals tuned-lens's ``LogitLens`` on the HF hidden states;
* a probe sweep and a 2-step SAE training run.

Models are built once per session (about 0.3 s each) into a temporary directory, and converted
into a temporary ``REPLAB_CACHE`` so nothing touches the shared cache.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from replab.models.zoo import TINY_LAYERNORM as LAYERNORM
from replab.models.zoo import TINY_SUPPORTED as SUPPORTED
from replab.models.zoo import TINY_UNSUPPORTED as UNSUPPORTED
from replab.models.zoo import build_tiny as build

ARCH_NAMES = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
              "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "phi3": "Phi3ForCausalLM",
              "phi": "PhiForCausalLM", "olmo3": "Olmo3ForCausalLM", "falcon": "FalconForCausalLM",
              "gpt_bigcode": "GPTBigCodeForCausalLM"}
PROMPTS = ["Today it is Monday so tomorrow it is", "One, two, three, four,",
           "The capital of France is Paris and the capital of Italy is", "Hi"]
_LOADED: dict = {}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private REPLAB_CACHE for the module (the tokenizer is read from the shared one first)."""
    from replab.models import load_tokenizer

    load_tokenizer(None)
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("replab-cache")
        mp.setenv("REPLAB_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("zoo")

    def get(arch):
        folder = root / arch
        if not (folder / "config.json").exists():
            build(arch, folder)
        return folder
    return get


@pytest.fixture(scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)      # tiny models: threads only wait for each other
    yield
    torch.set_num_threads(old)


def pair(zoo, arch):
    """``(replab model, HF model)`` of ``arch``, loaded once per module."""
    if arch not in _LOADED:
        from transformers import AutoModelForCausalLM

        from replab.models import load_model

        folder = zoo(arch)
        _LOADED[arch] = (load_model(str(folder), device="cpu"),
                         AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval())
    return _LOADED[arch]


def _ids(tok, text):
    from replab.prompts import token_ids

    return torch.tensor([token_ids(tok, text)])


def _task(model):
    from replab.patching import load_task

    return load_task("next_day", model.tokenizer, limit=3)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_logits_match_hf_and_parity_is_recorded(zoo, arch, one_thread):
    tl, hf = pair(zoo, arch)
    ident = tl.replab_identity
    assert ident.architecture == ARCH_NAMES[arch]
    assert ident.parity["max_abs_logit_diff"] <= 1e-4 and ident.parity["dtype"] == "float32"
    assert len(ident.config_sha256) == 64
    scale = 0.0
    with torch.inference_mode():
        for text in PROMPTS:
            ids = _ids(tl.tokenizer, text)
            ref = hf(input_ids=ids).logits
            np.testing.assert_allclose(tl(ids).numpy(), ref.numpy(), atol=1e-4, rtol=0)
            scale = max(scale, float(ref.std()))
    assert scale > 1e-2          # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("arch", SUPPORTED)
def test_harvest_equals_hf_hidden_states(zoo, arch, tmp_path, one_thread):
    from replab.harvesting import harvest

    tl, hf = pair(zoo, arch)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    store = harvest(tl, str(data), hooks=["resid_pre", "resid_post"], layers="all", positions="all",
                    out=tmp_path / "store", progress=False)
    index = store.index
    centred = tl.cfg.normalization_type in ("LN", "LNPre") and tl.replab_identity.processing.get(
        "center_writing_weights")
    assert centred == (arch in LAYERNORM)
    L = tl.cfg.n_layers
    for i, text in enumerate(PROMPTS):
        rows = index.index[index["example_id"] == index["example_id"].unique()[i]].to_numpy()
        with torch.inference_mode():
            hs = hf(input_ids=_ids(tl.tokenizer, text), output_hidden_states=True).hidden_states
        # HF hidden_states[l] enters block l; hidden_states[L] is after the final norm (skipped)
        pairs = [(f"blocks.{layer}.hook_resid_pre", hs[layer]) for layer in range(L)]
        pairs += [(f"blocks.{layer}.hook_resid_post", hs[layer + 1]) for layer in range(L - 1)]
        for hook, ref in pairs:
            ref = ref[0].numpy()
            if centred:
                ref = ref - ref.mean(-1, keepdims=True)
            got = np.asarray(store.acts(hook))[rows]
            assert got.shape == ref.shape, hook
            np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0,
                                       err_msg=f"{arch} {hook} prompt {i}")


@pytest.mark.parametrize("arch", SUPPORTED)
def test_patching_checks_and_transformer_lens_agreement(zoo, arch, one_thread):
    from transformer_lens import patching

    from replab.patching import sweep

    tl, _ = pair(zoo, arch)
    task = _task(tl)

    def metric(logits):
        last = logits[:, -1]
        return (last.gather(1, task.answer[:, None])[:, 0] - last.gather(1, task.foil[:, None])[:, 0]).mean()

    _, clean_cache = tl.run_with_cache(task.clean)
    for fn, site, by, axes in [
        ("get_act_patch_resid_pre", "resid_pre", "layer,position", ("layer", "position")),
        ("get_act_patch_mlp_out", "mlp_out", "layer,position", ("layer", "position")),
        ("get_act_patch_attn_head_out_all_pos", "z", "layer,head", ("layer", "head")),
    ]:
        res = sweep(tl, task, site=site, by=by, n_boot=10)
        checks = res.summary["checks"]
        assert checks["engine_full"]["ok"] and abs(checks["engine_full"]["value"] - 1) <= 1e-4, (arch, checks)
        assert checks["engine_empty"]["ok"] and abs(checks["engine_empty"]["value"]) <= 1e-4, (arch, checks)
        ref = getattr(patching, fn)(tl, task.corrupt, clean_cache, metric).flatten().numpy()
        mine = res.table.sort_values(list(axes))["metric_after"].to_numpy()
        assert float(ref.max() - ref.min()) > 1e-3, (arch, site)    # the grid varies
        np.testing.assert_allclose(mine, ref, atol=1e-4, err_msg=f"{arch} {site}")


@pytest.mark.parametrize("arch", SUPPORTED)
def test_dla_sums_to_hf_logit_difference(zoo, arch, one_thread):
    from replab.patching.logit_attribution import dla

    tl, hf = pair(zoo, arch)
    task = _task(tl)
    tables = dla(tl, task)
    with torch.inference_mode():
        logits = hf(input_ids=task.clean).logits[:, -1]
    if getattr(hf.config, "final_logit_softcapping", None):        # DLA splits the pre-cap logits
        cap = hf.config.final_logit_softcapping
        logits = cap * torch.atanh(logits / cap)
    hf_diff = (logits.gather(1, task.answer[:, None]) - logits.gather(1, task.foil[:, None]))[:, 0]
    got = tables["check"]["sum_of_components"].to_numpy()
    assert float(hf_diff.abs().max()) > 1e-3
    np.testing.assert_allclose(got, hf_diff.numpy(), atol=1e-4, err_msg=arch)
    heads = tables["heads"].groupby("layer")["logit_diff"].sum()
    assert len(heads) == tl.cfg.n_layers and heads.abs().max() > 0


def _tuned_lens_logit_lens(hf):
    """tuned-lens's ``LogitLens`` of ``hf``. tuned-lens 0.2's final-norm lookup knows only the
    GPT-2/NeoX/Llama/OPT/Bloom families; for the others we hand its ``Unembed`` the model's own
    final norm and output embedding (tuned-lens's code still does the decoding)."""
    from tuned_lens.nn.lenses import LogitLens
    from tuned_lens.nn.unembed import Unembed

    try:
        return LogitLens.from_model(hf)
    except NotImplementedError:
        base = hf.base_model
        norm = getattr(base, "norm", None) or base.final_layernorm
        unembed = Unembed.__new__(Unembed)
        torch.nn.Module.__init__(unembed)
        unembed.final_norm, unembed.unembedding = norm, hf.get_output_embeddings()
        return LogitLens(unembed)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_logit_lens_equals_tuned_lens(zoo, arch, one_thread):
    from replab.lenses.decoders import LogitLens

    tl, hf = pair(zoo, arch)
    ids = _ids(tl.tokenizer, PROMPTS[2])
    ours = LogitLens(tl).logits(ids).log_softmax(-1)
    theirs = _tuned_lens_logit_lens(hf)
    cap = getattr(hf.config, "final_logit_softcapping", None)
    with torch.inference_mode():
        hs = hf(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in range(tl.cfg.n_layers):
            ref = theirs(hs[layer], idx=layer)
            if cap:                      # tuned-lens 0.2 does not apply Gemma-2's soft cap
                ref = cap * torch.tanh(ref / cap)
            torch.testing.assert_close(ours[layer], ref.log_softmax(-1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_probe_and_sae_train_run(zoo, arch, tmp_path, one_thread):
    from sae_lens import SAE

    from replab.features.sae import train_sae
    from replab.harvesting import harvest
    from replab.probes import train_probes

    tl, _ = pair(zoo, arch)
    store = harvest(tl, "sequence_types", hooks="resid_post", layers="all", positions="last",
                    out=tmp_path / "seq", progress=False)
    run = train_probes(store, "seq_type", split_by="start", erase=False, controls=False,
                       kinds=("meandiff",), n_boot=20, progress=False)
    acc = run.records["balanced_accuracy"].to_numpy()
    assert len(acc) == tl.cfg.n_layers and np.isfinite(acc).all()
    assert acc.max() > 1 / store.index["seq_type"].nunique() + 0.1   # better than chance
    path, stats = train_sae(tl, out=tmp_path / "sae", layer=tl.cfg.n_layers - 1, d_sae=32, k=4,
                            batch_size=64, tokens=128, corpus_tokens=256, seq_len=64, threads=1,
                            lr_warm_up_steps=1, progress=False)
    assert stats["tokens_trained"] == 128 and np.isfinite(stats["train_fvu_last"])
    assert SAE.load_from_disk(str(path)).cfg.d_in == tl.cfg.d_model


@pytest.mark.parametrize("arch", UNSUPPORTED)
def test_unsupported_architecture_is_one_line_and_leaves_no_cache(zoo, cache, arch, capsys):
    from replab_testutil import run_cli

    from replab.errors import ReplabError
    from replab.models import load_model

    folder = zoo(arch)
    before = sorted(p.name for p in (cache / "models").iterdir()) if (cache / "models").exists() else []
    with pytest.raises(ReplabError) as err:
        load_model(str(folder), device="cpu")
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and ARCH_NAMES[arch] in msg
    assert "GemmaForCausalLM" in msg and "LlamaForCausalLM" in msg      # lists what is supported
    after = sorted(p.name for p in (cache / "models").iterdir()) if (cache / "models").exists() else []
    assert after == before
    code, out, errtext = run_cli(["models", "info", "--model", str(folder)], capsys)
    assert code == 2 and errtext.count("error:") == 1 and "Traceback" not in errtext
    assert ARCH_NAMES[arch] in errtext


@pytest.mark.parametrize("arch", SUPPORTED)
def test_bfloat16_within_documented_tolerances(zoo, arch, tmp_path, one_thread):
    """bfloat16 against float32 (docs/models.md, "Precision"): the parity check passes, the
    harvest's relative error is below 5%, the sweep's sanity checks pass and its normalised
    effects stay within 0.1 of float32's wherever clean and corrupt differ by more than 0.5,
    and DLA's sum check passes."""
    from replab.harvesting import harvest
    from replab.models import load_model
    from replab.patching import sweep
    from replab.patching.logit_attribution import dla

    tl32, _ = pair(zoo, arch)
    tl16 = load_model(str(zoo(arch)), device="cpu", dtype="bfloat16")
    par = tl16.replab_identity.parity
    assert par["dtype"] == "bfloat16" and par["max_abs_logit_diff"] <= par["tolerance"]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    stores = [harvest(m, str(data), hooks="resid_post", layers="all", positions="all",
                      out=tmp_path / f"s{i}", progress=False) for i, m in enumerate((tl32, tl16))]
    for hook in stores[0].hooks:
        a, b = (np.asarray(s.acts(hook)) for s in stores)
        assert np.linalg.norm(b - a) / np.linalg.norm(a) < 0.05, hook
    task = _task(tl32)
    r32, r16 = (sweep(m, task, site="resid_pre", by="layer,position", n_boot=10) for m in (tl32, tl16))
    assert all(c["ok"] for c in r16.summary["checks"].values())
    gap = abs(r32.summary["clean_metric"] - r32.summary["corrupt_metric"])
    e32 = r32.table.sort_values(["layer", "position"])["normalized_effect"].to_numpy()
    e16 = r16.table.sort_values(["layer", "position"])["normalized_effect"].to_numpy()
    if gap > 0.5:                  # normalised effects divide by the clean - corrupt gap
        assert np.abs(e16 - e32).max() < 0.1, gap
    d16 = dla(tl16, task)["check"]
    assert (d16["abs_error"] <= 0.02 * np.maximum(1, d16["component_mass"])).all()

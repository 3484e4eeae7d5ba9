"""Lens unit tests on tiny models (fast): decoders, tables, training, artifacts, corpus, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from lens_testutil import PROMPT, one_torch_thread  # noqa: F401 (an autouse fixture)
from replab_testutil import run_cli

from replab.errors import ReplabError
from replab.lenses.decoders import LogitLens, TunedLensDecoder, lens_points


def _ids(model, text=PROMPT):
    from replab.prompts import token_ids

    return torch.tensor([token_ids(model.tokenizer, text)])


@pytest.fixture(scope="module")
def tiny_pair():
    """(TL model, HF model) of the same tiny random Llama (non-trivial norm weights)."""
    from replab.models import load_hf_model, load_model
    from replab.models.tiny_hf import tiny_hf_dir

    path = str(tiny_hf_dir())
    return load_model(path, device="cpu"), load_hf_model(path)


@pytest.fixture(scope="module")
def tiny_lens(tiny_pair, tmp_path_factory):
    """A tiny tuned lens trained briefly on the builtin corpus, and its saved directory."""
    from replab.lenses.cache import save_lens
    from replab.lenses.train import TrainConfig, train_tuned_lens

    tl, hf = tiny_pair
    cfg = TrainConfig(fit_tokens=1024, steps=4, batch_positions=16, val_positions=128, lr=1e-3)
    lens, stats = train_tuned_lens(hf, tl.tokenizer, cfg, progress=False)
    path = save_lens(lens, tmp_path_factory.mktemp("lens") / "tiny-lens",
                     tl.replab_identity.to_dict(), cfg.to_dict(), stats)
    return lens, stats, path


def test_points_convention():
    pts = lens_points(3, mid=True)
    assert [p.label for p in pts] == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid", "final"]
    assert [p.depth for p in pts] == sorted(p.depth for p in pts)
    assert pts[-1].hook == "blocks.2.hook_resid_post" and pts[0].hook == "blocks.0.hook_resid_pre"
    assert len(lens_points(3)) == 4


def test_final_point_equals_model_logits(tiny):
    tokens = _ids(tiny)
    lens_logits = LogitLens(tiny, mid=True).logits(tokens)
    assert lens_logits.shape == (2 * tiny.cfg.n_layers + 1, 1, tokens.shape[1], tiny.cfg.d_vocab)
    torch.testing.assert_close(lens_logits[-1], tiny(tokens).float(), atol=1e-4, rtol=0)


def test_logit_lens_matches_transformer_lens_accumulated_resid(tiny):
    tokens = _ids(tiny)
    _, cache = tiny.run_with_cache(tokens)
    stack = cache.accumulated_resid(incl_mid=True, apply_ln=True)
    ref = tiny.unembed(stack.flatten(0, 1)).view(stack.shape[0], 1, tokens.shape[1], -1)
    got = LogitLens(tiny, mid=True).logits(tokens)
    torch.testing.assert_close(got.log_softmax(-1), ref.log_softmax(-1), atol=1e-4, rtol=0)


def test_untrained_tuned_lens_equals_logit_lens(tiny_pair):
    from tuned_lens.nn.lenses import LogitLens as TLLogitLens
    from tuned_lens.nn.lenses import TunedLens

    tl, hf = tiny_pair
    tokens = _ids(tl)
    ours = LogitLens(tl).logits(tokens).log_softmax(-1)
    untrained = TunedLensDecoder(hf, TunedLens.from_model(hf)).logits(tokens).log_softmax(-1)
    torch.testing.assert_close(untrained, ours, atol=1e-4, rtol=0)
    hs = hf(input_ids=tokens, output_hidden_states=True).hidden_states
    theirs = TLLogitLens.from_model(hf)
    for layer in range(tl.cfg.n_layers):
        torch.testing.assert_close(theirs(hs[layer], idx=layer).log_softmax(-1), ours[layer],
                                   atol=1e-4, rtol=0)


def test_trained_tiny_lens_beats_logit_lens_on_validation(tiny_lens):
    _, stats, _ = tiny_lens
    logit, tuned = stats["val_kl_logit"], stats["val_kl_tuned"]
    assert len(logit) == len(tuned) == 2
    assert all(t < lo for t, lo in zip(tuned, logit, strict=True)), (logit, tuned)
    assert stats["fit_tokens"] == 1024 and len(stats["kl_losses"]) == 4


def test_least_squares_recovers_an_affine_map(tiny_pair):
    """When the final residual is an exact affine image of layer l, the fit recovers it."""
    from tuned_lens.nn.lenses import TunedLens

    from replab.lenses.train import solve_translators

    _, hf = tiny_pair
    d = hf.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, d, generator=gen)
    a_true = torch.eye(d) + 0.1 * torch.randn(d, d, generator=gen)
    y = x @ a_true.T  # homogeneous, so scale-invariance of the norm does not matter
    r = x.pow(2).mean(-1, keepdim=True).sqrt()
    xs = torch.cat([x / r, 1 / r], -1).double()
    ys = (y / r).double()  # the target, scaled per token like the inputs: exactly representable
    lens = TunedLens.from_model(hf)
    n = len(lens)
    solve_translators(lens, (xs.T @ xs).expand(n, -1, -1).clone(), (xs.T @ ys).expand(n, -1, -1).clone(),
                      ridge=0.0)
    got = x + lens[0](x)
    torch.testing.assert_close(got, y, atol=2e-3, rtol=1e-3)


def test_save_load_roundtrip_and_tuned_lens_loader(tiny_pair, tiny_lens, tmp_path):
    from tuned_lens.nn.lenses import TunedLens

    from replab.lenses.cache import export_tuned_lens, load_lens, read_meta

    tl, hf = tiny_pair
    lens, _, path = tiny_lens
    # the saved lens holds no pickle; the export adds tuned-lens's params.pt
    assert {p.name for p in path.iterdir()} == {"config.json", "translators.safetensors", "replab.json"}
    meta = read_meta(path)
    assert meta["model"] == tl.replab_identity.to_dict()
    assert meta["config"]["fit_tokens"] == 1024 and meta["replab_version"]
    exported = export_tuned_lens(path, tmp_path / "exported")
    assert {p.name for p in exported.iterdir()} == {"config.json", "params.pt", "translators.safetensors",
                                                    "replab.json"}
    assert read_meta(exported)["exported_from"] == str(path.resolve())
    assert read_meta(exported)["model"] == meta["model"]
    theirs = TunedLens.from_model_and_pretrained(hf, lens_resource_id=str(exported))
    ours = load_lens(path, hf, tl.replab_identity.to_dict())
    h = torch.randn(2, 3, hf.config.hidden_size)
    for layer in range(len(lens)):
        torch.testing.assert_close(theirs(h, idx=layer), lens(h, idx=layer))
        torch.testing.assert_close(ours(h, idx=layer), lens(h, idx=layer))
    with pytest.raises(ReplabError, match="trained for model"):
        load_lens(path, hf, {**tl.replab_identity.to_dict(), "weights_sha256": "0" * 64})


def test_lens_table_and_first_top1(tiny):
    from replab.lenses.table import first_top1, lens_table

    df = lens_table(LogitLens(tiny), tiny.tokenizer, [PROMPT, "One, two,"], [" Tuesday", " three"], k=3)
    n_pts = tiny.cfg.n_layers + 1
    n_tok = _ids(tiny).shape[1] + _ids(tiny, "One, two,").shape[1]
    assert len(df) == n_pts * n_tok
    assert (df["top_probs"].map(len) == 3).all()
    assert ((df["target_rank"] >= 0) & (df["target_prob"].between(0, 1))).all()
    assert (df["kl_to_final"] >= 0).all() and (df[df["point"] == "final"]["kl_to_final"] < 1e-5).all()
    # top-1 probability is the max of the distribution, so it bounds the target's
    assert (df["top1_prob"] + 1e-6 >= df["target_prob"]).all()
    assert ((df["target_rank"] == 0) == (df["top1"] == df["target"])).all()
    ft = first_top1(df)
    assert list(ft["prompt_id"]) == [0, 1]


def _reference_rows(model, tokenizer, prompts, targets, k):
    """Hand computation, one prompt and one cell at a time: accumulated resid -> unembed."""
    from replab.lenses.table import target_id
    from replab.prompts import token_ids

    rows = []
    for j, (prompt, tgt) in enumerate(zip(prompts, targets, strict=True)):
        ids = token_ids(tokenizer, prompt)
        _, cache = model.run_with_cache(torch.tensor([ids]))
        stack = cache.accumulated_resid(apply_ln=True)[:, 0]        # [n_points, pos, d]
        logits = model.unembed(stack)                                 # [n_points, pos, vocab]
        t = target_id(tokenizer, tgt)
        for layer in range(stack.shape[0]):
            for pos in range(len(ids)):
                logp = logits[layer, pos].log_softmax(-1)
                final = logits[-1, pos].log_softmax(-1)
                order = logp.argsort(descending=True)
                rows.append({
                    "prompt_id": j, "layer": layer, "position": pos,
                    "token": tokenizer.decode([ids[pos]]),
                    "top_tokens": [tokenizer.decode([int(i)]) for i in order[:k]],
                    "top_probs": logp[order[:k]].exp().tolist(),
                    "target_prob": math.nan if t is None else logp[t].exp().item(),
                    "target_rank": None if t is None else int((logits[layer, pos] > logits[layer, pos, t]).sum()),
                    "entropy": -(logp.exp() * logp).sum().item(),
                    "kl_to_final": (final.exp() * (final - logp)).sum().clamp_min(0).item(),
                })
    return pd.DataFrame(rows)


def test_vectorised_table_equals_per_cell_hand_computation(tiny):
    """Batched by length (several batches: max_rows=8), one prompt without target."""
    from replab.lenses.table import lens_table

    # shared prefixes, a prompt that is a prefix of another (never run), one without target
    prompts = [PROMPT, "One, two,", "Today it is Friday so tomorrow it is", "The capital of France is",
               "Today it is"]
    targets = [" Tuesday", " three", " Saturday", None, " Monday"]
    got = lens_table(LogitLens(tiny), tiny.tokenizer, prompts, targets, k=3, max_rows=8)
    ref = _reference_rows(tiny, tiny.tokenizer, prompts, targets, k=3)
    assert len(got) == len(ref)
    for col in ("prompt_id", "layer", "position", "token"):
        assert got[col].tolist() == ref[col].tolist(), col
    for col in ("target_prob", "entropy", "kl_to_final"):
        assert got[col].to_numpy(float) == pytest.approx(ref[col].to_numpy(float), abs=1e-4, nan_ok=True)
    assert got["target_rank"].isna().tolist() == ref["target_rank"].isna().tolist()
    has = ref["target_rank"].notna()
    g_rank = got["target_rank"][has].to_numpy(int)
    r_rank = ref["target_rank"][has].to_numpy(int)
    # a random tiny model has near-ties in its logits: ranks agree up to float noise
    assert (g_rank == r_rank).mean() > 0.98 and abs(g_rank - r_rank).max() <= 2
    assert ((g_rank == 0) == (r_rank == 0)).all()
    probs = [p for ps in got["top_probs"] for p in ps]
    assert probs == pytest.approx([p for ps in ref["top_probs"] for p in ps], abs=1e-5)
    # tokens may swap only where two top probabilities tie
    same = got["top_tokens"].map(tuple) == ref["top_tokens"].map(tuple)
    assert same.mean() > 0.99
    assert (got["top1"] == got["top_tokens"].str[0]).all()
    assert got.loc[got["prompt_id"] == 3, "target"].isna().all()


def test_lens_arrays_prefix_sharing_and_grouping(tiny):
    """Prefix dedup and prompt grouping change nothing; the prefix index is right."""
    from replab.lenses.cells import length_batches, lens_arrays, prefix_index

    ids = [[5, 6, 7], [5, 6, 8, 9], [5, 6], [10], [5, 6, 7]]
    cell_u, first = prefix_index(ids)
    assert [u.tolist() for u in cell_u] == [[0, 1, 2], [0, 1, 3, 4], [0, 1], [5], [0, 1, 2]]
    assert first == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 3), (3, 0)]
    assert length_batches([3, 4, 2, 1, 3], max_rows=3) == [[3], [2], [0], [4], [1]]
    assert length_batches([3, 3, 3], max_rows=None, max_batch=2) == [[0, 1], [2]]
    dec = LogitLens(tiny)
    a = lens_arrays(dec, ids, [7, None, 8, 9, 7], k=4)
    b = lens_arrays(dec, ids, [7, None, 8, 9, 7], k=4, max_rows=2, max_cells=3)
    assert a.keys() == b.keys() and len(a["prompt_id"]) == len(dec.points) * (3 + 4 + 2 + 1 + 3)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)
    # prompts 0 and 4 are the same text: identical rows
    np.testing.assert_array_equal(a["entropy"][a["prompt_id"] == 0], a["entropy"][a["prompt_id"] == 4])
    assert (a["target_rank"][a["prompt_id"] == 1] == -1).all()


def test_first_top1_logic_on_synthetic_table():
    from replab.lenses.table import first_top1

    ranks = [3, 0, 2, 0, 0]  # first top-1 at depth 1, stable from depth 3
    df = pd.DataFrame({"prompt_id": 0, "position": 0, "depth": [0.0, 1.0, 2.0, 3.0, 4.0],
                       "point": ["0_pre", "1_pre", "2_pre", "3_pre", "final"], "target": " x",
                       "target_rank": ranks, "target_prob": [0.1, 0.5, 0.2, 0.6, 0.7]})
    row = first_top1(df).iloc[0]
    assert row["first_top1_layer"] == 1.0 and row["stable_top1_layer"] == 3.0
    never = first_top1(df.assign(target_rank=[1, 1, 1, 1, 1])).iloc[0]
    assert math.isnan(never["first_top1_layer"]) and math.isnan(never["stable_top1_layer"])


def test_logit_diff_curve_final_point_is_model_logit_diff(tiny):
    from replab.lenses.logit_diff import logit_diff_curve
    from replab.prompts import answer_ids

    rows = pd.DataFrame([{"prompt": PROMPT, "answer": " Tuesday", "foils": [" Friday"],
                          "corrupt_prompt": "Today it is Thursday so tomorrow it is",
                          "corrupt_answer": " Friday"}])
    curve = logit_diff_curve(tiny, tiny.tokenizer, rows)
    assert set(curve["which"]) == {"clean", "corrupt"}
    assert curve["depth"].nunique() == 2 * tiny.cfg.n_layers + 1
    a, f = answer_ids(tiny.tokenizer, " Tuesday")[0], answer_ids(tiny.tokenizer, " Friday")[0]
    logits = tiny(_ids(tiny))[0, -1]
    final = curve[(curve["which"] == "clean") & (curve["point"] == "final")]["logit_diff"].item()
    assert abs(final - (logits[a] - logits[f]).item()) < 1e-4


def test_corpus_readers(tmp_path, tiny):
    from replab.prompts.corpus import read_corpus, token_chunks

    (tmp_path / "a.txt").write_text("First doc.\n\nSecond doc.\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "Third doc."}) + "\n" + json.dumps("Fourth.") + "\n")
    assert read_corpus(tmp_path / "a.txt") == ["First doc.", "Second doc."]
    assert read_corpus(tmp_path / "b.jsonl") == ["Third doc.", "Fourth."]
    assert len(read_corpus(tmp_path)) == 4
    assert len(read_corpus("builtin")) > 100 and len(read_corpus("builtin-heldout")) > 10
    chunks = token_chunks(read_corpus("builtin"), tiny.tokenizer, seq_len=32, max_tokens=100)
    assert chunks.shape == (3, 32) and chunks.dtype == torch.long
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    for bad, needle in [(tmp_path / "bad.jsonl", "line 1"), (tmp_path / "nope", "neither")]:
        with pytest.raises(ReplabError, match=needle):
            read_corpus(bad)
    with pytest.raises(ReplabError, match="fewer than one window"):
        token_chunks(["tiny"], tiny.tokenizer, seq_len=64)


def test_builtin_corpus_is_reproducible(tiny, tmp_path):
    from replab.prompts.corpus import corpus_dir, read_corpus, write_builtin

    stats = write_builtin(tiny.tokenizer, tmp_path)
    for name in ("train.txt", "heldout.txt"):  # the checked-in files are what the generator makes
        assert (tmp_path / name).read_bytes() == (corpus_dir() / name).read_bytes(), name
    assert stats["train"] == {"docs": 1200, "tokens": 117_283}
    assert stats["heldout"] == {"docs": 300, "tokens": 31_074}
    assert len(read_corpus("builtin")) == 1200


def test_cli_logit_json_and_files(tmp_path, capsys):
    code, out, err = run_cli(["lens", "logit", "--model", "tiny", "--prompt", PROMPT, "--target",
                              " Tuesday", "--mid", "--out", tmp_path / "r", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["n_points"] == 9 and summary["first_top1"]["n_prompts"] == 1
    for name in ("table.parquet", "table.csv", "trajectory.png", "target.png", "summary.json"):
        assert (tmp_path / "r" / name).exists(), name


def test_cli_eval_json_records(tiny_lens, tmp_path, capsys):
    _, _, path = tiny_lens
    code, out, err = run_cli(["lens", "eval", "--model", "tiny", "--lens", path, "--tokens", 256,
                              "--seq-len", 64, "--out", tmp_path / "ev", "--json"], capsys)
    assert code == 0, err
    records = json.loads(out)
    assert {tuple(sorted(r)) for r in records} == {("ce", "kl", "layer", "lens")}
    assert sorted({r["lens"] for r in records}) == ["logit", "tuned"]
    assert sorted({r["layer"] for r in records}) == [0, 1, 2]
    assert all(r["kl"] >= 0 and r["ce"] > 0 for r in records)
    assert (tmp_path / "ev" / "eval.png").exists()


def test_cli_export_writes_tuned_lens_format_once_and_refuses_other_dirs(tiny_pair, tiny_lens, tmp_path, capsys):
    from tuned_lens.nn.lenses import TunedLens

    _, hf = tiny_pair
    lens, _, path = tiny_lens
    out = tmp_path / "tl"
    for _ in range(2):                          # an earlier export is replaced
        code, got, err = run_cli(["lens", "export", "--model", "tiny", "--lens", path, "--out", out, "--json"],
                                 capsys)
        assert code == 0, err
        assert json.loads(got) == {"path": str(out)}
    theirs = TunedLens.from_model_and_pretrained(hf, lens_resource_id=str(out))
    h = torch.randn(1, 2, hf.config.hidden_size)
    torch.testing.assert_close(theirs(h, idx=1), lens(h, idx=1))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = run_cli(["lens", "export", "--model", "tiny", "--lens", path, "--out", tmp_path / "other"], capsys)
    assert code == 2 and err.startswith("error:") and "not an exported tuned lens" in err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args, needle", [
    (["lens", "export", "--model", "tiny", "--lens", "/no/such/lens", "--out", "/tmp/never"], "incomplete"),
    (["lens", "logit", "--model", "tiny"], "exactly one of"),
    (["lens", "logit", "--model", "tiny", "--prompt", "x", "--dataset", "next_day"], "exactly one of"),
    (["lens", "tuned", "--model", "tiny", "--prompt", "x", "--lens", "/no/such/lens"], "incomplete"),
    (["lens", "tuned", "--model", "tiny", "--prompt", "x", "--mid"], "no tuned-lens equivalent"),
    (["lens", "train", "--model", "tiny", "--corpus", "/no/such/corpus"], "neither"),
    (["lens", "logit", "--model", "tiny", "--dataset", "next_day", "--index", "999"], "out of range"),
])
def test_cli_errors_are_one_line(args, needle, capsys):
    code, _, err = run_cli(args, capsys)
    assert code == 2 and needle in err
    assert err.startswith("error:") and err.count("\n") == 1

"""replab.heads on the tiny GQA model (4 query heads, 2 KV heads): detectors against
TransformerLens, OV/QK circuits against the model's own layer-0 forward, composition against
TransformerLens, token sets, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from replab_testutil import run_cli


@pytest.fixture(scope="module")
def texts(tiny):
    from replab.heads.detectors import random_texts

    return random_texts(tiny.tokenizer, n_seqs=2, half=8, seed=0)


def test_detectors_equal_transformer_lens(tiny, texts):
    """previous / duplicate / induction == transformer_lens.head_detector.detect_head (1e-4), on
    the seeded random repeated sequences and on user texts of different lengths."""
    from transformer_lens.head_detector import detect_head

    from replab.heads.detectors import detect, tl_crosscheck

    table, summary = detect(tiny, "previous,duplicate,induction,bos", n_seqs=2, half=8)
    assert summary["inputs"]["texts"] == texts                                  # seeded: reproducible
    assert set(table.columns) == {"layer", "head", "detector", "score"} and len(table) == 4 * 4 * 4
    diffs = tl_crosscheck(tiny, texts, table)
    assert set(diffs) == {"previous", "duplicate", "induction"} and max(diffs.values()) < 1e-4
    user = ["The cat sat on the mat and the cat sat.", "a b a b a b c"]
    t2, _ = detect(tiny, "induction,duplicate", texts=user)
    ref = detect_head(tiny, user, "induction_head")
    mine = torch.tensor(t2[t2.detector == "induction"].pivot(index="layer", columns="head", values="score").values)
    assert (mine - ref).abs().max() < 1e-4
    # the random sequences repeat: token i of the second half is token i of the first
    toks = tiny.to_tokens(texts[0])[0]
    assert torch.equal(toks[:8], toks[8:])


def test_pattern_scores_on_constructed_heads():
    """A head that attends exactly to the targets scores the ``ideal``; BOS and positional scores."""
    from replab.heads.detectors import detection_pattern, ideal_score, pattern_scores, positional_scores

    toks = torch.tensor([5, 6, 7, 8, 5, 6, 7, 8])
    for det in ("previous", "duplicate", "induction"):
        p = detection_pattern(toks, det)
        rows = p.sum(-1, keepdim=True)
        perfect = torch.where(rows > 0, p / rows.clamp_min(1), torch.eye(8))        # rows sum to 1
        assert abs(float(pattern_scores(perfect[None, None], toks, det)) - ideal_score(toks, det)) < 1e-6
    assert abs(ideal_score(toks, "previous") - 7 / 8) < 1e-9 and ideal_score(toks, "induction") == 0.5
    bos = torch.zeros(8, 8)
    bos[:, 0] = 1.0
    assert float(pattern_scores(bos[None, None], toks, "bos")) == 1.0
    # positional: identical patterns on every sequence -> 1; content-dependent -> < 1
    assert float(positional_scores([bos[None, None]] * 3)) == pytest.approx(1.0)
    prev = torch.eye(8).roll(-1, 1).tril()
    prev[0, 0] = 1.0
    assert float(positional_scores([bos[None, None], prev[None, None]])) < 0.6


def test_token_sets(tiny, tmp_path):
    """Leading-space forms first, bare digits (SmolLM2 splits " 1"), multi-token items dropped."""
    from replab.errors import ReplabError
    from replab.heads.tokensets import resolve

    tok = tiny.tokenizer
    wk = resolve("weekdays", tok)
    assert wk.tokens[0] == " Monday" and wk.cyclic and wk.next_index == [1, 2, 3, 4, 5, 6, 0]
    mo = resolve("months", tok)
    assert len(mo) == 12 and mo.next_index[-1] == 0
    dg = resolve("digits", tok)
    assert dg.tokens[:3] == ["0", "1", "2"] and dg.next_index[-1] == -1 and not dg.cyclic
    f = tmp_path / "items.txt"
    f.write_text("# numbers\n8\n9\n10\n11\n")
    items = resolve(str(f), tok)
    assert items.items == ["8", "9"] and [d["item"] for d in items.dropped] == ["10", "11"]
    assert items.next_index == [1, -1]          # 9 -> 10 is gone with 10
    assert resolve(str(f), tok, cyclic=True).next_index == [1, -1]   # 11 -> 8 is gone with 11
    words = resolve("words", tok)
    assert len(words) == 512 and not words.ordered and all(t.startswith(" ") for t in words.tokens)
    with pytest.raises(ReplabError, match="neither a builtin"):
        resolve(str(tmp_path / "missing.txt"), tok)
    (tmp_path / "one.txt").write_text("Monday\n10\n")
    with pytest.raises(ReplabError, match="at least 2"):
        resolve(str(tmp_path / "one.txt"), tok)


def test_ov_layer0_equals_the_forward_pass(tiny):
    """At layer 0 the residual is the embedding: each OV row equals hook_v (of the query head's
    KV head) times W_O, through the final norm's linear part and W_U, from a real forward."""
    from replab.heads.ov import ov_matrices
    from replab.heads.tokensets import resolve
    from replab.heads.weights import final_linear

    ts = resolve("weekdays", tiny.tokenizer)
    mats = ov_matrices(tiny, ts, layers=[0])[0]                          # [H, n, n]
    _, cache = tiny.run_with_cache(torch.tensor([ts.ids]), names_filter="blocks.0.attn.hook_v")
    v = cache["blocks.0.attn.hook_v"][0]                                  # [n, n_kv, dh]
    W_O, W_U = tiny.blocks[0].attn.W_O.detach(), tiny.W_U[:, ts.ids].detach()
    for h in range(4):
        ref = final_linear(tiny, v[:, h // 2] @ W_O[h]) @ W_U             # query heads 0,1 -> KV 0
        assert (ref - mats[h]).abs().max() < 1e-4
    wrong = final_linear(tiny, v[:, 1] @ W_O[0]) @ W_U                   # tiling would give KV 1
    assert (wrong - mats[0]).abs().max() > 1e-3


def test_ov_scores_and_eigen_copy(tiny):
    """Copy / next-item scores on constructed matrices; rank scores ignore a positive row scale
    (the final norm's left-out scale); eigen_copy equals TransformerLens's FactoredMatrix."""
    from replab.heads.ov import eigen_copy_scores, mean_ranks, row_scores

    n = 5
    nxt = [1, 2, 3, 4, 0]
    m = torch.eye(n)[None] * 2 + torch.randn(1, n, n) * 0.1
    copy, next_item = row_scores(m, nxt)
    assert copy[0] == 1.0 and next_item[0] == 0.0
    shift = torch.eye(n).roll(1, 1)[None]
    assert row_scores(shift, nxt)[1][0] == 1.0 and mean_ranks(shift, nxt)[1][0] == 1.0
    scaled = m * torch.rand(1, n, 1).add(0.1)                              # positive scale per row
    assert np.array_equal(row_scores(scaled, nxt)[0], copy)
    mine = eigen_copy_scores(tiny)
    for layer in range(4):
        fm = tiny.W_E @ tiny.OV[layer] @ tiny.W_U                          # TL FactoredMatrix [H, V, V]
        lam = fm.eigenvalues
        ref = lam.sum(-1).real / lam.abs().sum(-1)
        assert (ref.float() - mine[layer]).abs().max() < 1e-4


def test_qk_layer0_equals_attention_scores(tiny):
    """QK circuit at relative offset δ == hook_attn_scores of two-token sequences at layer 0
    (query token after key token: offset 1; same position: offset 0), per query head."""
    from replab.heads.qk import qk_matrices
    from replab.heads.tokensets import resolve

    ts = resolve("weekdays", tiny.tokenizer)
    ids = ts.ids[:4]
    pairs = [(a, b) for a in range(4) for b in range(4)]                 # sequence [key a, query b]
    toks = torch.tensor([[ids[a], ids[b]] for a, b in pairs])
    _, cache = tiny.run_with_cache(toks, names_filter="blocks.0.attn.hook_attn_scores")
    scores = cache["blocks.0.attn.hook_attn_scores"]                     # [B, H, 2, 2]
    q1 = qk_matrices(tiny, ts, layers=[0], offset=1)[0]
    q0 = qk_matrices(tiny, ts, layers=[0], offset=0)[0]
    for i, (a, b) in enumerate(pairs):
        assert (scores[i, :, 1, 0] - q1[:, b, a]).abs().max() < 1e-4
        assert (scores[i, :, 0, 0] - q0[:, a, a]).abs().max() < 1e-4
    assert (q1 - q0).abs().max() > 1e-3                                   # rotary: offset matters


@pytest.fixture(scope="module")
def gpt2_like():
    """A tiny GPT-2-like model (LayerNorm, learned absolute positions), random weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=50, n_ctx=16,
                                  act_fn="gelu", normalization_type="LN", positional_embedding_type="standard",
                                  seed=0, device="cpu")
    return HookedTransformer(cfg)


def test_positional_qk_on_learned_positions(gpt2_like):
    """With W_E zeroed the layer-0 residual is W_pos, so hook_attn_scores == positional_qk."""
    import copy

    from replab.errors import ReplabError
    from replab.heads.qk import positional_qk, qk_matrices
    from replab.heads.tokensets import TokenSet

    m = copy.deepcopy(gpt2_like)
    with torch.no_grad():
        m.embed.W_E.zero_()
    _, cache = m.run_with_cache(torch.zeros(1, 8, dtype=torch.long), names_filter="blocks.0.attn.hook_attn_scores")
    ref = cache["blocks.0.attn.hook_attn_scores"][0]                     # [H, 8, 8]
    mine = positional_qk(m, 0, 8)
    low = torch.ones(8, 8).tril().bool()
    assert (ref[:, low] - mine[:, low]).abs().max() < 1e-4 and mine[:, ~low].isnan().all()
    ts = TokenSet("t", ["a", "b"], [3, 4], ["a", "b"], [1, -1])
    with pytest.raises(ReplabError, match="rotary"):
        qk_matrices(gpt2_like, ts, offset=2)


def test_composition_equals_transformer_lens_and_gqa_layout_matters(tiny):
    """replab == TransformerLens all_composition_scores (its expanded W_K/W_V use
    repeat_interleave, so it is right for GQA); pairing query heads with tiled KV heads
    (h % n_kv) gives different scores."""
    from transformer_lens import FactoredMatrix
    from transformer_lens import utilities as utils

    from replab.heads.composition import composition_scores, composition_table, random_baseline

    for mode in ("Q", "K", "V"):
        ref = tiny.all_composition_scores(mode)
        assert (ref - composition_scores(tiny, mode.lower())).abs().max() < 1e-4
    tiled_v = torch.stack([b.attn._W_V.detach().repeat(2, 1, 1) for b in tiny.blocks])   # KV 0,1,0,1
    tiled = utils.composition_scores(tiny.OV, FactoredMatrix(tiled_v, tiny.W_O), broadcast_dims=True)
    later = torch.arange(4)[:, None, None, None] < torch.arange(4)[None, None, :, None]
    mine = composition_scores(tiny, "v")
    assert ((tiled - mine).abs() * later).max() > 1e-3
    table, base = composition_table(tiny, "q,v", n_random=20)
    assert len(table) == 2 * 16 * 6 and set(base) == {"q", "v"}
    b = random_baseline(64, 16, 20, seed=0)
    assert b == random_baseline(64, 16, 20, seed=0) and 0 < b["mean"] < b["p95"] < 1


def _json(args, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    return json.loads(out)


def test_heads_cli(tiny, tmp_path, capsys):
    """Every ``replab heads`` command on the tiny model: JSON, run directory, figures."""
    d = _json(["heads", "detect", "--model", "tiny", "--n-seqs", "2", "--half", "6", "--detectors",
               "previous,induction,bos,positional,copying", "--out", tmp_path / "d", "--json"], capsys)
    assert {tuple(sorted(r)) for r in d["records"]} == {("detector", "head", "layer", "score")}
    assert {r["detector"] for r in d["records"]} == {"previous", "induction", "bos", "positional", "copying"}
    assert (tmp_path / "d" / "heatmap_induction.png").exists() and (tmp_path / "d" / "summary.json").exists()
    txt = tmp_path / "t.txt"
    txt.write_text("the cat sat on the mat\n\nthe dog sat on the log again\n")
    d2 = _json(["heads", "detect", "--model", "tiny", "--text", txt, "--detectors", "previous,positional",
                "--out", tmp_path / "d2", "--json"], capsys)
    assert d2["inputs"] == {"kind": "texts", "n_texts": 2}
    ov = _json(["heads", "ov", "--model", "tiny", "--tokens", "months", "--heads", "L1H2,L3H0", "--out",
                tmp_path / "ov", "--json"], capsys)
    assert ov["heads_shown"] == ["L1H2", "L3H0"] and ov["tokens"]["n"] == 12 and ov["per"] == "query head"
    assert (tmp_path / "ov" / "ov_matrices.png").exists()
    qk = _json(["heads", "qk", "--model", "tiny", "--tokens", "weekdays", "--offset", "1", "--out",
                tmp_path / "qk", "--json"], capsys)
    assert qk["positions"].startswith("rotary") and len(qk["heads_shown"]) == 3
    comp = _json(["heads", "composition", "--model", "tiny", "--mode", "k", "--n-random", "10", "--top", "3",
                  "--into", "L3H1", "--out", tmp_path / "c", "--json"], capsys)
    assert comp["modes"] == ["k"] and len(comp["top_pairs"]["k"]) == 3 and comp["n_pairs"] == 96
    into = comp["into"]["L3H1"]["k"]
    assert [r["rank"] for r in into] == [1, 2, 3, 4, 5] and into[0]["of"] == 12
    assert into[0]["score"] >= into[1]["score"]
    pat = _json(["heads", "patterns", "--model", "tiny", "--heads", "L0H1,L3H3", "--prompt",
                 "Today it is Monday so tomorrow it is", "--out", tmp_path / "p", "--json"], capsys)
    assert [h["group"] for h in pat["heads"]] == ["early", "late"] and (tmp_path / "p" / "patterns.png").exists()
    pat2 = _json(["heads", "patterns", "--model", "tiny", "--heads", "L2H1", "--task", "next_day",
                  "--out", tmp_path / "p2", "--json"], capsys)
    assert pat2["heads"][0]["head"] == "L2H1"


@pytest.mark.parametrize("args, message", [
    (["detect", "--detectors", "prev"], "unknown detector"),
    (["detect", "--text", "nope.txt"], "does not exist"),
    (["ov", "--tokens", "planets"], "neither a builtin"),
    (["ov", "--heads", "L9H0"], "does not exist"),
    (["qk", "--offset", "-1"], "negative"),
    (["composition", "--mode", "x"], "unknown composition mode"),
    (["patterns", "--heads", "L1H1"], "exactly one of"),
])
def test_heads_cli_errors(args, message, tmp_path, capsys):
    code, _, err = run_cli(["heads", *args, "--model", "tiny", "--out", tmp_path / "x"], capsys)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_positional_needs_two_texts(tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("just one line of text\n")
    code, _, err = run_cli(["heads", "detect", "--model", "tiny", "--text", one, "--detectors", "positional",
                            "--out", tmp_path / "x"], capsys)
    assert code == 2 and "at least 2" in err

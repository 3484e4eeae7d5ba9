"""``replab circuit ...`` from the shell: run directories, --json records, replay from
config.yaml reproducing the result, one-line errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from replab_testutil import run_cli

T = ["--model", "tiny", "--task", "next_day", "--limit", "3"]


def test_validation_run_dir_json_and_replay(tmp_path, capsys):
    out = tmp_path / "nec"
    code, stdout, err = run_cli(["circuit", "necessity", *T, "--components", "L1H2,L2MLP@-1", "--ablation", "resample",
                                 "--metric", "margin", "--out", out, "--json"], capsys)
    assert code == 0, err
    s = json.loads(stdout)
    rec = s["records"][0]
    assert rec["components"] == ["L1H2", "L2MLP@-1"] and rec["ablation"] == "resample" and rec["n_random"] == 20
    for f in ("config.yaml", "records.parquet", "records.csv", "variants.parquet", "per_prompt.parquet",
              "random_baseline.png", "random_baseline.svg", "summary.json"):
        assert (out / f).is_file(), f
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["kind"] == "necessity" and config["options"]["components"] == ["L1H2", "L2MLP@-1"]
    assert config["replay"].startswith("replab circuit replay")
    code, stdout, err = run_cli(["circuit", "replay", out / "config.yaml", "--out", tmp_path / "again", "--json"],
                                capsys)
    assert code == 0, err
    again = json.loads(stdout)["records"][0]
    assert {k: rec[k] for k in rec if k != "verdict"} == {k: again[k] for k in again if k != "verdict"}
    a = pd.read_parquet(out / "variants.parquet")
    b = pd.read_parquet(tmp_path / "again" / "variants.parquet")
    assert a["metric_after"].tolist() == b["metric_after"].tolist()


def test_path_and_prune_commands(tmp_path, capsys):
    code, stdout, err = run_cli(["circuit", "path", *T, "--sender", "L0H1,L1H2", "--each", "--receiver", "L3H2.k",
                                 "--out", tmp_path / "p", "--json"], capsys)
    assert code == 0, err
    s = json.loads(stdout)
    assert [r["sender"] for r in s["records"]] == [["L0H1"], ["L1H2"]] and "KV head 1" in s["note"]
    # --senders all: every head below the receiver, each scored alone, in one run
    code, stdout, err = run_cli(["circuit", "path", *T, "--senders", "all", "--receiver", "L2H1.v",
                                 "--out", tmp_path / "pall", "--json"], capsys)
    assert code == 0, err
    assert sorted(r["sender"][0] for r in json.loads(stdout)["records"]) == sorted(
        f"L{layer}H{h}" for layer in (0, 1) for h in range(4))
    code, stdout, err = run_cli(["circuit", "prune", *T, "--metric", "margin", "--orders", "reverse,random:2",
                                 "--thresholds", "0.5", "--out", tmp_path / "pr", "--json"], capsys)
    # the random tiny model's clean margin is negative: pruning refuses, in one line
    assert code == 2 and err.startswith("error: performance = ablated / intact margin") and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["necessity", "--components", "L1H9"], "head 9 is out of range"),
    (["necessity", "--components", "L7MLP"], "layer 7 is out of range"),
    (["necessity", "--components", "banana"], "unknown component"),
    (["sufficiency", "--components", "L0ATTN,L1ATTN,L2ATTN,L3ATTN", "--n-random", "0"], "ablates nothing"),
    (["necessity", "--components", "L1H2", "--ablation", "mean-other"], "needs --mean-over"),
    (["path", "--sender", "L3H1", "--receiver", "L2H1.v"], "not below the receiver"),
    (["blocks"], "give --layer"),
])
def test_one_line_errors(capsys, args, message):
    code, _, err = run_cli(["circuit", *args, *T], capsys)
    assert code == 2 and message in err and err.startswith("error:") and err.count("\n") == 1


def test_help_has_examples(capsys):
    for cmd in ("necessity", "sufficiency", "minimality", "path", "prune", "blocks", "hydra", "grid", "compare",
                "replay"):
        code, stdout, _ = run_cli(["circuit", cmd, "--help"], capsys)
        assert code == 0 and "Examples:" in stdout and "replab circuit" in stdout


def test_compare_and_blocks_commands(tmp_path, capsys):
    runs = []
    for name, comps in (("a", "L1H2,L2H0,L3H1"), ("b", "L1H2,L3H1,L3H3")):
        code, _, err = run_cli(["circuit", "sufficiency", *T, "--components", comps, "--n-random", "0",
                                "--out", tmp_path / name, "--json"], capsys)
        assert code == 0, err
        runs.append(tmp_path / name)
    code, stdout, err = run_cli(["circuit", "compare", *runs, "--out", tmp_path / "cmp", "--json"], capsys)
    assert code == 0, err
    s = json.loads(stdout)
    (ov,) = s["overlap"]
    assert ov["shared"] == ["L1H2", "L3H1"] and ov["only_a"] == ["L2H0"] and ov["jaccard"] == pytest.approx(0.5)
    cross = pd.DataFrame(s["cross"])
    assert len(cross) == 4 and set(cross["task_of"]) == {"A", "B"}
    own = json.loads((runs[0] / "summary.json").read_text())["records"][0]["metric"]
    assert cross[(cross.circuit == "A:set") & (cross.task_of == "A")]["metric_value"].iloc[0] == pytest.approx(own)
    code, stdout, err = run_cli(["circuit", "blocks", *T, "--layers", "1-2", "--positions", "last", "--out",
                                 tmp_path / "blk", "--json"], capsys)
    assert code == 0, err
    recs = json.loads(stdout)["records"]     # 2 layers x 2 tests x (RESID + 4 heads + MLP)
    assert len(recs) == 24 and {r["layer"] for r in recs} == {1, 2}
    assert (tmp_path / "blk" / "blocks_heatmap.png").is_file() and (tmp_path / "blk" / "blocks_heatmap.svg").is_file()

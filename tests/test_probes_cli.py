"""``replab probe train --kind lowrank`` / ``--rank`` through the CLI on a synthetic store with
a planted rank-2 signal: records, the rank answer, saved low-rank probes, --json keys vs
docs/probes.md, one-line errors (fast)."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from replab.cli import app
from replab.errors import ReplabError
from replab.probes import parse_ranks
from replab.probes.train import RECORD_KEYS
from replab.store.synthetic import write_synthetic_store

DOCS = Path(__file__).resolve().parents[1] / "docs" / "probes.md"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("lr") / "s", n_rows=500, d=24,
                                 n_layers=2, n_classes=5, rank=2, signal=3.0,
                                 entity_scale=0.5, seed=0)


def _train(store, out, *args):
    r = CliRunner().invoke(app, ["probe", "train", "--store", str(store.path), "--label", "label",
                                 "--layers", "1", "--no-erase", "--out", str(out), "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout[r.stdout.index("{"):])


def _documented_record_keys() -> set:
    text = DOCS.read_text()
    table = text[text.index("### Records"):].split("\n## ")[0]
    keys = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            keys |= set(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return keys


def test_parse_ranks():
    assert parse_ranks("2") == (2,) and parse_ranks("1..3") == (1, 2, 3)
    assert parse_ranks("1-2") == (1, 2) and parse_ranks("1,4") == (1, 4) and parse_ranks(None) == ()
    for bad in ("x", "0", "0..2"):
        with pytest.raises(ReplabError):
            parse_ranks(bad)


def test_lowrank_single_rank_json_and_artifacts(store, tmp_path):
    data = _train(store, tmp_path / "r2", "--kind", "lowrank", "--rank", "2", "--no-controls")
    assert set(data) == {"best_layer", "records", "rank", "out"}
    recs = data["records"]
    assert {(r["kind"], r["rank"]) for r in recs} == {("logistic", 4), ("lowrank", 2)}
    assert all(set(r) == set(RECORD_KEYS) for r in recs)
    assert set(RECORD_KEYS) == _documented_record_keys()        # docs/probes.md lists every key
    low = next(r for r in recs if r["kind"] == "lowrank")
    assert low["shuffled_accuracy"] is None and low["balanced_accuracy"] > 0.6
    answer = data["rank"]["layers"]["1"]
    assert answer["smallest_rank"] == 2 and set(answer["accuracy_by_rank"]) == {"2"}
    out = tmp_path / "r2"
    for f in ("probes/lowrank_r2.safetensors", "probes/lowrank_r2.json", "probes/logistic.json"):
        assert (out / f).exists(), f
    assert not list((out / "directions").glob("lowrank*"))
    r = CliRunner().invoke(app, ["probe", "apply", "--probe",
                                 str(out / "probes" / "lowrank_r2.json"),
                                 "--store", str(store.path), "--json"])
    assert r.exit_code == 0, r.output
    applied = json.loads(r.stdout)
    assert applied["kind"] == "lowrank_r2" and applied["accuracy"] > 0.6


def test_rank_sweep_finds_planted_rank_two(store, tmp_path):
    data = _train(store, tmp_path / "sweep", "--rank", "1..3", "--kind", "meandiff")
    kinds = {(r["kind"], r["rank"]) for r in data["records"]}
    assert kinds == {("logistic", 4), ("meandiff", 4),
                     ("lowrank", 1), ("lowrank", 2), ("lowrank", 3)}
    answer = data["rank"]["layers"]["1"]
    assert answer["smallest_rank"] == 2, answer
    acc = answer["accuracy_by_rank"]
    assert acc["2"] > acc["1"] + 0.1
    assert set(answer["clusters"]) == {f"class{i}" for i in range(5)}
    low = [r for r in data["records"] if r["kind"] == "lowrank"]
    assert all(r["control_accuracy"] is not None and r["heldout_balanced_accuracy"] is not None
               for r in low)


def test_lowrank_cli_errors(store, tmp_path):
    runner = CliRunner()
    for bad in (["--rank", "0"], ["--rank", "two"], ["--kind", "lowrank", "--rank", "1..x"]):
        r = runner.invoke(app, ["probe", "train", "--store", str(store.path), "--label", "label",
                                "--out", str(tmp_path / "x"), *bad])
        assert isinstance(r.exception, ReplabError), (bad, r.output)
        assert len(str(r.exception).splitlines()) == 1
    help_out = runner.invoke(app, ["probe", "train", "--help"], terminal_width=200).stdout
    help_text = " ".join(help_out.split())
    assert "--kind lowrank --rank 2" in help_text and "Examples" in help_text


def test_threads_sweep_layers_in_parallel_with_identical_results(store, tmp_path):
    from replab.probes import train_probes

    r = CliRunner().invoke(app, ["probe", "train", "--store", str(store.path), "--label", "label",
                                 "--no-erase", "--no-controls", "--threads", "2",
                                 "--out", str(tmp_path / "t2"), "--json"])
    assert r.exit_code == 0, r.output
    par = json.loads(r.stdout[r.stdout.index("{"):])["records"]
    ser = train_probes(store, "label", controls=False, erase=False, threads=1,
                       progress=False).to_json()["records"]
    ser = json.loads(json.dumps(ser).replace("NaN", "null"))      # as --json prints it
    assert [x["layer"] for x in par] == [0, 0, 1, 1]
    assert par == ser


def test_cluster_directions_dendrogram_and_largest_gap_cut():
    import numpy as np

    from replab.probes.rank import cluster_directions

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=16), rng.normal(size=16)
    dirs = np.stack([a, a + 0.05 * rng.normal(size=16), b, b + 0.05 * rng.normal(size=16),
                     b + 0.06 * rng.normal(size=16)])
    out = cluster_directions(dirs, ["p", "q", "r", "s", "t"])
    assert out["n_clusters"] == 2
    assert out["clusters"]["p"] == out["clusters"]["q"] != out["clusters"]["r"]
    assert out["clusters"]["r"] == out["clusters"]["s"] == out["clusters"]["t"]
    merges = out["dendrogram"]["merges"]
    assert len(merges) == 4 and sorted(merges[-1]["a"] + merges[-1]["b"]) == list("pqrst")
    assert [m["distance"] for m in merges] == sorted(m["distance"] for m in merges)
    assert merges[-2]["distance"] < out["cut_distance"] < merges[-1]["distance"]
    assert sorted(out["dendrogram"]["order"]) == list("pqrst")

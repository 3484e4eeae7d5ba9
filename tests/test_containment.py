"""Files named by an artifact are read only from inside it (issue 11, item 2, the remaining readers).

Each case builds a run directory (or model directory, or dataset spec) whose own metadata or
files point outside it (``../outside``, a symlink out), runs the real command, and expects
exit code 2 with one ``error:`` line that says so, and no traceback. The outside file is a
valid one of the right kind, so following the path would "work".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from replab_testutil import run_cli

from replab.errors import ReplabError

OUTSIDE = r"points outside the directory"


def expect_error(capsys, args, match: str) -> str:
    code, _out, err = run_cli(args, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, f"exit {code}, stderr:\n{err}"
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(match, errors[0]), errors[0]
    return errors[0]


@pytest.fixture(autouse=True)
def reuse_tiny(tiny, monkeypatch):
    """In-process commands get the session's tiny model instead of loading it again."""
    import replab.models as models

    real = models.load_model
    monkeypatch.setattr(models, "load_model",
                        lambda name=None, *a, **k: tiny if name == "tiny" and not a else real(name, *a, **k))


def _link_out(folder: Path, name: str, target: Path) -> None:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).symlink_to(target)


def test_patch_patterns_from_a_run_with_a_table_linked_out(tmp_path, capsys):
    outside = tmp_path / "outside.parquet"
    pd.DataFrame({"layer": [1], "head": [2], "logit_diff": [0.5]}).to_parquet(outside)
    run = tmp_path / "dla"
    run.mkdir()
    _link_out(run, "dla_heads.parquet", outside)
    expect_error(capsys, ["patch", "patterns", "--model", "tiny", "--task", "next_day", "--from", run],
                 r"dla_heads\.parquet' " + OUTSIDE)
    (run / "dla_heads.parquet").unlink()
    _link_out(run, "z/sweep.parquet", outside)
    expect_error(capsys, ["patch", "patterns", "--model", "tiny", "--task", "next_day", "--from", run],
                 r"z/sweep\.parquet' " + OUTSIDE)
    (run / "z" / "sweep.parquet").unlink()
    (run / "sweep.parquet").write_bytes(b"not parquet")
    expect_error(capsys, ["patch", "patterns", "--model", "tiny", "--task", "next_day", "--from", run],
                 r"sweep\.parquet: unreadable sweep table")


def test_features_scan_records_and_summary_linked_out(tmp_path, capsys):
    outside = tmp_path / "outside.parquet"
    pd.DataFrame({"kind": ["logistic"], "layer": [0], "accuracy": [0.9]}).to_parquet(outside)
    run = tmp_path / "probe"
    (run / "probes").mkdir(parents=True)
    _link_out(run, "records.parquet", outside)
    expect_error(capsys, ["features", "scan", "--model", "tiny", "--probe", run], r"records\.parquet' " + OUTSIDE)
    # a scan directory whose summary.json leaves it (features patch --layer SCAN)
    (tmp_path / "outside.json").write_text(json.dumps({"kind": "features_scan", "chosen_layer": 1}))
    scan = tmp_path / "scan"
    scan.mkdir()
    _link_out(scan, "summary.json", tmp_path / "outside.json")
    expect_error(capsys, ["features", "patch", "--model", "tiny", "--direction", outside, "--layer", scan],
                 r"summary\.json' " + OUTSIDE)


def test_sae_patch_from_a_decompose_run_linked_out(tmp_path, capsys):
    outside = tmp_path / "outside.parquet"
    pd.DataFrame({"latent": [3, 4]}).to_parquet(outside)
    run = tmp_path / "decompose"
    run.mkdir()
    _link_out(run, "top_latents.parquet", outside)
    expect_error(capsys, ["sae", "patch", "--model", "tiny", "--layer", "2", "--from", run],
                 r"top_latents\.parquet' " + OUTSIDE)
    (run / "top_latents.parquet").unlink()
    pd.DataFrame({"feature": [3]}).to_parquet(run / "top_latents.parquet")
    expect_error(capsys, ["sae", "patch", "--model", "tiny", "--layer", "2", "--from", run], r"no 'latent' column")


def test_direction_inputs_stay_inside_the_probe_run(tmp_path, capsys):
    from replab.probes.directions import Direction

    run = tmp_path / "probe"
    (run / "probes").mkdir(parents=True)
    (tmp_path / "outside.json").write_text(json.dumps({"format": "replab.probe"}))
    _link_out(run, "probes/logistic.json", tmp_path / "outside.json")
    base = ["features", "patch", "--model", "tiny", "--class", "a", "--layer", "0"]
    expect_error(capsys, [*base, "--direction", run], r"probes/logistic\.json' " + OUTSIDE)
    expect_error(capsys, [*base, "--direction", run, "--kind", "../../outside"], OUTSIDE)
    # a Direction artifact of a probe run whose summary.json (naming the run's store) is a link out
    (run / "probes" / "logistic.json").unlink()
    Direction(vector=np.ones(64), hook="blocks.0.hook_resid_post", layer=0, position="last", label="y",
              positive_class="a", classes=["a", "b"], kind="logistic", model={}).save(
        run / "directions" / "logistic_L0_a")
    (tmp_path / "summary.json").write_text(json.dumps({"store": str(tmp_path / "elsewhere")}))
    _link_out(run, "summary.json", tmp_path / "summary.json")
    expect_error(capsys, [*base, "--direction", run / "directions" / "logistic_L0_a.json"],
                 r"summary\.json' " + OUTSIDE)


def _safetensors(path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, dtype=np.float32)}, str(path))


def test_model_shard_index_stays_inside(tmp_path, capsys):
    from replab.models.source import weight_files

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    _safetensors(tmp_path / "outside.safetensors")
    index = {"weight_map": {"w": "../outside.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ReplabError, match=r"'\.\./outside\.safetensors' " + OUTSIDE):
        weight_files(model)
    expect_error(capsys, ["models", "info", "--model", model], OUTSIDE)
    index["weight_map"]["w"] = str(tmp_path / "outside.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ReplabError, match=r"is not a path inside the directory"):
        weight_files(model)
    # a Hugging Face hub snapshot links its shards into ../../blobs: that stays allowed
    snap = tmp_path / "hub" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (tmp_path / "hub" / "blobs").mkdir()
    _safetensors(tmp_path / "hub" / "blobs" / "123")
    (snap / "model-00001.safetensors").symlink_to(Path("../../blobs/123"))
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001.safetensors"}}))
    files, pickle = weight_files(snap)
    assert files == [snap / "model-00001.safetensors"] and not pickle


def test_dataset_spec_rows_file_stays_next_to_the_spec(tmp_path, capsys):
    (tmp_path / "outside.jsonl").write_text(json.dumps({"prompt": "Today it is Monday so tomorrow it is"}) + "\n")
    spec = tmp_path / "specs" / "mine.yaml"
    spec.parent.mkdir()
    spec.write_text("builder: rows\nfile: ../outside.jsonl\n")
    expect_error(capsys, ["datasets", "export", spec, "--out", tmp_path / "x.jsonl"],
                 r"'\.\./outside\.jsonl' " + OUTSIDE)


def test_plot_probes_and_circuit_runs_read_only_their_own_files(tmp_path, capsys):
    outside = tmp_path / "outside.parquet"
    pd.DataFrame({"layer": [0], "kind": ["logistic"], "balanced_accuracy": [0.9]}).to_parquet(outside)
    run = tmp_path / "probe"
    run.mkdir()
    _link_out(run, "records.parquet", outside)
    expect_error(capsys, ["plot", "probes", "--run", run], r"records\.parquet' " + OUTSIDE)
    # circuit compare / replay: summary.json or config.yaml linked out, or damaged
    circ = tmp_path / "circ"
    circ.mkdir()
    (tmp_path / "config.yaml").write_text("kind: prune\noptions: {task: next_day}\n")
    _link_out(circ, "config.yaml", tmp_path / "config.yaml")
    expect_error(capsys, ["circuit", "replay", circ], r"config\.yaml' " + OUTSIDE)
    (circ / "config.yaml").unlink()
    (circ / "config.yaml").write_text("kind: [prune\n")
    expect_error(capsys, ["circuit", "replay", circ], r"not valid YAML")
    (circ / "config.yaml").write_text("kind: prune\noptions: {task: next_day}\n")
    (tmp_path / "summary.json").write_text(json.dumps({"levels": []}))
    _link_out(circ, "summary.json", tmp_path / "summary.json")
    expect_error(capsys, ["circuit", "compare", circ, circ, "--no-cross", "--out", tmp_path / "cmp"],
                 r"summary\.json' " + OUTSIDE)
    (circ / "summary.json").unlink()
    (circ / "summary.json").write_text("{not json")
    expect_error(capsys, ["circuit", "compare", circ, circ, "--no-cross", "--out", tmp_path / "cmp"],
                 r"invalid JSON")


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "s3://other/x", "a\\b", "",
                                  "%2e%2e/%2e%2e/etc/passwd", "..%2fsecret", "x?y=1", "x#frag"])
def test_url_store_names_stay_inside(name):
    """A manifest's file name under a URL root (fsspec stores) may not leave it, also not through
    percent-encoding, a query or a fragment that an HTTP server would decode or cut."""
    from replab.io import inside

    with pytest.raises(ReplabError, match="inside the directory|outside the directory"):
        inside("memory://bucket/store", name)
    assert inside("memory://bucket/store", "acts/blocks.0.hook_resid_post.npy") \
        == "memory://bucket/store/acts/blocks.0.hook_resid_post.npy"

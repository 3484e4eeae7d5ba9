"""Scale-out on Ray (issue 17), on the tiny model and a local Ray cluster started here.

* a Ray harvest on two workers, one of which dies mid-shard (``$REPLAB_TEST_CRASH_ONCE``: the
  worker ``os._exit``s as a killed process would; Ray restarts it and retries its shard), is
  byte-identical (index, tensors, manifest) to the local harvest;
* the Ray engine of the experiment loop equals the local engine bit for bit:
  ``replab patch sweep --engine ray``; a sweep on two workers with a worker killed; pruning
  (recordings and per-hook custom sources); edge plans, recordings and seeded sources split
  into many chunks over both workers; exact edge scores;
* ``memory://`` and ``file://`` stores round-trip, and a row-range read of a remote store
  fetches only those rows' bytes (one range request, at the byte offsets of the ``.npy``);
* without Ray, ``--engine ray`` is a one-line error saying what to install.

One local cluster (``ray.init(num_cpus=2)``) serves the whole module and is shut down at the
end; the Ray tests skip where Ray is not installed (``pip install 'replab[ray]'``) and are
marked ``slow`` (each starts worker processes that import torch and load the model).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import pandas as pd
import pytest
from replab_testutil import run_cli, tree_digest

from replab.errors import ReplabError
from replab.harvesting import harvest
from replab.store import open_store

HARVEST = dict(dataset="next_day", hooks="resid_post,z", layers="0,2", positions="all", batch_size=4)


@pytest.fixture(scope="session")
def cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_store(tiny, tmp_path_factory):
    return harvest(tiny, out=tmp_path_factory.mktemp("local") / "store", progress=False, **HARVEST)


@pytest.fixture(scope="module")
def engine(cluster):
    """One Ray engine of two workers for the engine tests (they load the model once)."""
    from replab.patching.executors import RayEngine

    eng = RayEngine(workers=2, cpus_per_worker=1)
    yield eng
    eng.close()


# ---------------------------------------------------------------- harvest
@pytest.mark.slow
def test_ray_harvest_with_a_killed_worker_is_byte_identical_to_local(tiny, cluster, local_store, tmp_path,
                                                                      monkeypatch):
    """Two workers, shards of batches; one worker dies mid-shard (after computing a batch) and
    Ray restarts it and retries its shard: no row is lost or written twice."""
    marker = tmp_path / "crashed"
    monkeypatch.setenv("REPLAB_TEST_CRASH_ONCE", str(marker))
    store = harvest(tiny, out=tmp_path / "ray", progress=False, engine="ray", workers=2, cpus_per_worker=1,
                    **HARVEST)
    assert marker.exists(), "no worker died: the test did not test a retry"
    assert int(marker.read_text()) != os.getpid()            # a worker process died, not the driver
    assert tree_digest(tmp_path / "ray") == tree_digest(local_store.path)     # index, tensors, manifest
    run = store.harvest_run
    assert run["engine"] == "ray" and run["workers"] == 2 and run["shards"] > 2
    assert run["rows"] == len(local_store.index) and run["rows_per_second"] > 0


def test_cli_harvest_reports_rows_per_second(tmp_path, capsys):
    code, out, err = run_cli(["harvest", "--model", "tiny", "--dataset", "next_day", "--layers", "0",
                              "--out", tmp_path / "cli", "--json"], capsys)
    assert code == 0, err
    run = json.loads(out)["run"]
    assert run["engine"] == "local" and run["rows"] == 56 and run["rows_per_second"] > 0


# ---------------------------------------------------------------- stores at URLs
def test_memory_store_round_trip_and_lazy_row_ranges(tiny, local_store, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLAB_STAGING", str(tmp_path / "staging"))
    url = f"memory://replab-test/{tmp_path.name}/store"
    harvest(tiny, out=url, progress=False, **HARVEST)
    store = open_store(url)
    assert store.remote and store.path == url
    pd.testing.assert_frame_equal(store.index, local_store.index)
    assert json.loads(store.files.read("manifest.json")) == local_store.manifest
    hook = "blocks.2.attn.hook_z"
    arr, want = store.acts(hook), local_store.acts(hook)
    file_bytes = store.files.size(store._tensor(hook)["path"])
    before, n_req = store.files.bytes_read, len(store.files.requests)
    lo, hi = 17, 29
    got = arr[lo:hi]
    np.testing.assert_array_equal(got, want[lo:hi])
    row_bytes = want.shape[1] * want.dtype.itemsize
    header = file_bytes - want.shape[0] * row_bytes
    assert store.files.bytes_read - before == (hi - lo) * row_bytes          # those rows, nothing else
    assert store.files.requests[n_req:] == [("range", f"tensors/{hook}.npy", header + lo * row_bytes,
                                              header + hi * row_bytes)]
    assert (hi - lo) * row_bytes < file_bytes / 4
    before = store.files.bytes_read
    rows = [40, 3, 4, 5, 40]                 # any order, repeats: two runs of rows, two ranges
    np.testing.assert_array_equal(arr[rows], want[rows])
    assert store.files.bytes_read - before == 4 * row_bytes
    np.testing.assert_array_equal(np.asarray(arr), want)                    # and all of it, when asked
    np.testing.assert_array_equal(store.rows(hook, lo, hi), want[lo:hi])
    # and without replab, as docs/scaling.md shows: the header's length, then one byte range
    import fsspec
    from numpy.lib import format as npf

    fs, path = fsspec.core.url_to_fs(f"{url}/tensors/{hook}.npy")
    with fs.open(path, "rb") as f:
        npf.read_magic(f)
        shape, _, dtype = npf.read_array_header_1_0(f)
        offset = f.tell()
    row = shape[1] * dtype.itemsize
    raw = fs.cat_file(path, start=offset + lo * row, end=offset + hi * row)
    np.testing.assert_array_equal(np.frombuffer(raw, dtype).reshape(-1, shape[1]), want[lo:hi])
    assert not (tmp_path / "staging").exists() or not any((tmp_path / "staging").iterdir())


def test_file_url_is_a_local_store(tiny, local_store, tmp_path):
    harvest(tiny, out=f"file://{tmp_path}/viaurl", progress=False, **HARVEST)
    assert tree_digest(tmp_path / "viaurl") == tree_digest(local_store.path)
    assert not open_store(f"file://{tmp_path}/viaurl").remote


# ---------------------------------------------------------------- the experiment loop
def _sweep_tables(out):
    return {name: pd.read_parquet(out / f"{name}.parquet") for name in ("sweep", "per_prompt")}


@pytest.mark.slow
def test_cli_patch_sweep_ray_equals_local(cluster, tmp_path, capsys):
    args = ["patch", "sweep", "--model", "tiny", "--task", "next_day", "--site", "resid_pre",
            "--by", "layer,position", "--limit", "4", "--json"]
    code, _, err = run_cli([*args, "--out", tmp_path / "local"], capsys)
    assert code == 0, err
    code, out, err = run_cli([*args, "--engine", "ray", "--workers", "1", "--out", tmp_path / "ray"], capsys)
    assert code == 0, err
    local, ray_ = _sweep_tables(tmp_path / "local"), _sweep_tables(tmp_path / "ray")
    for name in local:
        pd.testing.assert_frame_equal(ray_[name], local[name], check_exact=True)
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["engine"] == {"engine": "ray", "workers": 1}


@pytest.mark.slow
def test_sweep_on_two_workers_with_a_killed_worker_equals_local(tiny, engine, tmp_path, monkeypatch):
    from replab.patching import load_task
    from replab.patching.sweeps import sweep

    marker = tmp_path / "crashed"
    monkeypatch.setenv("REPLAB_TEST_CRASH_ONCE", str(marker))       # reaches the workers as they start
    task = load_task("next_day", tiny.tokenizer, limit=4)
    local = sweep(tiny, task, site="resid_pre", by="layer,position", n_boot=200)
    ray_ = sweep(tiny, task, site="resid_pre", by="layer,position", n_boot=200, engine=engine)
    pd.testing.assert_frame_equal(ray_.table, local.table, check_exact=True)
    pd.testing.assert_frame_equal(ray_.per_prompt, local.per_prompt, check_exact=True)
    assert marker.exists(), "no worker died: the test did not test a retry"
    assert len(engine._pool) == 2


@pytest.mark.slow
def test_prune_on_ray_equals_local(tiny, engine):
    """Greedy pruning runs recordings (a candidate's residuals) and per-hook custom sources
    through the engine, one plan per step, on the same workers."""
    from replab.circuits.prune import prune_heads
    from replab.patching import load_task
    from replab.patching.task import PatchTask

    t = load_task("next_day", tiny.tokenizer, limit=4)
    cand = t.candidates.clone()
    cand[:, [0, 1]] = cand[:, [1, 0]]          # answer and foil swapped: a positive intact metric here
    task = PatchTask("flipped", t.clean, t.corrupt, t.foil, t.answer, cand, t.prompts, t.corrupt_prompts,
                     t.str_tokens)
    kw = dict(thresholds=(0.8,), orders=("greedy",), n_boot=50)
    local = prune_heads(tiny, task, **kw)
    ray_ = prune_heads(tiny, task, engine=engine, **kw)
    assert ray_.levels == local.levels
    pd.testing.assert_frame_equal(ray_.curves, local.curves, check_exact=True)
    pd.testing.assert_frame_equal(ray_.survival, local.survival, check_exact=True)
    assert ray_.summary["engine"]["engine"] == "ray" and local.summary["engine"] == {"engine": "local"}


@pytest.mark.slow
def test_plans_split_over_workers_equal_local(tiny, engine):
    """Edge patches, recordings and noise/resample sources, cut into many chunks (a small
    ``max_tokens``) and spread over both workers: every array equals the local engine's."""
    from replab.circuits.edges import edge_check_variants, edge_checks
    from replab.circuits.graph import edge_graph
    from replab.patching import Intervention, Variant, load_task
    from replab.patching.plan import run_plan

    task = load_task("next_day", tiny.tokenizer, limit=3)
    graph = edge_graph(tiny)
    names = graph.edge_names()
    edges = [Variant(graph.patches([i]), name=names[i]) for i in range(0, graph.n_edges, 7)]
    plain = [Variant((Intervention("z", layer, head=1, source=src, seed=3,
                                   scale=0.5 if src == "noise" else None),), name=f"{src}{layer}",
                     record=(f"blocks.{layer}.hook_resid_post",))
             for layer in range(tiny.cfg.n_layers) for src in ("clean", "noise", "resample", "mean")]
    for variants, kw in ((edges + edge_check_variants(graph), dict(base="clean", extra_checks=edge_checks)),
                         (plain, {})):
        local = run_plan(tiny, task, variants, max_tokens=64, n_boot=100, **kw)
        ray_ = run_plan(tiny, task, variants, max_tokens=64, n_boot=100, engine=engine, **kw)
        for field in ("clean", "corrupt", "patched", "candidates", "effect", "ci_low", "ci_high"):
            np.testing.assert_array_equal(getattr(ray_, field), getattr(local, field), err_msg=field)
        assert ray_.finals.equal(local.finals)
        assert ray_.recorded.keys() == local.recorded.keys()
        for vi, hooks in local.recorded.items():
            for name, value in hooks.items():
                assert ray_.recorded[vi][name].equal(value), (vi, name)
    # split="variants": every worker gets a share of the variants (other batches than the
    # local engine's), so the values agree to float rounding rather than bit for bit
    engine.split = "variants"
    try:
        dealt = run_plan(tiny, task, plain, n_boot=100, engine=engine)
    finally:
        engine.split = "chunks"
    np.testing.assert_allclose(dealt.patched, local.patched, rtol=1e-5, atol=1e-5)
    for vi, hooks in local.recorded.items():
        for name, value in hooks.items():
            np.testing.assert_allclose(dealt.recorded[vi][name], value, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_exact_edges_on_ray_equal_local(tiny, engine):
    from replab.circuits.edges import score_edges
    from replab.patching import load_task

    task = load_task("next_day", tiny.tokenizer, limit=3)
    local = score_edges(tiny, task, "exact", edges="all")
    ray_ = score_edges(tiny, task, "exact", edges="all", engine=engine)
    pd.testing.assert_frame_equal(ray_.table, local.table, check_exact=True)
    assert local.table["exact"].notna().all() and len(local.table) == 343


# ---------------------------------------------------------------- without Ray
@pytest.mark.parametrize("args", [
    ["harvest", "--model", "tiny", "--dataset", "next_day"],
    ["patch", "sweep", "--model", "tiny", "--task", "next_day"],
    ["circuit", "prune", "--model", "tiny", "--task", "next_day"],
    ["circuit", "edges", "--model", "tiny", "--method", "exact", "--edges", "all"],
])
def test_engine_ray_without_ray_is_one_line(args, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)            # `import ray` raises ImportError
    code, _, err = run_cli([*args, "--engine", "ray", "--out", tmp_path / "x"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert "pip install 'replab[ray]'" in lines[0]


def test_engine_names_are_checked(tiny, tmp_path):
    from replab.patching.executors import make_engine

    with pytest.raises(ReplabError, match="unknown engine"):
        make_engine("spark")
    with pytest.raises(ReplabError, match="unknown engine"):
        harvest(tiny, out=tmp_path / "x", progress=False, engine="dask", **HARVEST)
    with pytest.raises(ReplabError, match="--engine ray"):
        harvest(tiny, out=tmp_path / "x", progress=False, workers=2, **HARVEST)
    with pytest.raises(ReplabError, match="--engine ray"):
        make_engine("local", address="auto")


@pytest.mark.parametrize("args", [
    ["harvest", "--dataset", "next_day"],
    ["circuit", "prune", "--task", "next_day"],
    ["circuit", "edges", "--method", "exact", "--edges", "all"],
])
def test_workers_without_ray_engine_fail_before_the_model_loads(args, tmp_path, capsys):
    """--workers / --address without --engine ray: one line, before the model (here a missing
    directory, which would fail with another message) is touched."""
    code, _, err = run_cli([*args, "--model", str(tmp_path / "no-such-model"), "--workers", "2",
                            "--out", tmp_path / "x"], capsys)
    assert code == 2 and err.startswith("error:") and "--engine ray" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()

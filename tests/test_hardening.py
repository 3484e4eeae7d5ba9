"""Issue 11 items that need more than one CLI call: resume integrity, NaN at harvest time,
user files with an ``entity`` column, containment of every artifact kind, and scikit-learn's
own estimator checks for the probes."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from replab_testutil import run_cli, tree_digest

from replab.errors import ReplabError
from replab.harvesting import harvest

# ------------------------------------------------------------------ resume (item 4)


def _interrupt_after(monkeypatch, n_batches: int):
    """Make the harvest's forward raise KeyboardInterrupt at batch ``n_batches`` (as Ctrl-C
    would); the first call is the width dry run."""
    from replab.harvesting import run as hr

    real, calls = hr._forward, {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n_batches + 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(hr, "_forward", forward)
    return lambda: monkeypatch.setattr(hr, "_forward", real)


def test_resume_rechecks_journalled_batches(tiny, tmp_path, monkeypatch):
    """Rows of a finished batch edited on disk after an interruption are recomputed on resume
    (before: they survived, and `store verify` passed because checksums were taken at the end)."""
    kw = dict(hooks="resid_post", layers="0-1", positions="last", batch_size=8, progress=False)
    harvest(tiny, "next_day", out=tmp_path / "ref", **kw)
    out = tmp_path / "s"
    restore = _interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        harvest(tiny, "next_day", out=out, **kw)
    restore()
    journal = json.loads((out / "_progress.json").read_text())
    assert journal["batches_done"] == 4 and [b["rows"] for b in journal["batches"]][:2] == [[0, 8], [8, 16]]
    assert all(len(b["sha256"]) == 64 for b in journal["batches"])
    victim = np.load(out / "tensors" / "blocks.1.hook_resid_post.npy", mmap_mode="r+")
    victim[9, :] = 123.0                      # a row of batch 1, already vouched for
    victim.flush()
    del victim
    with pytest.warns(UserWarning, match=r"batch 1 on disk does not match its journal checksum"):
        harvest(tiny, "next_day", out=out, **kw)
    assert tree_digest(out) == tree_digest(tmp_path / "ref")


def test_tensor_data_is_fsynced_before_the_journal_vouches_for_it(tiny, tmp_path, monkeypatch):
    from replab.store import writer as w

    events = []
    real_fsync, real_journal = os.fsync, w.write_json_atomic

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def journal(path, data, **kw):
        if Path(path).name == "_progress.json":
            events.append(("journal", data["batches_done"]))
        return real_journal(path, data, **kw)

    monkeypatch.setattr(w.os, "fsync", fsync)
    monkeypatch.setattr(w, "write_json_atomic", journal)
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]
    harvest(tiny, "next_day", hooks=hooks, batch_size=16, out=tmp_path / "s", progress=False)
    journals = [i for i, e in enumerate(events) if e[0] == "journal"]
    assert [events[i][1] for i in journals] == list(range(len(journals)))       # 0, 1, 2, ...
    for prev, cur in zip(journals, journals[1:], strict=False):
        synced = {Path(p).name for kind, p in events[prev + 1:cur] if kind == "fsync" and p.endswith(".npy")}
        assert synced == {f"{h}.npy" for h in hooks}, (events[prev:cur + 1])


# ---------------------------------------------------------- NaN at harvest time (item 3)


@pytest.fixture()
def fresh_tiny():
    from replab.models import load_model

    m = load_model("tiny", device="cpu")
    yield m
    m.reset_hooks(including_permanent=True)


def test_harvest_refuses_nan_from_the_model(fresh_tiny, people_jsonl, tmp_path):
    def poison(act, hook):
        if act.shape[0] > 1:                  # not the one-prompt width dry run
            act[1] = float("nan")
        return act

    fresh_tiny.add_hook("blocks.1.hook_mlp_out", poison, is_permanent=True)
    with pytest.raises(ReplabError, match=r"blocks\.1\.hook_resid_post: NaN or inf activations in store row 1 "
                                          r"\(batch 0\); the model produced them"):
        harvest(fresh_tiny, people_jsonl, hooks="resid_post", batch_size=2, out=tmp_path / "s", progress=False)
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_float16_overflow_says_use_float32(fresh_tiny, people_jsonl, tmp_path):
    fresh_tiny.add_hook("blocks.0.hook_resid_post", lambda act, hook: act * 1e6, is_permanent=True)
    with pytest.raises(ReplabError, match=r"overflow float16; harvest with --dtype float32"):
        harvest(fresh_tiny, people_jsonl, layers="0", dtype="float16", out=tmp_path / "s", progress=False)


def test_leace_and_probes_refuse_nan_arrays():
    """The estimators themselves (scikit-learn validation) and the LEACE path never see NaN
    silently; a store's NaN is stopped earlier, naming hook and rows (test_adversarial)."""
    from replab.probes import LogisticProbe, MeanDiffProbe

    X = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    X[3, 1] = np.nan
    y = np.arange(20) % 2
    for est in (LogisticProbe(), MeanDiffProbe()):
        with pytest.raises(ValueError, match="NaN"):
            est.fit(X, y)


# ------------------------------------------------------------- entity column (item 6)


def _people_file(path: Path) -> Path:
    people = {"artist": ["Pablo Picasso", "Claude Monet", "Frida Kahlo", "Vincent van Gogh"],
              "scientist": ["Marie Curie", "Albert Einstein", "Isaac Newton", "Charles Darwin"],
              "writer": ["Jane Austen", "Mark Twain", "Leo Tolstoy", "Virginia Woolf"]}
    templates = {"famous": "{} is a famous", "known": "Everyone knows that {} was a",
                 "profession": "By profession, {} was a"}
    rows = [{"prompt": t.format(name), "superclass": sc, "entity": name, "template": tid}
            for tid, t in templates.items() for sc, names in people.items() for name in names]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_user_file_entity_column_groups_folds_and_control(tiny, tmp_path, capsys):
    """Acceptance: a user JSONL with prompt, superclass, entity, template columns;
    `probe train --label superclass --split-by template` gives held-out-template scores AND
    selectivity with no extra flag, and the summary says which column grouped what."""
    from replab.prompts import load_prompts

    data = _people_file(tmp_path / "people.jsonl")
    ps = load_prompts(str(data))
    assert ps.meta["group_source"] == "entity" and (ps.rows["group"] == ps.rows["entity"]).all()
    harvest(tiny, data, hooks="resid_post", layers="2-3", positions="entity_last", out=tmp_path / "S",
            progress=False)
    code, out, err = run_cli(["probe", "train", "--store", tmp_path / "S", "--label", "superclass",
                              "--split-by", "template", "--no-erase", "--json", "--out", tmp_path / "run"],
                             capsys)
    assert code == 0, err
    recs = json.loads(out)["records"]
    assert all(r["heldout_accuracy"] is not None and r["selectivity"] is not None for r in recs)
    data_info = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]
    assert data_info["split_column"] == "template" and data_info["control_types"] == "group"
    assert data_info["control_source"] == "the prompt file's 'entity' column (as 'group')"
    # the default --split-by entity uses the people, as for the builtin superset
    code, out, err = run_cli(["probe", "train", "--store", tmp_path / "S", "--label", "superclass",
                              "--no-erase", "--no-controls", "--out", tmp_path / "run2"], capsys)
    assert code == 0, err
    assert "folds by group (the prompt file's 'entity' column (as 'group'))" in out


def test_old_store_without_group_falls_back_to_entity(tmp_path):
    """A store harvested before `group` was filled from `entity` (group all empty) still
    splits by entity under the default --split-by entity."""
    import pandas as pd

    from replab.probes.splits import split_column, type_column

    index = pd.DataFrame({"group": [""] * 6, "entity": list("aabbcc"), "template": list("xyxyxy")})
    assert split_column(index, "entity") == "entity" and type_column(index) == "entity"
    index["group"] = list("aabbcc")
    assert split_column(index, "entity") == "group"


# ------------------------------------------------- containment of other artifacts (item 2)


def test_direction_index_entries_stay_inside(tmp_path):
    from replab.probes.directions import Direction, load_directions

    folder = tmp_path / "run" / "directions"
    Direction(vector=np.ones(4), hook="blocks.0.hook_resid_post", layer=0, position="last", label="y",
              positive_class="a", classes=["a", "b"], kind="logistic", model={}).save(tmp_path / "outside")
    folder.mkdir(parents=True)
    index = {"best_layer": 0, "layers": [0], "kinds": ["logistic"],
             "entries": [{"file": "../../outside.json", "kind": "logistic", "layer": 0, "class": "a",
                          "shuffled": False}]}
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(ReplabError, match=r"'\.\./\.\./outside\.json' points outside the directory"):
        load_directions(tmp_path / "run")
    index["entries"][0]["file"] = str(tmp_path / "outside.json")
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(ReplabError, match=r"is not a path inside the directory"):
        load_directions(tmp_path / "run")


def test_lens_and_sae_directories_refuse_symlinks_out(tmp_path):
    from replab.features.sae import artifact as sae
    from replab.lenses import cache as lens

    for mod, names in ((lens, (lens.CONFIG, lens.SAFETENSORS, lens.META)), (sae, (sae.CFG, sae.WEIGHTS, sae.META))):
        d = tmp_path / mod.__name__.rsplit(".", 1)[-1]
        d.mkdir()
        for name in names:
            (d / name).write_text("{}")
        secret = tmp_path / "secret.bin"
        secret.write_text("x")
        (d / names[1]).unlink()
        (d / names[1]).symlink_to(secret)
        check = lens.check_lens_dir if mod is lens else sae.read_meta
        with pytest.raises(ReplabError, match="points outside the directory"):
            check(d)


# -------------------------------------------------------------- scikit-learn's checks


@pytest.mark.parametrize("name", ["LogisticProbe", "LowRankProbe", "MeanDiffProbe"])
def test_check_estimator_passes_completely(name):
    """Every check of `sklearn.utils.estimator_checks.check_estimator` passes (the only
    one reported as skipped is the array-API check, which scikit-learn skips unless
    SCIPY_ARRAY_API is set; the probes do not claim array-API support)."""
    from sklearn.utils.estimator_checks import check_estimator

    import replab.probes as P

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(getattr(P, name)(), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert not failed
    assert len(results) >= 50
    assert {r["check_name"] for r in results if r["status"] == "skipped"} <= {"check_array_api_input"}


def test_low_rank_probe_at_full_rank_scores_like_a_classifier():
    """LowRankProbe declares ``poor_score`` (rank 1 cannot separate 3 classes); at rank
    K - 1 it must pass the training-accuracy bar scikit-learn's check uses (> 0.83)."""
    from sklearn.datasets import make_blobs
    from sklearn.preprocessing import StandardScaler
    from sklearn.utils import shuffle

    from replab.probes import LowRankProbe

    X, y = make_blobs(n_samples=300, random_state=0)
    X, y = shuffle(X, y, random_state=7)
    X = StandardScaler().fit_transform(X)
    assert (LowRankProbe(rank=2).fit(X, y).predict(X) == y).mean() > 0.83
    assert LowRankProbe().__sklearn_tags__().classifier_tags.poor_score


def test_probe_errors_are_value_errors_and_replab_errors():
    from replab.probes import LogisticProbe

    with pytest.raises(ReplabError, match="at least 2 classes") as exc:
        LogisticProbe().fit(np.zeros((4, 3)), ["a"] * 4)
    assert isinstance(exc.value, ValueError)
    fitted = LogisticProbe(lam=0.1).fit(np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2)
    assert fitted.n_features_in_ == 3 and fitted.decision_function(np.zeros((2, 3))).shape == (2,)
    with pytest.raises(ValueError, match="3 features"):
        fitted.predict(np.zeros((2, 4)))


# ------------------------------------------------------------ README API (item 7)


def test_top_level_functions_stay_callable_after_their_subpackages_are_imported():
    """`replab.harvest` was a lazy function and a subpackage of the same name: importing the
    subpackage replaced the function (`TypeError: 'module' object is not callable` on the
    second call). The static rule is tests/test_architecture.py's name-clash test (main)."""
    import importlib

    import replab

    for name, sub in (("harvest", "replab.harvesting"), ("open_store", "replab.store"),
                      ("load_model", "replab.models")):
        first = getattr(replab, name)
        importlib.import_module(sub)
        assert callable(getattr(replab, name)) and getattr(replab, name) is first, name

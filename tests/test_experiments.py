"""``replab run``: stage caching, resume, --force, replay from config.yaml, the report and
``replab runs``; on the tiny model with the quick ``lenses`` experiment (about 20 s once)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from experiment_testutil import assert_complete, numbers
from replab_testutil import run_cli
from report_browser import check_report

from replab.errors import ReplabError
from replab.experiments import get_experiment, list_runs, run_experiment, show_run
from replab.experiments.report import fmt, lookup

#: what legitimately differs between two runs of one config: paths in commands, times
VOLATILE = ("command", "lens_path", "train_seconds")


@pytest.fixture(scope="module")
def lens_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "lenses"
    summary = run_experiment("lenses", model="tiny", quick=True, out=out, progress=False)
    return out, summary


def test_run_directory_is_complete(lens_run):
    out, s = lens_run
    config = assert_complete(out, "lenses", s)                                    # every default written out
    assert config["profile"] == "quick" and config["model"] == "tiny"
    assert config["options"]["limit"] == 8                                          # the quick profile
    prov = s["provenance"]
    assert prov["model"]["weights_sha256"] and "config_sha256" in prov["model"]     # None for the random tiny model
    assert prov["packages"]["torch"] and prov["seeds"] == {"seed": 0}
    assert (out / "logit_lens" / "trajectory.png").is_file() and (out / "logit_lens" / "trajectory.svg").is_file()


def test_every_report_number_comes_from_the_summary(lens_run):
    out, s = lens_run
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html          # nothing fetched
    assert html.count("data:image/png;base64,") >= 4
    import html as html_lib
    import re

    spans = re.findall(r'data-key="([^"]+)" data-value="[^"]*" data-spec="([^"]*)">([^<]*)</span>', html)
    assert len(spans) >= 10
    for key, spec, shown in spans:     # the page's text is the summary's value, formatted
        assert html_lib.unescape(shown) == fmt(lookup(s, key), html_lib.unescape(spec) or None), key


def test_second_run_reuses_every_stage_and_force_recomputes(lens_run, tmp_path):
    out, first = lens_run
    again = run_experiment("lenses", model="tiny", quick=True, out=out, progress=False)
    assert all(t["reused"] for t in again["provenance"]["stages"])
    assert numbers(again, VOLATILE) == numbers(first, VOLATILE)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    forced = run_experiment("lenses", model="tiny", quick=True, out=copy, force=True, progress=False)
    assert not any(t["reused"] for t in forced["provenance"]["stages"])
    assert numbers(forced, VOLATILE) == numbers(first, VOLATILE)


def test_replay_from_config_reproduces_the_summary(lens_run, tmp_path, capsys):
    out, first = lens_run
    code, stdout, err = run_cli(["run", "--config", out / "config.yaml", "--out", tmp_path / "replay", "--json"],
                                capsys)
    assert code == 0, err
    assert json.loads(stdout)["experiment"] == "lenses"
    replay = json.loads((tmp_path / "replay" / "summary.json").read_text())
    assert not any(t["reused"] for t in replay["provenance"]["stages"])
    assert numbers(replay, VOLATILE) == numbers(first, VOLATILE)


def test_changed_option_recomputes_that_stage_and_after(lens_run, tmp_path):
    out, _ = lens_run
    copy = tmp_path / "c"
    shutil.copytree(out, copy)
    s = run_experiment("lenses", model="tiny", quick=True, out=copy, options={"eval_tokens": 128}, progress=False)
    reused = {t["stage"]: t["reused"] for t in s["provenance"]["stages"]}
    assert reused == {"logit_lens": True, "tuned_lens_train": True, "tuned_lens": True, "heldout_kl": False}
    assert s["stages"]["heldout_kl"]["tokens"] == 128
    s = run_experiment("lenses", model="tiny", quick=True, out=copy, options={"limit": 4}, progress=False)
    assert not any(t["reused"] for t in s["provenance"]["stages"])       # an upstream change invalidates later


def test_interrupted_run_resumes_at_the_first_unfinished_stage(lens_run, tmp_path, monkeypatch):
    import replab.experiments.lens_comparison as lc
    from replab.experiments.spec import Stage

    out, first = lens_run
    copy = tmp_path / "r"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "tuned_lens")
    shutil.rmtree(copy / "heldout_kl")
    exp = get_experiment("lenses")
    boom = Stage("heldout_kl", "boom", lambda ctx: (_ for _ in ()).throw(KeyboardInterrupt()),
                 exp.stage("heldout_kl").keys)
    broken = type(exp)(**{**exp.__dict__, "stages": exp.stages[:3] + (boom,)})
    monkeypatch.setitem(lc.__dict__, "EXPERIMENT", broken)
    monkeypatch.setitem(__import__("replab.experiments.catalog", fromlist=["x"]).EXPERIMENTS, "lenses", broken)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("lenses", model="tiny", quick=True, out=copy, progress=False)
    assert not (copy / "summary.json").exists()                          # never looks complete
    assert (copy / "tuned_lens" / "stage.json").is_file()
    assert show_run(copy)["status"] == "incomplete"
    monkeypatch.undo()
    s = run_experiment("lenses", model="tiny", quick=True, out=copy, progress=False)
    assert [t["reused"] for t in s["provenance"]["stages"]] == [True, True, True, False]
    assert numbers(s, VOLATILE) == numbers(first, VOLATILE)


def test_runs_list_and_show(lens_run, capsys):
    out, s = lens_run
    df = list_runs(out.parent)
    row = df[df["run"] == str(out)].iloc[0]
    assert row["experiment"] == "lenses" and row["status"] == "complete" and row["model"] == s["model"]["name"]
    code, stdout, _ = run_cli(["runs", "show", out, "--json"], capsys)
    assert code == 0
    shown = json.loads(stdout)
    assert shown["headline"] == s["headline"] and shown["report"].endswith("report.html")
    code, stdout, _ = run_cli(["runs", "list", out.parent, "--json"], capsys)
    assert code == 0 and any(r["run"] == str(out) for r in json.loads(stdout)["records"])


@pytest.mark.parametrize("args, message", [
    (["run", "no-such"], "unknown experiment"),
    (["run"], "name an experiment"),
    (["run", "lenses", "--set", "nope=1"], "unknown option"),
    (["run", "lenses", "--set", "limit"], "KEY=VALUE"),
    (["runs", "show", "/nonexistent/run"], "not an experiment run"),
    (["runs", "list", "/nonexistent/dir"], "no such directory"),
])
def test_bad_input_is_one_line(args, message, capsys, tmp_path):
    code, _, err = run_cli(args + (["--out", tmp_path / "x"] if args[0] == "run" and len(args) > 1 else []), capsys)
    assert code == 2 and err.startswith("error:") and message in err and err.count("\n") == 1, err


def test_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "config.yaml"
    bad.write_text("experiment: lenses\n")
    with pytest.raises(ReplabError, match="not an experiment config"):
        run_experiment(config=bad)
    bad.write_text("{{{")
    code, _, err = run_cli(["run", "--config", bad], capsys)
    assert code == 2 and "not valid YAML" in err
    other = tmp_path / "o.yaml"
    other.write_text(yaml.safe_dump({"experiment": "lenses", "options": {}}))
    with pytest.raises(ReplabError, match="not 'superset'"):
        run_experiment("superset", config=other)


def test_report_in_a_browser(lens_run, tmp_path):
    out, _ = lens_run
    checked = check_report(out, tmp_path / "screenshots")
    assert checked["images"] >= 4 and checked["numbers"] >= 10

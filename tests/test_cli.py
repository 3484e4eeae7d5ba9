"""CLI conventions: one-line errors with exit code 2, --json, examples in --help."""

import json

import pytest
from replab_testutil import run_cli

from replab.cli import app


def _pairs_of_different_length(tmp_path):
    path = tmp_path / "bad_pairs.jsonl"
    path.write_text(json.dumps({"prompt": "The capital of France is", "answer": " Paris",
                                "corrupt_prompt": "The capital of the United Kingdom is"}) + "\n")
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return path


@pytest.mark.parametrize("case, args, needle", [
    ("model", ["--model", "no-such-org/no-such-model", "--dataset", "next_day"], "unknown model"),
    ("hook", ["--model", "tiny", "--dataset", "next_day", "--hooks", "resid_sideways"], "unknown hook"),
    ("layer", ["--model", "tiny", "--dataset", "next_day", "--layers", "99"], "out of range"),
    ("dataset", ["--model", "tiny", "--dataset", "no_such_set"], "no_such_set"),
    ("label", ["--model", "tiny", "--dataset", "next_day", "--positions", "nolabel_last"], "nolabel"),
    ("dtype", ["--model", "tiny", "--dataset", "next_day", "--dtype", "int8"], "dtype"),
    ("empty", ["--model", "tiny", "--dataset", "EMPTY"], "empty"),
    ("pairs", ["--model", "tiny", "--dataset", "BADPAIRS"], "length"),
])
def test_harvest_user_errors(case, args, needle, tmp_path, capsys):
    args = [str(_empty(tmp_path)) if a == "EMPTY" else a for a in args]
    args = [str(_pairs_of_different_length(tmp_path)) if a == "BADPAIRS" else a for a in args]
    out = tmp_path / "store"
    code, stdout, stderr = run_cli(["harvest", *args, "--out", out], capsys)
    assert code == 2, (case, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert needle in lines[0].lower() or needle in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert not (out / "manifest.json").exists()


def test_store_info_on_missing_dir(tmp_path, capsys):
    code, _, stderr = run_cli(["store", "info", tmp_path / "nope"], capsys)
    assert code == 2 and "no such store" in stderr


def test_datasets_list_json(capsys):
    code, stdout, _ = run_cli(["datasets", "list", "--json"], capsys)
    assert code == 0
    names = {row["name"] for row in json.loads(stdout)}
    assert {"next_day", "superset", "sequence_types", "fact_recall"} <= names


def test_harvest_json_and_store_info(tmp_path, capsys):
    out = tmp_path / "s"
    code, stdout, _ = run_cli(["harvest", "--model", "tiny", "--dataset", "next_day",
                               "--layers", "0-1", "--out", out, "--json"], capsys)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["n_rows"] == summary["n_prompts"] and summary["hooks"] == 2
    code, stdout, _ = run_cli(["store", "info", out, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["model"] == "tiny"


def _commands(group, prefix=()):
    import typer.main

    click_group = typer.main.get_command(group)
    stack = [(prefix, click_group)]
    while stack:
        path, cmd = stack.pop()
        subs = getattr(cmd, "commands", None)
        if subs:
            stack.extend(((*path, name), sub) for name, sub in subs.items())
        else:
            yield path


@pytest.mark.parametrize("path", sorted(_commands(app)))
def test_every_command_has_an_example(path, capsys):
    code, stdout, _ = run_cli([*path, "--help"], capsys)
    assert code == 0
    assert "Examples" in stdout and "$ replab" in stdout, path


def test_progress_rate_column_keeps_slow_rates_readable():
    from types import SimpleNamespace

    from replab._progress import RateColumn

    col = RateColumn("step")
    render = lambda v: str(col.render(SimpleNamespace(finished_speed=None, speed=v)))  # noqa: E731
    assert render(None) == "?" and render(0.46) == "0.46 step/s" and render(0.02) == "1.2 step/min"
    assert render(9822) == "9,822 step/s"

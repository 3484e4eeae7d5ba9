"""Checks shared by the ``replab run`` experiment tests: a complete run directory, and every
stage's printed ``replab ...`` command is a real command whose flags exist."""

from __future__ import annotations

import json
import shlex

import yaml

from replab.experiments import get_experiment


def command_parses(command: str) -> None:
    """``command`` (one ``replab ...`` line) names a real command and every flag exists: click
    parses it (types converted, required arguments present) without running it."""
    import typer

    from replab.cli import app

    args = shlex.split(command)
    assert args[0] == "replab", command
    cmd, args, ctx = typer.main.get_command(app), args[1:], None
    while hasattr(cmd, "get_command"):                        # a group: descend (typer vendors its own click)
        ctx = cmd.context_class(cmd, parent=ctx, info_name=cmd.name)
        cmd, args = cmd.get_command(ctx, args[0]), args[1:]
        assert cmd is not None, command
    cmd.make_context(cmd.name, list(args), parent=ctx)


def assert_complete(out, name: str, summary: dict) -> dict:
    """config.yaml (every option written out), summary.json, report.html; one stage.json per stage
    holding the stage's result; every stage's command (``a && b`` for several) parses; every
    figure a PNG with its SVG. Returns the config."""
    exp = get_experiment(name)
    for f in ("config.yaml", "summary.json", "report.html"):
        assert (out / f).is_file(), f
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["experiment"] == name and set(config["options"]) == set(exp.defaults)
    assert [t["stage"] for t in summary["provenance"]["stages"]] == [s.name for s in exp.stages]
    for st in exp.stages:
        result = summary["stages"][st.name]
        assert json.loads((out / st.name / "stage.json").read_text())["result"] == result
        for command in result["command"].split(" && "):
            command_parses(command)
        for fig in result.get("figures", []):
            assert (out / fig).is_file() and (out / fig).with_suffix(".svg").is_file(), fig
    assert summary["model"]["weights_sha256"]
    return config


def numbers(summary: dict, volatile=("command",), with_model: bool = True) -> dict:
    """What must not change between two runs of one config: the headline, the stage results
    without the ``volatile`` keys (commands hold the run directory; times), the options and
    (``with_model``) the model identity."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in volatile}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    out = {"headline": summary["headline"], "stages": strip(summary["stages"]),
           "options": summary["config"]["options"]}
    return {**out, "model": summary["model"]} if with_model else out

"""Every ``replab ...`` command in the README's shell blocks, parsed exactly as written by the
CLI itself: the command exists and every option and value it gives is accepted (nothing is run;
the Python API block runs in tests/test_readme_api.py, the workflows in the experiment tests)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text()
    cmds = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, re.S):
        variables = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            assignment = re.fullmatch(r"([A-Z_]+)=(.*)", line)
            if assignment:                      # VAR="..." used later in the block as $VAR
                variables[assignment[1]] = shlex.split(assignment[2])[0] if assignment[2] else ""
                continue
            for name, value in variables.items():
                line = re.sub(rf"\${name}\b", value, line)
            if line.startswith("$ "):
                line = line[2:]
            if line.startswith("replab "):
                cmds.append(line)
    return cmds


def _strip_comment(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def test_the_readme_has_commands():
    assert len(readme_commands()) > 40


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_parses_as_written(line):
    from replab.cli import app

    args = _strip_comment(line)[1:]
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("replab", list(args), resilient_parsing=False)
    with ctx:
        while hasattr(cmd, "resolve_command"):          # a group (typer ships its own click)
            pending = list(getattr(ctx, "protected_args", None) or getattr(ctx, "_protected_args", [])) + ctx.args
            name, sub, rest = cmd.resolve_command(ctx, pending)
            cmd = sub
            ctx = sub.make_context(name, rest, parent=ctx)
        assert ctx.command is cmd and not ctx.args     # parsed: every option known, every value converted


@pytest.mark.parametrize("line", ["replab run lenses --nope 1", "replab circuit nosuch", "replab harvest --layers",
                                  "replab patch sweep --max-tokens notanumber"])
def test_a_wrong_command_fails_to_parse(line):
    with pytest.raises(Exception, match="(?i)no such|requires an argument|not a valid"):
        test_readme_command_parses_as_written(line)

"""The README's "Python API" block, parsed out of README.md (so it stays in sync) and run
exactly as written on the default model (SmolLM2), in a scratch working directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_block() -> str:
    """The one ```python block of the README's "## Python API" section."""
    section = README.read_text().split("\n## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"expected one python block in the Python API section, found {len(blocks)}"
    return blocks[0]


#: the only edits the fast variant makes: the tiny model for the default one, and layer
#: numbers folded into the tiny model's 4 layers (``blocks.14.`` -> ``blocks.2.``,
#: ``layer=20`` -> ``layer=0``, ``layers="14,20"`` -> ``layers="2,0"``,
#: ``Intervention("z", 23`` -> ``Intervention("z", 3``).
TINY_LAYERS = 4
TINY_EDITS = (
    (r"replab\.load_model\(\)", lambda m: 'replab.load_model("tiny")'),
    (r"blocks\.(\d+)\.", lambda m: f"blocks.{int(m[1]) % TINY_LAYERS}."),
    (r"\blayer=(\d+)", lambda m: f"layer={int(m[1]) % TINY_LAYERS}"),
    (r'\blayers="(\d+),(\d+)"', lambda m: f'layers="{int(m[1]) % TINY_LAYERS},{int(m[2]) % TINY_LAYERS}"'),
    (r"Intervention\((\"\w+\"), (\d+)", lambda m: f"Intervention({m[1]}, {int(m[2]) % TINY_LAYERS}"),
)


def tiny_block() -> str:
    code = python_api_block()
    assert code.count("replab.load_model()") == 1, "README Python API: expected one replab.load_model()"
    for pattern, repl in TINY_EDITS:
        code = re.sub(pattern, repl, code)
    return code


def _run(code: str, cwd: Path) -> dict:
    ns: dict = {"__name__": "readme_python_api"}
    exec(compile(code, "README.md (Python API)", "exec"), ns)
    assert ns["store"].n_rows > 0 and (cwd / "runs" / "superset" / "manifest.json").exists()
    assert 0 <= ns["run"].best_layer < ns["model"].cfg.n_layers
    assert (cwd / "runs" / "superset_probe" / "summary.json").exists()
    assert isinstance(ns["res"].summary.verdict, str) and ns["res"].summary.verdict
    return ns


def test_readme_python_api_runs_on_the_tiny_model(tmp_path, monkeypatch):
    """Fast: the block with only :data:`TINY_EDITS` applied, on the tiny random model."""
    monkeypatch.chdir(tmp_path)
    _run(tiny_block(), tmp_path)


@pytest.mark.integration
@pytest.mark.slow
def test_readme_python_api_runs_as_written(tmp_path, monkeypatch):
    """The block exactly as written, on SmolLM2 (harvests the superset, trains the probe
    sweep, scans and patches: minutes)."""
    monkeypatch.chdir(tmp_path)                      # its runs/... paths land in a scratch dir
    ns = _run(python_api_block(), tmp_path)
    assert ns["model"].cfg.n_layers == 30

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


def test_the_block_is_found_and_compiles():
    code = python_api_block()
    compile(code, "README.md (Python API)", "exec")
    assert "replab.load_model()" in code and "replab.harvest(" in code


@pytest.mark.integration
@pytest.mark.slow
def test_readme_python_api_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # its runs/... paths land in a scratch dir
    ns: dict = {"__name__": "readme_python_api"}
    exec(compile(python_api_block(), "README.md (Python API)", "exec"), ns)
    store, run = ns["store"], ns["run"]
    assert store.n_rows > 0 and (tmp_path / "runs" / "superset" / "manifest.json").exists()
    assert 0 <= run.best_layer < ns["model"].cfg.n_layers
    assert (tmp_path / "runs" / "superset_probe" / "summary.json").exists()
    assert isinstance(ns["res"].summary["verdict"], str) and ns["res"].summary["verdict"]

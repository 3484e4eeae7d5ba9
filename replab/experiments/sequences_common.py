"""Small helpers shared by the ``sequences`` experiment's stage modules."""

from __future__ import annotations

import shlex


def task_name(c: dict, types: str | None = None) -> str:
    """The sequence task of the experiment's config ``c`` (``sequences:TYPES/CORRUPTION``)."""
    return f"sequences:{types or c['types']}/{c['corruption']}"


def model_flag(ctx) -> str:
    """`` --model NAME`` when the run is not on the default model."""
    return f" --model {ctx.model_name}" if ctx.model_name else ""


def run_command(summary: dict, out, ctx) -> str:
    """The library run's own ``replab circuit ...`` line (its config.yaml), with ``--out``."""
    line = summary["config"]["command"]
    if ctx.model_name and "--model" not in line:
        line += model_flag(ctx)
    return f"{line} --out {shlex.quote(str(out))}"


def items(spec) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [x.strip() for x in str(spec or "").split(",") if x.strip()]

"""Small helpers shared by the ``sequences`` experiment's stage modules."""

from __future__ import annotations

import shlex


def task_name(c: dict, types: str | None = None) -> str:
    """The sequence task of the experiment's config ``c`` (``sequences:TYPES/CORRUPTION``)."""
    return f"sequences:{types or c['types']}/{c['corruption']}"


#: circuit heads listed in summary.json (every one is in the stages' tables)
MAX_ROWS = 30


def run_command(summary: dict, out) -> str:
    """The library run's own ``replab circuit ...`` line (its config.yaml: it names a non-default
    model itself), with ``--out``."""
    return f"{summary['config']['command']} --out {shlex.quote(str(out))}"


def items(spec) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [x.strip() for x in str(spec or "").split(",") if x.strip()]

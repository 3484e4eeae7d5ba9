"""The experiment report: one self-contained HTML file rendered with jinja2.

Figures are embedded as data URIs and the CSS is inline, so ``report.html`` opens anywhere
without replab and without a network. The narrative is the experiment's
:meth:`~replab.experiments.spec.Experiment.narrative` of ``summary.json``; every number in it is
written by :func:`num`, which marks it with the ``summary.json`` key it comes from
(``<span class="num" data-key="headline.first_top1_layer" data-value="17">17</span>``), so a
test can check the page against the file.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import jinja2
from markupsafe import Markup, escape

from replab.errors import ReplabError
from replab.io import write_text_atomic

_TEMPLATES = Path(__file__).parent / "templates"


def lookup(summary: dict, key: str):
    """The value at a dotted ``key`` of ``summary`` (list items by index)."""
    value = summary
    for part in key.split("."):
        if isinstance(value, list):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise ReplabError(f"the report asks for {key!r}, which summary.json does not have")
    return value


def fmt(value, spec: str | None = None) -> str:
    """Text of a number as the report shows it (``spec``: a format spec such as ``.2f``, ``.0%``)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and spec is None:
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float) and spec is None:
        return "n/a" if math.isnan(value) else f"{value:.3g}"
    return format(value, spec) if spec else str(value)


def num(summary: dict, key: str, spec: str | None = None) -> Markup:
    """The number at ``key`` of ``summary``, formatted, marked with its key, raw value and format
    (so a test can re-format the summary's value and compare it with the page's text)."""
    value = lookup(summary, key)
    raw = json.dumps(value)
    return Markup('<span class="num" data-key="{}" data-value="{}" data-spec="{}">{}</span>').format(
        key, raw, spec or "", fmt(value, spec))


def text(template: str, summary: dict) -> Markup:
    """A sentence with numbers: ``text("first top-1 at layer {headline.layer}", s)`` puts
    :func:`num` of each ``{dotted.key}``; a format goes after a colon (``{headline.frac:.0%}``,
    ``{stages.dla.top_head_dla:+.2f}``). Inside an f-string double the braces:
    ``f"{{stages.rows.{i}.kl:.3f}}"``."""
    out, rest = [], template
    while "{" in rest:
        before, _, after = rest.partition("{")
        field, _, rest = after.partition("}")
        key, _, spec = field.partition(":")
        out.append(escape(before))
        out.append(num(summary, key, spec or None))
    out.append(escape(rest))
    return Markup("").join(out)


def _data_uri(path: Path) -> str:
    kind = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg"}.get(path.suffix.lower())
    if kind is None:
        raise ReplabError(f"cannot embed {path} in the report (PNG, SVG or JPEG)")
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def _table(rows: list[dict]) -> dict:
    cols = list(rows[0]) if rows else []
    return {"columns": cols, "rows": [[fmt(r.get(c)) if not isinstance(r.get(c), str) else r.get(c)
                                       for c in cols] for r in rows]}


def render_report(exp, summary: dict, run_dir) -> str:
    """The report's HTML (see the module docstring)."""
    run_dir = Path(run_dir)
    sections = []
    for sec in exp.narrative(summary):
        figs = []
        for rel in sec.figures:
            path = (run_dir / rel).resolve()
            if not path.is_relative_to(run_dir.resolve()) or not path.is_file():
                raise ReplabError(f"report figure {rel!r} is not a file inside {run_dir}")
            figs.append({"src": _data_uri(path), "alt": f"{sec.title}: {Path(rel).name}", "name": rel})
        sections.append({"title": sec.title, "paragraphs": sec.paragraphs, "figures": figs,
                         "tables": [(cap, _table(rows)) for cap, rows in sec.tables], "command": sec.command})
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(_TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    prov = summary["provenance"]
    return env.get_template("report.html.j2").render(
        title=summary["title"], experiment=summary["experiment"], workflow=summary["workflow"],
        description=exp.description,
        headline=[{"key": f"headline.{k}", "html": num(summary, f"headline.{k}")} for k in summary["headline"]],
        sections=sections, model=summary["model"], config=summary["config"], provenance=prov,
        packages={k: v for k, v in prov["packages"].items() if v})


def write_report(exp, summary: dict, run_dir) -> Path:
    """Render and write ``<run_dir>/report.html``."""
    path = Path(run_dir) / "report.html"
    write_text_atomic(path, render_report(exp, summary, run_dir))
    return path

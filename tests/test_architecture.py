"""The layer order of docs/architecture.md, checked on every import (function-level ones too).

Layers, bottom to top (an import may only go down, or stay inside its own package):

1. ``replab.errors``, ``replab.hooks``, ``replab.io``, ``replab.rundir``, ``replab.threads``,
   ``replab._progress``, ``replab._figures``, ``replab._version`` (they may import each other)
2. models  3. store | distributed (Ray plumbing; siblings never import each other)  4. prompts
5. harvesting  6. lenses | probes | geometry (siblings never import each other)  7. patching
8. heads  9. circuits  10. features  11. experiments
12. cli (and ``replab.__main__``); the package facade ``replab/__init__.py`` sits on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "replab"
LAYERS = {
    "replab.errors": 1, "replab.hooks": 1, "replab.io": 1, "replab.rundir": 1, "replab.threads": 1,
    "replab._progress": 1, "replab._figures": 1, "replab._version": 1,
    "replab.models": 2, "replab.store": 3, "replab.distributed": 3, "replab.prompts": 4, "replab.harvesting": 5,
    "replab.lenses": 6, "replab.probes": 6, "replab.geometry": 6,
    "replab.patching": 7, "replab.heads": 8, "replab.circuits": 9, "replab.features": 10,
    "replab.experiments": 11, "replab.cli": 12, "replab.__main__": 12, "replab": 13,
}
SIBLINGS = {3, 6}   # layers whose packages may not import each other


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _unit(module: str) -> str:
    """The layer unit a module belongs to (``replab.patching.plan`` -> ``replab.patching``)."""
    parts = module.split(".")
    two = ".".join(parts[:2])
    return two if two in LAYERS else "replab"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    me = _module(path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".")[: len(me.split(".")) - node.level + (1 if path.name == "__init__.py" else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, t) for line, t in out if t == "replab" or t.startswith("replab.")]


def test_every_import_goes_down_a_layer():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        me = _module(path)
        mine = _unit(me)
        for line, target in _imports(path):
            theirs = _unit(target)
            if theirs == mine:
                continue
            if LAYERS[theirs] > LAYERS[mine] or (LAYERS[theirs] == LAYERS[mine] and LAYERS[mine] in SIBLINGS):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} ({mine}, layer {LAYERS[mine]}) imports "
                           f"{target} ({theirs}, layer {LAYERS[theirs]})")
    assert not bad, "imports that go up (or sideways) a layer:\n" + "\n".join(bad)


def test_every_package_is_placed_in_a_layer():
    units = {_unit(_module(p)) for p in ROOT.rglob("*.py")}
    tops = {".".join(_module(p).split(".")[:2]) for p in ROOT.rglob("*.py")}
    assert tops <= set(LAYERS) | {"replab"}, sorted(tops - set(LAYERS))
    assert units <= set(LAYERS)


def test_no_module_level_cycles_inside_a_package():
    """Modules of one package never import each other in a cycle (function-level imports count)."""
    edges: dict[str, set[str]] = {}
    modules = {_module(p) for p in ROOT.rglob("*.py")}
    for path in ROOT.rglob("*.py"):
        me = _module(path)
        for _, target in _imports(path):
            t = target if target in modules else target.rsplit(".", 1)[0]
            if t in modules and t != me and _unit(t) == _unit(me) and not me.startswith(t + ".") \
                    and not t.startswith(me + "."):
                edges.setdefault(me, set()).add(t)

    def reaches(a: str, b: str) -> bool:
        seen, stack = set(), [a]
        while stack:
            x = stack.pop()
            if x == b:
                return True
            if x not in seen:
                seen.add(x)
                stack.extend(edges.get(x, ()))
        return False

    cycles = sorted({tuple(sorted((a, b))) for a, outs in edges.items() for b in outs if reaches(b, a)})
    assert not cycles, cycles


def test_no_public_function_shares_a_name_with_a_module():
    """A function named like a module of its package is shadowed once the module is imported
    (``replab.harvest`` was both); every package's public names must differ from its modules."""
    clashes = []
    for pkg in [p.parent for p in ROOT.rglob("__init__.py")]:
        modules = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"} | \
                  {p.name for p in pkg.iterdir() if (p / "__init__.py").is_file()}
        for path in pkg.glob("*.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_") \
                        and node.name in modules:
                    clashes.append(f"{path.relative_to(ROOT.parent)}: {node.name}")
        init = (pkg / "__init__.py").read_text()
        for name in modules:
            if f'"{name}":' in init and "_EXPORTS" in init:
                clashes.append(f"{pkg.relative_to(ROOT.parent)}/__init__.py exports {name}")
    assert not clashes, clashes


def test_one_hook_alias_table():
    """Only replab/hooks.py maps site names to hook templates."""
    owners = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
                if {"resid_pre", "resid_mid", "resid_post"} <= keys:
                    owners.append(str(path.relative_to(ROOT.parent)))
    assert owners == ["replab/hooks.py"], owners

"""The code's shape: imports point one way, and each package loads only what it needs."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("tools", "firmware")


def _modules() -> dict[str, Path]:
    """Every module of tools/ and firmware/ (the emulated chip's target/ runs inside
    MicroPython under other names, and is left out)."""
    out = {}
    for top in PACKAGES:
        for path in (REPO / top).rglob("*.py"):
            if "target" in path.relative_to(REPO).parts:
                continue
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports, at module level or inside a function."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    # A package's __init__ is imported by each of its modules: an edge to the parent package
    # is not a dependency of the module on its siblings.
    cycles = []
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert cycles == []


# What importing a package's modules may not drag in, unless a module of it needs it.
HEAVY = {"tools.esp32emu": "the emulator", "amqtt.broker": "amqtt's broker", "esptool": "esptool"}
NEEDS = {"tools.control.brokers.amqtt": {"amqtt.broker"}, "tools.board.flashing": {"esptool"},
         "tools.control.services": set()}


@pytest.mark.parametrize("package", ["tools.operator", "tools.control", "tools.board", "tools.site"])
def test_a_package_loads_only_what_it_needs(package):
    mods = sorted(m for m in _modules() if m == package or m.startswith(package + "."))
    script = "\n".join([
        "import importlib, json, sys",
        f"out = {{}}",
        f"for m in {mods!r}:",
        "    before = set(sys.modules)",
        "    importlib.import_module(m)",
        f"    out[m] = sorted(h for h in {sorted(HEAVY)!r} if any(k == h or k.startswith(h + '.') for k in sys.modules))",
        "    for k in set(sys.modules) - before:",
        "        del sys.modules[k]",
        "print(json.dumps(out))",
    ])
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    loaded = json.loads(out.stdout)
    wrong = {m: [HEAVY[h] for h in hs if h not in NEEDS.get(m, set())] for m, hs in loaded.items()}
    assert {m: w for m, w in wrong.items() if w} == {}


# Each group of code and the groups it may import: from the device's contract up to the
# commands. The emulator comes after what it emulates a board for; nothing but the commands,
# the demo, the benchmarks and the tests import it.
MAY_IMPORT = {
    "firmware": set(),
    "tools.espidf": set(),
    "tools.site": {"tools.espidf", "firmware"},
    "tools.control": {"tools.site", "tools.espidf", "firmware"},
    "tools.operator": {"tools.control", "tools.site", "tools.espidf", "firmware"},
    "tools.board": {"tools.site", "tools.espidf", "firmware"},
    "tools.esp32emu": {"tools.board", "tools.site", "tools.espidf", "firmware"},
}


def _group(module: str) -> str | None:
    return next((g for g in sorted(MAY_IMPORT, key=len, reverse=True) if module == g or module.startswith(g + ".")),
                None)


def test_imports_point_one_way():
    mods = _modules()
    wrong = []
    for m, p in mods.items():
        g = _group(m)
        if g is None:  # the commands, the demo, the benchmarks: may use everything
            continue
        for target in _imports(m, p, set(mods)):
            tg = _group(target)
            if tg is not None and tg != g and tg not in MAY_IMPORT[g]:
                wrong.append(f"{m} -> {target}")
    assert wrong == []

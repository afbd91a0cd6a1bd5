"""The package's imports point only down the layers written in README's "How it works", and never in a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "maskdiffusion"


def module_names(source: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under ``source/PACKAGE`` (a package is its ``__init__``)."""
    names = {}
    for path in sorted((source / PACKAGE).rglob("*.py")):
        parts = path.relative_to(source).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(source: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body (function-level imports too)."""
    modules = module_names(source)
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, node.module] if node.module else base)
                submodules = {f"{target}.{alias.name}" for alias in node.names} & modules.keys()
                found |= submodules or {target}  # ``from . import files`` imports the module, not the package
        edges[name] = {target for target in found if target in modules and target != name}
    return edges


def readme_layers(readme: Path) -> list[list[str]]:
    """The numbered list under "Layers, top to bottom" in README: the module names of each layer."""
    text = readme.read_text(encoding="utf-8")
    block = text[text.index("Layers, top to bottom") :].split("\n\n")[1]
    return [re.findall(r"`([\w.*]+)`", line) for line in block.splitlines() if re.match(r"\d+\. ", line)]


def layer_of(module: str, layers: list[list[str]]) -> int:
    short = module.removeprefix(PACKAGE + ".") if module != PACKAGE else PACKAGE
    places = [
        index
        for index, names in enumerate(layers)
        for name in names
        if name == short or (name.endswith(".*") and (short == name[:-2] or short.startswith(name[:-1])))
    ]
    if len(places) != 1:
        raise AssertionError(f"module {short} is in {len(places)} layers of README's list; put it in exactly one")
    return places[0]


def problems(edges: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    """Upward imports and import circles; raises for a module that is not in exactly one layer."""
    for module in edges:
        layer_of(module, layers)
    found = [
        f"{source} (layer {layer_of(source, layers) + 1}) imports {target} (layer {layer_of(target, layers) + 1})"
        for source, targets in sorted(edges.items())
        for target in sorted(targets)
        if layer_of(target, layers) < layer_of(source, layers)
    ]
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                found.append("circle: " + " -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return found


def test_imports_point_down_the_readme_layers_and_never_in_a_circle():
    layers = readme_layers(ROOT / "README.md")
    assert len(layers) >= 5 and all(layers)
    assert problems(imports(ROOT / "src"), layers) == []


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, body in files.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    return root


def test_the_check_finds_an_upward_import_a_circle_and_an_unplaced_module(tmp_path):
    layers = [["cli", "commands.*"], ["engine"], [PACKAGE, "base", "other"]]
    source = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "cli.py": "from .commands import run\n",
            "commands/__init__.py": "",
            "commands/run.py": "from .. import engine\n",
            "engine.py": "from . import base\n",
            "base.py": "def f():\n    from .engine import x\n",  # upward, and base -> engine -> base
            "other.py": "from .base import f\n",
        },
    )
    found = problems(imports(source), layers)
    assert "maskdiffusion.base (layer 3) imports maskdiffusion.engine (layer 2)" in found
    assert any(line.startswith("circle: ") and "maskdiffusion.engine -> maskdiffusion.base" in line for line in found)
    assert not any("cli" in line or "commands" in line or "other" in line for line in found)
    (source / PACKAGE / "new.py").write_text("")
    with pytest.raises(AssertionError, match="module new is in 0 layers"):
        problems(imports(source), layers)

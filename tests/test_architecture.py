"""The layers of docs/architecture.md, checked on the source: every import of an asymlora module
(at the top of a file or inside a function) points to the importer's own layer or below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "asymlora"

# Top-level module or package -> layer, lowest first (docs/architecture.md lists them top first).
LAYERS = {
    **dict.fromkeys(["config", "errors", "progress", "threads", "checkpoint_signal"], 0),
    "models": 1,
    "adapters": 2,
    "runfolder": 3,
    "data": 4,
    **dict.fromkeys(["train", "eval"], 5),
    **dict.fromkeys(["federated", "analysis"], 6),
    "fedconfig": 7,
    "engines": 8,
    "recipes": 9,
    "cli": 10,
    "__main__": 11,
}


def top_of(module: str) -> str:
    """``asymlora.engines.flower.strategy`` -> ``engines``; ``asymlora`` itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every asymlora import in ``source``, the code of module
    ``name`` (a package's ``__init__`` when ``is_package``)."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "asymlora"]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] != "asymlora":
                continue
            if top_of(target) == "":  # from asymlora import x: x is the module
                out += [(node.lineno, f"asymlora.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, target))
    return out


def upward_imports(source: str, name: str, is_package: bool = False) -> list[str]:
    """The imports of ``source`` (module ``name``) that point to a higher layer than its own."""
    own = LAYERS[top_of(name)]
    return [
        f"line {line}: {target}"
        for line, target in imported_modules(source, name, is_package)
        if top_of(target) in LAYERS and LAYERS[top_of(target)] > own
    ]


SOURCES = sorted(p for p in SRC.rglob("*.py") if p != SRC / "__init__.py")  # the root re-exports lazily


def test_every_module_has_a_layer():
    tops = {top_of(module_name(p)) for p in SOURCES}
    assert tops <= set(LAYERS), f"give these a layer here and in docs/architecture.md: {tops - set(LAYERS)}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down_the_layers(path: Path):
    upward = upward_imports(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not upward, f"{path.relative_to(SRC)} imports from a higher layer: {upward}"


def test_the_check_finds_an_upward_import_written_any_way():
    engine = "asymlora.engines.flower.probe"
    assert upward_imports("from ...recipes import federated\n", engine) == ["line 1: asymlora.recipes"]
    assert upward_imports("def f():\n    import asymlora.cli\n", engine) == ["line 2: asymlora.cli"]
    assert upward_imports("from asymlora import recipes\n", engine) == ["line 1: asymlora.recipes"]
    assert upward_imports("from ..round import Server\nfrom ...federated import get_method\n", engine) == []
    assert upward_imports("from .probe import x\n", "asymlora.engines.flower", is_package=True) == []

"""The import rule of lib_anydressing/__init__.py, checked on the source: a package imports only from
packages of lower layers (and from itself), never from a sibling of its own layer or from above."""

from __future__ import annotations

import ast
from pathlib import Path

import lib_anydressing

ROOT = Path(lib_anydressing.__file__).parent
LAYERS = [  # lowest first; the same map as the package docstring
    {"garments"},
    {"files"},
    {"sd"},
    {"engine", "segment", "training"},
    {"generation", "anydressing_trainer", "garment_lora", "evaluation", "convert"},
    {"tabs", "cli", "batch"},
    {"webui"},
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _imports(path: Path) -> set[str]:
    """The top-level lib_anydressing packages a module imports (absolute or relative, at any depth)."""
    package = path.relative_to(ROOT).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[: len(package) - node.level])
            parts = [*base, *(node.module.split(".") if node.module else [])]
            names = [*parts[:1]] if parts else [alias.name for alias in node.names]
            found.update(names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lib_anydressing."):
            found.add(node.module.split(".")[1])
    return found


def test_every_package_is_in_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if not p.name.startswith("__")}
    packages.discard("py")
    assert {p for p in packages if not p.endswith(".pyc")} == set(LAYER_OF)


def test_packages_import_only_from_lower_layers():
    wrong = []
    for path in ROOT.rglob("*.py"):
        own = path.relative_to(ROOT).parts[0].removesuffix(".py")
        if own not in LAYER_OF:
            continue
        for used in _imports(path) - {own}:
            if used in LAYER_OF and LAYER_OF[used] >= LAYER_OF[own]:
                wrong.append(f"{path.relative_to(ROOT)} imports {used}")
    assert not wrong, "\n".join(sorted(wrong))

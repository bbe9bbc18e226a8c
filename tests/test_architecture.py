"""The house rules, read off the source: imports go down only, speed stays in ops/.

Layers (docs/architecture.md): a module may import from its own layer or below, never above,
and a few same-layer edges are forbidden too (components know nothing of the assembly, ops and
hf know no model, the trainer knows no recipe). Function-level imports count like the others:
only the CLI imports lazily (so ``--help`` stays fast), and nothing imports the CLI.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "idefics3_kit"

LAYERS = {
    "registry": 0, "files": 0, "presets": 0, "version": 0, "feature_cache": 0,
    "config": 1, "ops": 1,
    "components": 2, "hf": 2,
    "processing": 3, "generation": 3, "streaming": 3, "model": 3,
    "train": 4, "recipes": 4, "serve": 4,
    "cli": 5,
}
# same-layer (or lower-layer) edges that are still forbidden: (importer room, imported room)
FORBIDDEN = {("ops", "config"), ("components", "hf"), ("hf", "components"), ("train", "recipes"),
             ("serve", "recipes"), ("train", "serve"), ("serve", "train")}
# the top-level room of every module under idefics3_kit/
ROOM_OF_PACKAGE_INIT = "__init__"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOM_OF_PACKAGE_INIT


def _imports(module: str, path: pathlib.Path):
    """Every idefics3_kit module that ``module`` imports (module level and inside functions)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("idefics3_kit"):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("idefics3_kit"):
                if node.module is None or target.count(".") == 0:  # from . import a, b: each is a module
                    for alias in node.names:
                        yield f"{target}.{alias.name}", node.lineno
                else:
                    yield target, node.lineno


ALL = list(_modules())


def test_the_layer_table_covers_every_room():
    rooms = {_room(m) for m, _ in ALL} - {ROOM_OF_PACKAGE_INIT, "_C", "_build_info"}
    assert rooms <= set(LAYERS), f"rooms without a layer: {sorted(rooms - set(LAYERS))}"


@pytest.mark.parametrize("module,path", ALL, ids=[m for m, _ in ALL])
def test_imports_go_down_only(module, path):
    room = _room(module)
    if room == ROOM_OF_PACKAGE_INIT:
        return  # the package's face re-exports names from every room
    bad = []
    for target, line in _imports(module, path):
        target_room = _room(target)
        if target_room in (room, ROOM_OF_PACKAGE_INIT) and target_room != ROOM_OF_PACKAGE_INIT:
            continue
        if target_room == ROOM_OF_PACKAGE_INIT:
            bad.append(f"line {line}: imports the package face (idefics3_kit) instead of a room")
        elif target_room == "cli":
            bad.append(f"line {line}: imports the CLI ({target})")
        elif LAYERS[target_room] > LAYERS[room] or (room, target_room) in FORBIDDEN:
            bad.append(f"line {line}: {room} (layer {LAYERS[room]}) imports {target} "
                       f"({target_room}, layer {LAYERS[target_room]})")
    assert not bad, f"{module}:\n" + "\n".join(bad)


def test_registry_imports_nothing_from_the_package():
    path = PACKAGE / "registry.py"
    assert list(_imports("idefics3_kit.registry", path)) == []


def test_only_the_cli_imports_inside_functions():
    lazy = []
    for module, path in ALL:
        if _room(module) == "cli":
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                            "idefics3_kit")):
                        lazy.append(f"{module}:{node.lineno}")
    assert not lazy, f"function-level imports of the package hide import circles: {lazy}"


def test_nothing_outside_ops_calls_torch_ops():
    offenders = []
    for module, path in ALL:
        if _room(module) == "ops":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.ops." in line:
                offenders.append(f"{module}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_components_import_no_assembly():
    for module, path in ALL:
        if _room(module) != "components":
            continue
        for target, line in _imports(module, path):
            assert _room(target) not in ("model", "generation", "streaming", "cli", "hf", "recipes", "train",
                                         "processing", "serve"), f"{module}:{line} imports {target}"

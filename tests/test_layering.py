"""The package's layers, read from the source: shared pieces below, server and client beside each other and never
importing each other, plugins, command lines and HTTP services on top; light imports where they matter; a file map
in every ``__init__.py``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "swarm"

# Each package's layer: a module may import its own package, lower layers, and the top-level ``swarm`` (lazy public
# names and the version). Commands (``__main__.py`` and console scripts) sit on top whatever package they are in.
LAYERS = {
    "utils": 0, "compression": 1, "rpc": 2, "dht": 2, "trust": 2, "hub": 2, "settlement": 3,
    "blocks": 4,
    "server": 5, "client": 5,
    "acceleration": 6, "api": 7, "health": 7, "chat": 7, "simulation": 7, "local_swarm": 7, "video": 7, "verify": 7,
}
COMMANDS = {"swarm.hub.tiny_diffusion"}  # console scripts outside __main__.py files (see pyproject.toml)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of every ``swarm`` import, also inside functions, leaving out ``if TYPE_CHECKING:`` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for statement in node.body for child in ast.walk(statement)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name == "swarm" or name.startswith("swarm.")]


def _modules() -> list[tuple[str, Path]]:
    return sorted((_module_name(path), path) for path in ROOT.rglob("*.py"))


def test_every_package_has_a_layer():
    packages = {name.split(".")[1] for name, _ in _modules() if name.count(".") >= 1}
    assert packages == set(LAYERS), f"give these a layer: {packages ^ set(LAYERS)}"


def test_imports_go_down_the_layers_only():
    wrong = []
    for name, path in _modules():
        if name == "swarm" or name.endswith(".__main__") or name in COMMANDS:
            continue
        own = name.split(".")[1]
        for line, target in _imports(ast.parse(path.read_text())):
            if target == "swarm":
                continue
            other = target.split(".")[1]
            if other != own and LAYERS[other] >= LAYERS[own]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target} ({own} is layer "
                             f"{LAYERS[own]}, {other} is layer {LAYERS[other]})")
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_a_client_importing_the_server():
    """The check itself: a client module importing the server (even inside a function) is reported."""
    tree = ast.parse("def f():\n    from swarm.server.server import Server\n")
    assert _imports(tree) == [(2, "swarm.server.server")]
    guarded = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import swarm.server\n")
    assert _imports(guarded) == []
    assert LAYERS["server"] >= LAYERS["client"]  # so swarm.client -> swarm.server is reported above


def test_every_init_maps_its_files():
    missing = []
    for init in ROOT.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        for path in init.parent.glob("*.py"):
            if path.name != "__init__.py" and path.name not in doc:
                missing.append(f"{init.relative_to(ROOT.parent)} does not describe {path.name}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("module, unwanted", [
    ("swarm", ["torch", "transformers", "diffusers", "hivemind"]),
    ("swarm.dht.__main__", ["torch", "transformers", "diffusers"]),
    ("swarm.rpc.framing", ["torch", "transformers", "diffusers"]),
    ("swarm.server.__main__", ["torch", "transformers", "diffusers"]),
    ("swarm.server.server", ["diffusers"]),  # a transformer server never loads diffusers
])
def test_light_imports(module, unwanted):
    code = (f"import sys, {module}\n"
            f"print(' '.join(m for m in {unwanted!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == "", f"importing {module} loaded {loaded.stdout.strip()}"

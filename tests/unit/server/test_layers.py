"""Layers point one way: the server holds no gRPC, the transport never imports the server."""

from __future__ import annotations

import ast
from pathlib import Path

import downpour

PACKAGE = Path(downpour.__file__).parent


def imported_modules(folder: Path) -> dict[str, set[str]]:
    found = {}
    for path in sorted(folder.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[path.name] = names
    return found


def test_the_server_imports_no_grpc():
    for module, names in imported_modules(PACKAGE / "server").items():
        assert not any(name == "grpc" or name.startswith("grpc.") for name in names), module


def test_the_transport_never_imports_the_server():
    for module, names in imported_modules(PACKAGE / "transport").items():
        assert not any(name.startswith("downpour.server") for name in names), module

"""The layers point one way: every package imports only packages of its own layer or below.

The order is DESIGN.md's, with what the code taught us: ``optim`` (whose
batch methods drive the shards' vector operations) sits between ``server``
and ``strategies``, and ``metrics`` (the event log every role writes into)
below ``cluster``, which carries the roles' events into its sinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import downpour

# Lowest first; packages in one tuple share a layer and import nothing of each other.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "flat"),
    ("data",),
    ("models",),
    ("compress",),
    ("checkpoint",),
    ("transport",),
    ("server",),
    ("optim",),
    ("strategies",),
    ("metrics",),
    ("cluster",),
    ("run",),
    ("api",),
    ("compare",),
    ("__init__",),
    ("cli", "__main__"),
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}
ROOT = Path(downpour.__file__).parent


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> set[str]:
    """The downpour packages ``path`` imports (``from downpour import data`` counts as ``data``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "downpour":
            if node.module == "downpour":
                found |= {alias.name for alias in node.names}
            else:
                found.add(package_of(node.module))
        elif isinstance(node, ast.Import):
            found |= {package_of(a.name) for a in node.names if a.name.split(".")[0] == "downpour"}
    return found


def test_every_package_has_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
                if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert packages <= set(LEVEL), sorted(packages - set(LEVEL))


def test_no_package_imports_one_above_it():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        me = package_of(".".join(path.relative_to(ROOT.parent).with_suffix("").parts))
        for other in imports(path) - {me}:
            if other in LEVEL and LEVEL[other] >= LEVEL[me]:
                wrong.append(f"{path.relative_to(ROOT.parent)} imports downpour.{other}")
    assert not wrong, "\n".join(wrong)


def test_no_strategy_imports_the_cluster_or_a_layer_above_it():
    # Strategies are plans: the Coordinator (downpour.run) starts their roles.
    for path in (ROOT / "strategies").glob("*.py"):
        assert not imports(path) & {"cluster", "metrics", "run", "api", "cli", "compare"}, path


def third_party(path: Path) -> set[str]:
    """The top-level names of the non-downpour modules ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found - {"downpour"}


def test_grpc_and_ray_stay_behind_the_transport_and_the_cluster():
    # The server and the strategies hold no gRPC (the transport hides it) and no Ray (the cluster does).
    for folder in ("server", "strategies"):
        for path in (ROOT / folder).glob("*.py"):
            assert not third_party(path) & {"grpc", "ray"}, path
